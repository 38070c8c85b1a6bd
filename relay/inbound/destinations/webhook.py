"""The `webhook` destination: an HTTP POST to an application, multipart (a JSON part with
the parsed fields, one part per attachment) or the raw MIME, signed with HMAC-SHA256 over
`timestamp + "." + body`."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp

from relay.config import Duration, Secret
from relay.inbound.destinations.base import Destination
from relay.inbound.parse import ParsedMessage
from relay.outcomes import PermanentError, TransientError
from relay.upstreams.http import retry_after as http_retry_after

_WEBHOOK_TIMEOUT = Duration(30.0)


@dataclass(frozen=True)
class WebhookDestinationConfig:
    url: str
    # Shared secret for the X-Relay-Signature header; strongly recommended.
    secret: Secret | None = None
    mode: Literal["multipart", "raw"] = "multipart"
    timeout: Duration = _WEBHOOK_TIMEOUT
    headers: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host/..., got {self.url!r}")


SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"
DELIVERY_HEADER = "X-Relay-Delivery-Id"


def sign_webhook(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body).

    The timestamp is inside the MAC so a receiver can refuse old requests (replays); the
    receiver recomputes this over the exact body bytes and compares in constant time.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")


def _disposition(name: str, filename: str | None = None) -> str:
    out = f'form-data; name="{_quoted(name)}"'
    if filename is not None:
        ascii_name = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
        out += f'; filename="{_quoted(ascii_name)}"'
        if ascii_name != filename:
            out += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return out


def build_multipart(fields: Mapping[str, Any], parsed: ParsedMessage) -> tuple[bytes, str]:
    """multipart/form-data (RFC 7578): part `message` (JSON), then `attachment` parts."""
    boundary = "relay-" + secrets.token_hex(16)
    chunks: list[bytes] = []

    def part(disposition: str, content_type: str, data: bytes) -> None:
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")

    part(
        _disposition("message"),
        "application/json",
        json.dumps(fields, ensure_ascii=False).encode("utf-8"),
    )
    for att in parsed.attachments:
        part(_disposition("attachment", att.filename), att.content_type, att.data)
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class WebhookDestination(Destination):
    """POST to an application. 2xx done; 408/429/5xx/timeouts retry; other 4xx permanent."""

    type_name = "webhook"

    def __init__(
        self,
        name: str,
        settings: WebhookDestinationConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._get_session()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.settings.timeout))
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build_request(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The exact body and headers to send (public so tests and docs can show them)."""
        s = self.settings
        headers = dict(s.headers)
        if s.mode == "raw":
            body, ctype = raw, "message/rfc822"
            headers["X-Relay-Recipients"] = ", ".join(recipients)
            if sender is not None:
                headers["X-Relay-Sender"] = sender
        else:
            fields = {
                **parsed.to_json(),
                "recipients": list(recipients),
                "sender": sender,
                "delivery_id": delivery_id,
            }
            body, ctype = build_multipart(fields, parsed)
        headers["Content-Type"] = ctype
        timestamp = str(int(self.clock()))
        headers[TIMESTAMP_HEADER] = timestamp
        if delivery_id:
            headers[DELIVERY_HEADER] = delivery_id
        if s.secret:
            headers[SIGNATURE_HEADER] = sign_webhook(str(s.secret), timestamp, body)
        return body, headers

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        url = self.settings.url
        body, headers = self.build_request(
            raw, parsed, recipients, sender=sender, delivery_id=delivery_id
        )
        try:
            async with self._get_session().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                detail = (await resp.text(errors="replace"))[:200].strip()
                retry_after = http_retry_after(resp.headers, time.time())
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(
                f"webhook {url}: cannot connect: {exc.os_error!r}", upstream_wide=True
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have been received and processed before the failure.
            raise TransientError(
                f"webhook {url}: {exc!r}", upstream_wide=True, ambiguous=True
            ) from exc
        reason = f"webhook {url}: HTTP {status} {detail}".strip()
        if 200 <= status < 300:
            return f"webhook {url}: HTTP {status}"
        if status in (408, 429) or status >= 500:
            raise TransientError(reason, retry_after=retry_after, upstream_wide=status != 408)
        raise PermanentError(reason)
