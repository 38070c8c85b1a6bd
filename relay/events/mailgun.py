"""Mailgun's event webhooks (the current JSON form), verified and read into ProviderEvents.

One POST carries one event: {"signature": {"timestamp", "token", "signature"},
"event-data": {...}}. The signature is HMAC-SHA256, keyed with the domain's *HTTP webhook
signing key* (not the API key), over the timestamp and token concatenated, sent as hex.
A valid signature does not make a request fresh: the timestamp must be recent and each
token is taken once (`WebhookContext.first_use`), so a captured request cannot be played
again. The legacy form-encoded webhooks are not read.

What Mailgun's events mean here:
- `accepted` → processed; `delivered` → delivered; `complained`, `unsubscribed` as named.
- `failed` with severity `temporary` → deferred: Mailgun keeps retrying by itself, and
  reports `failed`/`permanent` when it gives up.
- `failed`/`permanent` is a bounce. Hard when the recipient's server answered 5xx, or when
  Mailgun did not even try because the address is on its own suppression lists (reasons
  `suppress-bounce`, `suppress-complaint`, `suppress-unsubscribe`: the recipient's
  standing, whichever provider sends). Soft when Mailgun gave up on temporary failures
  (reason `old`, or a 4xx code): nothing says the address is bad. With no SMTP code at
  all, Mailgun never handed the message to the recipient's server for reasons of its own:
  that is `dropped` with `provider_fault`, so the recipient is re-sent elsewhere.
- `opened`, `clicked` and anything else are not delivery events: skipped.

The provider id is the Message-ID Mailgun assigned (what its send API returned, without
angle brackets); the relay id is the `v:relay_id` variable the upstream set
(relay.upstreams.mailgun), found in `user-variables`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from relay.config import Duration, Secret
from relay.events.base import (
    Malformed,
    Unauthenticated,
    WebhookContext,
    WebhookRequest,
    WebhookResult,
)
from relay.events.model import EventName, ProviderEvent
from relay.events.verify import check_fresh, epoch, equal, hashed_key, hmac_sha256_hex, load_json

if TYPE_CHECKING:
    from relay.config import UpstreamConfig

Bounce = Literal["hard", "soft"]

#: Failure reasons meaning Mailgun did not send because of its suppression lists.
SUPPRESSED_REASONS = frozenset({"suppress-bounce", "suppress-complaint", "suppress-unsubscribe"})

_SIMPLE: dict[str, EventName] = {
    "accepted": "processed",
    "delivered": "delivered",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
}


@dataclass(frozen=True)
class MailgunWebhookSettings:
    """`webhook = {...}` of a Mailgun upstream with `events = true`."""

    # Sending → Webhooks → "HTTP webhook signing key" in Mailgun's control panel.
    signing_key: Secret
    # How old a signed timestamp may be; Mailgun signs each request when it sends it.
    max_age: Duration = Duration(600.0)

    def validate(self) -> None:
        if not self.signing_key:
            raise ValueError(
                "signing_key is empty: give the HTTP webhook signing key from Mailgun's"
                " Sending → Webhooks page (env:NAME or file:PATH)"
            )
        if self.max_age <= 0:
            raise ValueError("max_age must be a positive duration such as 10m")


class MailgunWebhook:
    """POST /webhooks/<upstream> for a Mailgun upstream."""

    Settings = MailgunWebhookSettings

    def __init__(
        self, name: str, *, signing_key: str, max_age: float, context: WebhookContext
    ) -> None:
        self.name = name
        self.signing_key = signing_key
        self.max_age = max_age
        self.context = context

    @classmethod
    def from_config(
        cls, upstream: UpstreamConfig, settings: MailgunWebhookSettings, context: WebhookContext
    ) -> MailgunWebhook:
        return cls(
            upstream.name,
            signing_key=settings.signing_key,
            max_age=float(settings.max_age),
            context=context,
        )

    async def handle(self, request: WebhookRequest) -> WebhookResult:
        doc = load_json(request.body)
        if not isinstance(doc, dict) or not isinstance(doc.get("signature"), dict):
            raise Malformed(
                "expected Mailgun's JSON webhook body with a 'signature' object (legacy"
                " form-encoded webhooks are not read: re-create the webhook in Mailgun)"
            )
        nonce = await self._verify(doc["signature"])
        data = doc.get("event-data")
        if not isinstance(data, dict):
            raise Malformed("'event-data' is missing or not an object")
        event = read_event(data)
        return WebhookResult(events=[event] if event is not None else [], nonce=nonce)

    async def _verify(self, signature: dict[str, Any]) -> str:
        """The replay-guard key the request took, once everything about it checks out."""
        timestamp = signature.get("timestamp")
        if isinstance(timestamp, int) and not isinstance(timestamp, bool):
            timestamp = str(timestamp)
        token, digest = signature.get("token"), signature.get("signature")
        if not (isinstance(timestamp, str) and isinstance(token, str) and isinstance(digest, str)):
            raise Malformed("'signature' needs string 'timestamp', 'token' and 'signature'")
        expected = hmac_sha256_hex(self.signing_key, timestamp + token)
        if not equal(digest.lower(), expected):
            raise Unauthenticated(
                "the signature does not verify: webhook.signing_key must be the domain's"
                " HTTP webhook signing key (not the API key)"
            )
        try:
            sent_at = float(timestamp)
        except ValueError:
            sent_at = math.nan
        if not math.isfinite(sent_at):
            raise Malformed(f"signature timestamp {timestamp!r} is not epoch seconds")
        now = self.context.clock()
        check_fresh(sent_at, now=now, max_age=self.max_age, what="the signature's timestamp")
        nonce = f"mailgun:{token}"
        if not await self.context.first_use(nonce, now=now, expires=sent_at + self.max_age):
            raise Unauthenticated("this signature token was used before: a replayed request")
        return nonce

    async def close(self) -> None:
        """Nothing to release: verification needs no connections."""


def read_event(data: dict[str, Any]) -> ProviderEvent | None:
    """The normalised event of one `event-data`, or None for one that is not about
    delivery (opens, clicks, list events)."""
    kind = data.get("event")
    if not isinstance(kind, str) or not kind:
        raise Malformed("event-data has no 'event'")
    code = _code(data.get("delivery-status"))
    severity = _text(data, "severity") or ""
    label = _text(data, "reason") or ""
    name: EventName
    bounce: Bounce | None = None
    provider_fault = False
    if kind in _SIMPLE:
        name = _SIMPLE[kind]
    elif kind == "failed" and severity == "temporary":
        name = "deferred"
    elif kind == "failed" and severity == "permanent":
        name, bounce, provider_fault = _permanent_failure(label, code)
    elif kind == "failed":
        raise Malformed(f"a failed event needs severity temporary or permanent, got {severity!r}")
    else:
        return None
    recipient = data.get("recipient")
    if not isinstance(recipient, str) or not recipient:
        raise Malformed(f"the {kind} event has no 'recipient'")
    at = epoch(data.get("timestamp"), what="event-data timestamp")
    provider_id = _message_id(data.get("message"))
    event_id = data.get("id")
    key = (
        f"mailgun:{event_id}"
        if isinstance(event_id, str) and event_id
        else hashed_key("mailgun", kind, severity, at, recipient, provider_id)
    )
    return ProviderEvent(
        event=name,
        recipient=recipient,
        key=key,
        at=at,
        provider_event="/".join(p for p in (kind, severity, label) if p),
        relay_id=_relay_id(data.get("user-variables")),
        provider_id=provider_id,
        bounce=bounce,
        reason=_reason(data.get("delivery-status"), code, label),
        provider_fault=provider_fault,
        sender=_text(data.get("envelope"), "sender"),
    )


def _permanent_failure(label: str, code: int | None) -> tuple[EventName, Bounce | None, bool]:
    """(event, bounce, provider_fault) of a `failed`/`permanent` event (module docstring)."""
    if label in SUPPRESSED_REASONS or (code is not None and 500 <= code <= 599):
        return "bounced", "hard", False
    if label == "old" or (code is not None and 400 <= code <= 499):
        return "bounced", "soft", False
    return "dropped", None, True


def _code(status: object) -> int | None:
    """The SMTP reply code of `delivery-status`, None when there is none (0 or absent)."""
    value = status.get("code") if isinstance(status, dict) else None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 200 <= value <= 599:
        return value
    return None


def _reason(status: object, code: int | None, label: str) -> str:
    """The diagnostic as Mailgun gave it: the SMTP reply when there was one."""
    text = ""
    if isinstance(status, dict):
        for field in ("message", "description"):
            value = status.get(field)
            if isinstance(value, str) and value.strip():
                text = " ".join(value.split())
                break
    if code is not None and text and not text.startswith(str(code)):
        text = f"{code} {text}"
    return text or label


def _message_id(message: object) -> str | None:
    headers = message.get("headers") if isinstance(message, dict) else None
    value = headers.get("message-id") if isinstance(headers, dict) else None
    return value.strip().strip("<>") or None if isinstance(value, str) else None


def _relay_id(variables: object) -> str | None:
    value = variables.get("relay_id") if isinstance(variables, dict) else None
    return value if isinstance(value, str) and value else None


def _text(table: object, field: str) -> str | None:
    value = table.get(field) if isinstance(table, dict) else None
    return value if isinstance(value, str) and value else None
