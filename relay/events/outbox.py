"""Message events out to the applications' webhooks: durable, signed, in order per message.

`publish` turns events into outbox entries (one per subscribed `[[webhook]]`, one durable
insert: the mail path awaits nothing slower). `WebhookSender` posts them: every process
runs one, they share the outbox (shared.db on one host, PostgreSQL across hosts) and
leases keep any two from posting the same entry at once. Delivery is at least once: a
crash between the application's 2xx and the delete posts the event again, with the same
`id` (and `X-Relay-Event-Id`), which is what an application de-duplicates on.

What an application receives, one POST per event::

    POST <url>
    Content-Type: application/json
    User-Agent: relay/<version>
    X-Relay-Event: bounced
    X-Relay-Event-Id: 0f9c...                    (the body's "id")
    X-Relay-Signature: t=1718000000,v1=5d41...  (see verify_signature)

    {"id":"0f9c...","event":"bounced","message_id":"...","recipient":"a@example.org",
     "upstream":"ses","reason":"550 5.1.1 user unknown","at":"2024-06-10T06:13:20.123Z",
     "detail":{"bounce":"hard","provider_id":"..."}}

`at` is when the event happened, ISO 8601 in UTC with milliseconds (fixed width, so the
strings sort as the times do). `recipient`, `upstream` and `detail` may be null.

Answer 2xx to take an event. Anything else (a 3xx too: redirects are not followed), a
connection error or no answer within the hook's `timeout` is retried after 10 s, 30 s,
1 m, 5 m, 15 m, 1 h, then every 2 h (each ±10 %; a `Retry-After` in seconds is honoured),
until the hook's `max_age` since the event; then the event is kept as dead for the
operator and the message's later events go on. Events of one message arrive in the order
they happened; events of different messages arrive concurrently, in no particular order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import importlib.metadata
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from relay.config import WebhookConfig
from relay.dispatch.retry import human_duration
from relay.events.model import MessageEvent
from relay.queue.base import OutboxEntry, StoreError, WebhookOutbox

log = logging.getLogger("relay.events")

SIGNATURE_HEADER = "X-Relay-Signature"
EVENT_HEADER = "X-Relay-Event"
EVENT_ID_HEADER = "X-Relay-Event-Id"

#: Delays after the 1st, 2nd, ... failed attempt of an entry; the last one repeats.
RETRY_SCHEDULE = (10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0)
JITTER = 0.1
#: The longest the sender waits before looking again, so entries that other processes or
#: hosts add (whose wake() it does not hear) go out within this time.
IDLE_CAP = 5.0
#: After a failed claim (the store unreachable), the wait before the next one.
STORE_PAUSE = 2.0


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"relay/{_version()}"


# -- the body and its signature -------------------------------------------------------------


def iso_time(at: float) -> str:
    """Epoch seconds as 2024-06-10T06:13:20.123Z."""
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_body(event: MessageEvent) -> bytes:
    """The JSON an application receives for `event` (the module docstring shows it)."""
    document = {
        "id": event.id,
        "event": event.event,
        "message_id": event.message_id,
        "recipient": event.recipient,
        "upstream": event.upstream,
        "reason": event.reason,
        "at": iso_time(event.at),
        "detail": event.detail,
    }
    return json.dumps(document, separators=(",", ":"), default=str).encode()


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, *, timestamp: int) -> str:
    """The X-Relay-Signature value: `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
    `"<t>." + body`, made at each attempt so the timestamp is that of the POST."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_signature(
    secret: str, header: str, body: bytes, *, now: float, max_age: float = 300.0
) -> bool:
    """Whether a POST came from a relay that holds `secret`, for applications.

    `header` is the X-Relay-Signature value, `body` the raw request body (before any JSON
    parsing: one changed byte fails), `now` the receiver's clock in epoch seconds. The
    signature is HMAC-SHA256 with the secret as key over the timestamp, a dot and the body;
    a timestamp more than `max_age` seconds from `now` fails, so a captured request can't
    be replayed later (de-duplicate on the event id for the retries within that window).
    Several `v1=` values are accepted (any one matching), for a future change of secret.

    In another language: split the header on ",", take `t` and the `v1` values, compute
    hex(HMAC_SHA256(key=secret, msg=t + "." + body)), compare in constant time.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > max_age:
        return False
    expected = _mac(secret, timestamp, body).encode()
    return any(hmac.compare_digest(expected, c.lower().encode()) for c in candidates)


# -- into the outbox ------------------------------------------------------------------------


async def publish(
    outbox: WebhookOutbox,
    hooks: Iterable[WebhookConfig],
    events: list[MessageEvent],
    *,
    now: float,
) -> int:
    """Queue each event for every hook subscribed to its type, in one durable insert; how
    many entries were added (an event queued before is not queued again). Call the
    sender's `wake()` afterwards so this process posts them at once."""
    subscribed = [hook for hook in hooks if hook.events]
    entries: list[tuple[str, str, str, bytes]] = []
    for event in events:
        body: bytes | None = None
        for hook in subscribed:
            if event.event in hook.events:
                body = body if body is not None else event_body(event)
                entries.append((hook.label, event.id, event.message_id, body))
    if not entries:
        return 0
    return await outbox.add(entries, now=now)


# -- out to the applications ----------------------------------------------------------------


class WebhookSender:
    """Posts the outbox's due entries; one per process, all sharing the outbox.

    `run()` until `stop()`. Each pass claims what is due (up to `concurrency` in flight),
    then waits for `wake()`, an entry finishing, or the next due time (at most IDLE_CAP).
    The lease covers `lease_time` or twice the slowest hook's timeout, whichever is longer,
    so a slow POST is not claimed again by another process while it is still running.

    `delivered`, `failed_attempts` and `dead` count since start, for /metrics.
    """

    def __init__(
        self,
        outbox: WebhookOutbox,
        hooks: Iterable[WebhookConfig],
        *,
        owner: str,
        clock: Callable[[], float] = time.time,
        lease_time: float = 60.0,
        concurrency: int = 16,
        schedule: tuple[float, ...] = RETRY_SCHEDULE,
    ) -> None:
        self._outbox = outbox
        self._owner = owner
        self._clock = clock
        self._min_lease = lease_time
        self._concurrency = max(1, concurrency)
        self._schedule = schedule
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._failing: set[str] = set()  # hooks whose last attempt failed (log once)
        self._store_failing = False
        self._stopped = False
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[Any] | None = None
        self.delivered = 0
        self.failed_attempts = 0
        self.dead = 0
        self.replace_hooks(hooks)

    def replace_hooks(self, hooks: Iterable[WebhookConfig]) -> None:
        """The hooks in force (a reload's): entries already claimed finish with the hook
        they were claimed for; a hook no longer configured has its waiting events given
        up at their next turn."""
        self._hooks = {hook.label: hook for hook in hooks}
        slowest = max((float(h.timeout) for h in self._hooks.values()), default=0.0)
        self._lease_time = max(self._min_lease, 2 * slowest)
        self._wake.set()

    def wake(self) -> None:
        """Look at the outbox now (after `publish` in this process)."""
        self._wake.set()

    async def run(self) -> None:
        self._runner = asyncio.current_task()
        if self._stopped:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        while not self._stopped:
            self._wake.clear()
            try:
                delay = await self._pass()
            except Exception:  # a bug must not end the sending for good
                log.exception("webhook outbox: the sender's pass failed")
                delay = STORE_PAUSE
            if delay > 0:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                # arrives as the wait ends (stop() wakes the loop as it cancels it).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def stop(self) -> None:
        """Stop posting. Entries in flight keep their leases, which expire (nothing is
        written on the way out, so stopping never waits for a slow application)."""
        self._stopped = True
        tasks = [self._runner] if self._runner is not None else []
        tasks.extend(self._in_flight.values())
        self._runner = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _pass(self) -> float:
        """Start posting what is due; how long to wait before the next pass."""
        free = self._concurrency - len(self._in_flight)
        if free <= 0:
            return IDLE_CAP  # an entry finishing wakes the loop sooner
        try:
            claimed = await self._outbox.claim(
                now=self._clock(), owner=self._owner, lease_time=self._lease_time, limit=free
            )
            due = await self._outbox.next_due() if len(claimed) < free else None
        except StoreError as exc:
            if not self._store_failing:
                log.warning("webhook outbox: cannot read the outbox: %s (trying again)", exc)
                self._store_failing = True
            return STORE_PAUSE
        if self._store_failing:
            log.info("webhook outbox: the outbox can be read again")
            self._store_failing = False
        for entry in claimed:
            task = asyncio.create_task(self._deliver(entry), name=f"webhook-{entry.seq}")
            self._in_flight[entry.seq] = task
        if len(claimed) == free:
            return 0.0  # more may be due; the next pass finds no free slot and waits
        if due is None:
            return IDLE_CAP
        wait = min(IDLE_CAP, due - self._clock())
        # Something due that the claim did not return: another process's claim in progress.
        return wait if wait > 0 or claimed else 0.05

    async def _deliver(self, entry: OutboxEntry) -> None:
        try:
            hook = self._hooks.get(entry.hook)
            if hook is None:
                gone = (
                    f"webhook {entry.hook!r} is no longer in the configuration ([[webhook]]);"
                    " the event was not sent"
                )
                await self._outbox.give_up(entry.seq, owner=self._owner, error=gone)
                self._dead(entry, gone)
                return
            error, retry_after = await self._post(hook, entry)
            if error is None:
                await self._outbox.done(entry.seq, owner=self._owner)
                self.delivered += 1
                if hook.label in self._failing:
                    self._failing.discard(hook.label)
                    log.info("webhook %s: delivering again", hook.label)
                return
            self.failed_attempts += 1
            if hook.label not in self._failing:
                self._failing.add(hook.label)
                log.warning(
                    "webhook %s: %s (%s); retrying with backoff, logged again only when"
                    " an event is given up",
                    hook.label,
                    error,
                    hook.url,
                )
            await self._after_failure(hook, entry, error, retry_after)
        except StoreError as exc:
            log.warning(
                "webhook outbox: could not record the outcome of event %s: %s (it is posted"
                " again when its lease ends)",
                entry.key,
                exc,
            )
        except Exception:
            log.exception("webhook outbox: event %s to %s", entry.key, entry.hook)
        finally:
            self._in_flight.pop(entry.seq, None)
            self._wake.set()

    async def _after_failure(
        self, hook: WebhookConfig, entry: OutboxEntry, error: str, retry_after: float | None
    ) -> None:
        now = self._clock()
        deadline = entry.created + float(hook.max_age)
        if now >= deadline:
            reason = (
                f"gave up after {entry.attempts + 1} attempts over"
                f" {human_duration(now - entry.created)} (webhook max_age); last error: {error}"
            )
            await self._outbox.give_up(entry.seq, owner=self._owner, error=reason)
            self._dead(entry, reason)
            return
        delay = self._schedule[min(entry.attempts, len(self._schedule) - 1)]
        delay *= random.uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None:
            delay = max(delay, retry_after)
        # The last attempt is made at max_age, not a full delay after it.
        next_attempt = min(now + delay, deadline)
        await self._outbox.retry(
            entry.seq, owner=self._owner, next_attempt=next_attempt, error=error
        )

    def _dead(self, entry: OutboxEntry, reason: str) -> None:
        self.dead += 1
        log.warning(
            "webhook %s: event %s of message %s is dead: %s",
            entry.hook,
            entry.key,
            entry.msg_id,
            reason,
        )

    async def _post(
        self, hook: WebhookConfig, entry: OutboxEntry
    ) -> tuple[str | None, float | None]:
        """(None, None) when the application took it; else (what went wrong, Retry-After)."""
        assert self._session is not None, "run() creates the session"
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook.secret, entry.body, timestamp=int(self._clock())),
            EVENT_HEADER: _event_name(entry.body),
            EVENT_ID_HEADER: entry.key,
        }
        timeout = aiohttp.ClientTimeout(total=float(hook.timeout))
        try:
            async with self._session.post(
                hook.url,
                data=entry.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return None, None
                if 300 <= response.status < 400:
                    where = response.headers.get("Location", "?")
                    return (
                        f"HTTP {response.status} redirect to {where} (redirects are not"
                        " followed: set the webhook's url to where it points)"
                    ), None
                text = (await response.content.read(200)).decode("utf-8", "replace")
                said = " ".join(text.split())
                error = f"HTTP {response.status}" + (f": {said}" if said else "")
                return error, _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            return f"no answer within {float(hook.timeout):g}s", None
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}", None


def _event_name(body: bytes) -> str:
    try:
        return str(json.loads(body).get("event", ""))
    except (ValueError, AttributeError):
        return ""


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored), at most a day."""
    if value is None or not (value.strip().isascii() and value.strip().isdigit()):
        return None
    return min(float(value.strip()), 86400.0)
