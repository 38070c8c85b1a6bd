"""What every HTTP provider upstream shares: one client session, one request path, and one
reading of HTTP outcomes.

All HTTP upstreams use a single `aiohttp.ClientSession` (reference counted: `start()`
acquires it, `close()` releases it), so the relay keeps one connection pool and one DNS
cache however many providers are configured.

Outcomes follow DESIGN.md invariant 3. A status is read the same way for every provider
unless a subclass knows better from the provider's own error codes:

- 429: transient with Retry-After, not upstream-wide: routing paces the upstream and
  counts repeats, as for SES throttling.
- 5xx: transient, with Retry-After. Not upstream-wide: one stray 500 must not stop a
  provider for everyone for the cooldown (with a single provider, all mail would wait);
  repeats open the breaker through routing's `failures_to_open`.
- 401, 403: the account is unusable (bad key, suspended): permanent, upstream-wide.
- 3xx, 404, 405, 415: wrong endpoint or request format: permanent, upstream-wide.
- 408: transient; 413: too large *for this provider*, so transient (another may take it).
- any other 4xx: the provider refused this message: permanent.

A request that fails without an answer is transient. It is `ambiguous` when the whole
request (headers and body) had been handed to the connection: the provider may have
accepted it, so a retry may duplicate. A failure to connect is never ambiguous. As for
SES, it is upstream-wide unless it is a timeout after the request was sent (one slow
answer is not an outage; repeats open the breaker through routing's failure count).
"""

from __future__ import annotations

import abc
import email.utils
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from multidict import CIMultiDictProxy

from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, TransientError, UpstreamError
from relay.upstreams.base import Upstream

log = logging.getLogger("relay.upstreams")

#: Statuses meaning we are not talking to the API we think (base_url, our request format).
ENDPOINT_WRONG = frozenset({404, 405, 415})
#: Headers aiohttp would add that no provider needs: answers are small JSON, not worth
#: the compression dance.
_SKIP_AUTO_HEADERS = frozenset({"Accept-Encoding"})


# -- the shared session ------------------------------------------------------------------


@dataclass
class _Progress:
    """Per-request trace state: how much of the request reached the connection."""

    expected: int | None = None
    sent: int = 0
    headers_sent: bool = False

    @property
    def body_sent(self) -> bool:
        # aiohttp reports each chunk just before writing it to the transport, so once the
        # declared length has been reported the whole request is in the kernel's hands.
        if not self.headers_sent:
            return False
        return self.expected is None or self.sent >= self.expected


async def _on_headers_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    progress = ctx.trace_request_ctx
    if isinstance(progress, _Progress):
        progress.headers_sent = True
        length = params.headers.get("Content-Length")
        progress.expected = int(length) if length and length.isdigit() else None


async def _on_chunk_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    progress = ctx.trace_request_ctx
    if isinstance(progress, _Progress):
        progress.sent += len(params.chunk)


class SharedSession:
    """One ClientSession for all HTTP upstreams, open while at least one of them is."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._users = 0

    async def acquire(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_headers_sent)
            trace.on_request_chunk_sent.append(_on_chunk_sent)
            # No connector-wide cap: the dispatcher bounds concurrency per upstream.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                trace_configs=[trace],
                headers={"User-Agent": "relay"},
            )
        self._users += 1
        return self._session

    async def release(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def users(self) -> int:
        return self._users


shared_session = SharedSession()


# -- reading answers ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A provider's complete answer, read before the connection goes back to the pool."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (proxies answer HTML)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from Retry-After (delta or HTTP-date) or X-RateLimit-Reset (epoch).

    SendGrid answers 429 with X-RateLimit-Reset (Unix time) rather than Retry-After.
    """
    value = headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    reset = headers.get("X-RateLimit-Reset", "").strip()
    if reset.isdigit() and int(reset) > 1_000_000_000:
        return max(0.0, int(reset) - now)
    return None


def classify_status(
    status: int, detail: str, *, headers: Mapping[str, str], now: float
) -> UpstreamError:
    """The default reading of an unsuccessful status (see the module docstring)."""
    reason = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status >= 500:
        return TransientError(reason, retry_after=retry_after(headers, now))
    if status in (408, 429):
        return TransientError(reason, retry_after=retry_after(headers, now))
    if status in (401, 403):
        return PermanentError(reason, upstream_wide=True)
    if status in ENDPOINT_WRONG or 300 <= status < 400:
        # Independent of the message: bouncing would fail every message the same way.
        return PermanentError(f"{reason} (check base_url)", upstream_wide=True)
    if status == 413:
        return TransientError(f"too large for this upstream: {reason}")
    return PermanentError(reason)


# -- the base class ----------------------------------------------------------------------


class Refused(ValueError):
    """This upstream cannot take this message (too big, too many recipients, not
    convertible), though another upstream may: neither the message's nor the provider's
    fault."""


@dataclass(frozen=True, slots=True)
class Request:
    """One POST to a provider, fully serialised so its length is known up front: either
    bytes, or the chunks it is made of (a large message's text next to the small
    document around it), sent one after the other without being joined."""

    path: str
    body: bytes | Sequence[bytes]
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        """The whole body as one bytes object (tests, small bodies)."""
        return self.body if isinstance(self.body, bytes) else b"".join(self.body)


