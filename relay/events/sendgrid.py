"""SendGrid's Event Webhook: a signed JSON array of events, read into ProviderEvents.

Verification is SendGrid's "Signed Event Webhook": the request carries
`X-Twilio-Email-Event-Webhook-Signature` (base64 of a DER ECDSA signature) and
`X-Twilio-Email-Event-Webhook-Timestamp`; the signature is ECDSA P-256 with SHA-256 over
the timestamp's text followed by the raw body bytes, checked with the public key SendGrid
shows in its mail settings (base64 of a DER SubjectPublicKeyInfo; PEM is taken too). The
body is read only after it verified, and a timestamp older than `max_age` (or too far
ahead) is refused, so a captured request cannot be replayed later; within that window,
a replay repeats events whose keys (`sendgrid:<sg_event_id>`) are already recorded.

Our message id comes back as the top-level `relay_id` key (SendGrid flattens the
`custom_args` the upstream sent into each event); the provider id is `sg_message_id` up
to its first ".", which is the `X-Message-Id` the send API answered with.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.config import Duration, Secret, UpstreamConfig
from relay.events.base import (
    Malformed,
    Unauthenticated,
    WebhookContext,
    WebhookRequest,
    WebhookResult,
)
from relay.events.model import EventName, ProviderEvent
from relay.events.verify import (
    check_fresh,
    epoch,
    header,
    load_json,
    optional_string,
    required_string,
)

log = logging.getLogger("relay.events")

SIGNATURE_HEADER: Final = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER: Final = "X-Twilio-Email-Event-Webhook-Timestamp"

#: SendGrid event → our event; those not here (open, click, group_resubscribe, ...) are
#: engagement, not delivery, and are skipped.
EVENTS: Final[Mapping[str, EventName]] = {
    "processed": "processed",
    "delivered": "delivered",
    "deferred": "deferred",
    "bounce": "bounced",
    "dropped": "dropped",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}

#: `dropped` reasons that are the recipient's doing: SendGrid would drop the address
#: anywhere, and so would any other provider. Every other reason ("Spam Content",
#: "Exceeded Limit", "Invalid SMTPAPI header", an account problem) is SendGrid's own, and
#: the recipient may go out through another upstream.
RECIPIENT_DROP_REASONS: Final = frozenset({"invalid", "invalid address", "invalid email"})
RECIPIENT_DROP_PREFIXES: Final = ("bounced address", "spam reporting address", "unsubscribed")


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 of DER SubjectPublicKeyInfo), or
    PEM. Raises ValueError saying what is wrong, for `relay check-config`."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(stripped.encode())
        else:
            der = base64.b64decode("".join(stripped.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError(
            "not a public key: paste the 'Verification Key' of SendGrid's Signed Event"
            f" Webhook (base64, as shown) or a PEM public key ({exc})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key, which SendGrid signs with")
    return key


@dataclass(frozen=True)
class SendGridWebhookSettings:
    """`[[upstream]] webhook = {...}` of a SendGrid upstream with `events = true`."""

    # Mail Settings → Signed Event Webhook Requests → Verification Key; env:/file:.
    public_key: Secret
    # Requests signed longer ago than this are refused (replays).
    max_age: Duration = Duration(600.0)

    def validate(self) -> None:
        if self.public_key.startswith(("env:", "file:")):
            return  # a command that leaves secrets unresolved: nothing to parse
        try:
            load_public_key(self.public_key)
        except ValueError as exc:
            raise ValueError(f"public_key: {exc}") from None


class SendGridWebhook:
    """Verifies and reads one SendGrid upstream's Event Webhook posts."""

    Settings = SendGridWebhookSettings

    def __init__(
        self,
        name: str,
        *,
        public_key: ec.EllipticCurvePublicKey,
        max_age: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.public_key = public_key
        self.max_age = max_age
        self.clock = clock

    @classmethod
    def from_config(
        cls, upstream: UpstreamConfig, settings: SendGridWebhookSettings, context: WebhookContext
    ) -> SendGridWebhook:
        return cls(
            upstream.name,
            public_key=load_public_key(settings.public_key),
            max_age=float(settings.max_age),
            clock=context.clock,
        )

    async def handle(self, request: WebhookRequest) -> WebhookResult:
        self.verify(request)
        return WebhookResult(events=read_events(load_json(request.body)))

    def verify(self, request: WebhookRequest) -> None:
        """Signature and timestamp, before anything in the body is looked at."""
        signature_b64 = header(request.headers, SIGNATURE_HEADER)
        timestamp = header(request.headers, TIMESTAMP_HEADER)
        if not signature_b64 or not timestamp:
            raise Unauthenticated(
                f"unsigned request: {SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required;"
                " turn on Signed Event Webhook Requests in SendGrid's mail settings"
            )
        try:
            signed_at = float(timestamp.strip())
        except ValueError:
            raise Unauthenticated(
                f"{TIMESTAMP_HEADER} {timestamp!r} is not epoch seconds"
            ) from None
        check_fresh(signed_at, now=self.clock(), max_age=self.max_age, what="the signed timestamp")
        try:
            signature = base64.b64decode(signature_b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise Unauthenticated(f"{SIGNATURE_HEADER} is not base64") from None
        try:
            self.public_key.verify(
                signature, timestamp.encode() + request.body, ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise Unauthenticated(
                "signature does not verify with the configured public_key (a forged request,"
                " or a key that is not this SendGrid account's current verification key)"
            ) from None

    async def close(self) -> None:
        return None


def read_events(doc: Any) -> list[ProviderEvent]:
    """The delivery events of a verified body; engagement and unknown events are skipped."""
    if not isinstance(doc, list):
        raise Malformed("a SendGrid event webhook body is a JSON array of events")
    events: list[ProviderEvent] = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise Malformed(f"event [{i}] is not a JSON object")
        name = item.get("event")
        if not isinstance(name, str):
            raise Malformed(f"event [{i}] has no 'event' name")
        ours = EVENTS.get(name)
        if ours is None:
            log.debug("sendgrid event %r skipped (not a delivery event)", name)
            continue
        events.append(_event(ours, name, item, f"event [{i}] ({name})"))
    return events


def _event(ours: EventName, name: str, item: Mapping[str, Any], where: str) -> ProviderEvent:
    email = required_string(item, "email", where)
    event_id = required_string(item, "sg_event_id", where)
    message_id = optional_string(item, "sg_message_id", where)
    relay_id = optional_string(item, "relay_id", where)
    reason = (
        optional_string(item, "reason", where) or optional_string(item, "response", where) or ""
    )
    bounce: Literal["hard", "soft"] | None = None
    provider_event = name
    provider_fault = False
    if name == "bounce":
        kind = optional_string(item, "type", where) or "bounce"
        bounce = "soft" if kind == "blocked" else "hard"
        provider_event = f"bounce/{kind}"
    elif name == "dropped":
        provider_fault = not _recipients_fault(reason)
    return ProviderEvent(
        event=ours,
        recipient=email,
        key=f"sendgrid:{event_id}",
        at=epoch(item.get("timestamp"), what=f"{where} timestamp"),
        provider_event=provider_event,
        relay_id=relay_id or None,
        provider_id=message_id.partition(".")[0] if message_id else None,
        bounce=bounce,
        reason=reason,
        provider_fault=provider_fault,
    )


def _recipients_fault(reason: str) -> bool:
    normalized = reason.strip().lower()
    return normalized in RECIPIENT_DROP_REASONS or normalized.startswith(RECIPIENT_DROP_PREFIXES)