#: Bodies up to this size are joined into one write; a larger one goes chunk by chunk, so
#: a 5 MB message is not copied once more just to be sent.
JOIN_LIMIT = 256 * 1024


class ChunksPayload(Payload):
    """A request body made of several bytes objects, of a known total length."""

    def __init__(self, chunks: Sequence[bytes], size: int, content_type: str) -> None:
        super().__init__(chunks, content_type=content_type)
        self._chunks = chunks
        self._size = size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._chunks).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        left: int = self._size if content_length is None else content_length  # type: ignore[assignment]
        for chunk in self._chunks:
            if left <= 0:
                break
            await writer.write(chunk[:left] if len(chunk) > left else chunk)
            left -= len(chunk)


def request_body(request: Request) -> bytes | Payload:
    """What aiohttp is given to send: bytes when small, else the chunks as they are."""
    if isinstance(request.body, bytes):
        return request.body
    size = sum(map(len, request.body))
    if size <= JOIN_LIMIT:
        return b"".join(request.body)
    return ChunksPayload(request.body, size, request.content_type)


class HTTPUpstream(Upstream):
    """An upstream reached by one HTTP POST per message. Subclasses say what to post and how
    to read the answer; sending, timeouts and the generic error reading live here."""

    #: Largest message (bytes as queued) the provider takes; None: no documented limit.
    max_message_size: int | None = None
    #: Most envelope recipients one request may carry; None: no documented limit.
    max_recipients: int | None = None

    def __init__(
        self, name: str, *, base_url: str, timeout: float, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(name)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._timeout: aiohttp.ClientTimeout | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = await shared_session.acquire()

    async def close(self) -> None:
        if self._session is not None:
            self._session = None
            await shared_session.release()

    # -- what subclasses provide --

    @abc.abstractmethod
    def build(self, envelope: Envelope, data: bytes) -> Request:
        """The request that hands this message over; raise Refused if it can't be built."""

    @abc.abstractmethod
    def provider_id(self, reply: Reply) -> str | None:
        """The provider's id for an accepted message (what its webhooks will quote)."""

    def error_detail(self, reply: Reply) -> str:
        """The provider's own words about a failure, for the timeline."""
        return reply.text()

    def classify(self, reply: Reply) -> UpstreamError:
        """Map an unsuccessful answer; override where the provider has error codes."""
        return classify_status(
            reply.status, self.error_detail(reply), headers=reply.headers, now=self.clock()
        )

    def refusal(self, envelope: Envelope, data: bytes) -> str | None:
        """Why this upstream cannot take this message at all, or None.

        Routing calls it to skip the upstream before trying (size and recipient limits,
        and for JSON providers whether the MIME converts faithfully). send() enforces the
        same rules through `limits()` and `build()` raising `Refused`.
        """
        return self.limits(envelope, data)

    def limits(self, envelope: Envelope, data: bytes) -> str | None:
        """The cheap checks (size, recipient count) send() makes before building."""
        if self.max_message_size is not None and len(data) > self.max_message_size:
            return f"message of {len(data)} bytes exceeds the {self.max_message_size}-byte limit"
        if self.max_recipients is not None and len(envelope.rcpt_tos) > self.max_recipients:
            return (
                f"{len(envelope.rcpt_tos)} recipients exceed the limit of "
                f"{self.max_recipients} per message"
            )
        return None

    # -- the template --

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        try:
            refused = self.limits(envelope, data)
            if refused is not None:
                raise Refused(refused)
            request = self.build(envelope, data)
        except Refused as exc:
            # Not the message's fault and not the provider's: another upstream may take it.
            raise TransientError(f"{self.name} cannot take this message: {exc}") from None
        reply = await self.post(request)
        if reply.ok:
            return Accepted(provider_id=self.provider_id(reply))
        error = self.classify(reply)
        log.info("upstream %s: %s", self.name, error.reason)
        raise error

    async def post(self, request: Request) -> Reply:
        """POST and read the whole answer; network failures become TransientError."""
        if self._session is None:
            raise TransientError(f"upstream {self.name} is not started", upstream_wide=True)
        progress = _Progress()
        headers = {
            "Content-Type": request.content_type,
            "Accept": "application/json",
            **request.headers,
        }
        if self._timeout is None or self._timeout.total != self.timeout:
            self._timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._session.post(
                self.base_url + request.path,
                data=request_body(request),
                headers=headers,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=self._timeout,
                trace_request_ctx=progress,
                allow_redirects=False,
            ) as resp:
                return Reply(resp.status, resp.headers, await resp.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ambiguous = progress.body_sent
            timed_out = isinstance(exc, TimeoutError)
            what = "timed out" if timed_out else str(exc) or type(exc).__name__
            phase = "after the request was sent" if ambiguous else "before the request was sent"
            log.info("upstream %s: %s %s", self.name, what, phase)
            raise TransientError(
                f"{self.base_url}: {what} {phase}",
                upstream_wide=not (timed_out and ambiguous),
                ambiguous=ambiguous,
            ) from exc
