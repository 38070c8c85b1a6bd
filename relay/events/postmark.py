"""Postmark's webhooks, authenticated and read into ProviderEvents.

Postmark does not sign its webhooks; its documented protection is HTTP Basic credentials
in the webhook URL (https://user:password@host/webhooks/<upstream>), so Settings `user`
and `password` are required and every request must carry them.

One POST is one JSON object whose `RecordType` says what it is:
- `Delivery` → delivered.
- `Bounce`, by `Type`: HardBounce, BadEmailAddress and ManuallyDeactivated → bounced/hard;
  SpamNotification and SpamComplaint → complained; Unsubscribe (an unsubscribe request
  sent back by mail) → unsubscribed; AutoResponder, AddressChange, Subscribe,
  OpenRelayTest and ChallengeVerification are replies, not failures → skipped; every
  other type (SoftBounce, Transient, DnsError, Blocked, DMARCPolicy, Unknown, ...) →
  bounced/soft: nothing in it says the address is bad.
- `SpamComplaint` → complained.
- `SubscriptionChange` with SuppressSending true for a manual suppression (the recipient
  unsubscribed, or someone suppressed the address at Postmark) → unsubscribed. Postmark
  also sends one when it suppresses after a hard bounce or a complaint; the Bounce or
  SpamComplaint record already reports that, so it is skipped, as is a reactivation.
- `Open`, `Click` and anything else → skipped.

The provider id is the MessageID (what the send API returned); the relay id is
`Metadata.relay_id`, set by the upstream (relay.upstreams.postmark). Postmark sends no
event id: the key is the record type, the bounce ID (or MessageID) and the recipient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from relay.config import Secret
from relay.events.base import Malformed, WebhookContext, WebhookRequest, WebhookResult
from relay.events.model import EventName, ProviderEvent
from relay.events.verify import check_basic_auth, epoch, load_json

if TYPE_CHECKING:
    from relay.config import UpstreamConfig

Bounce = Literal["hard", "soft"]

#: Bounce types that say the address itself is bad.
HARD_BOUNCE_TYPES = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
#: Bounce types that are a reply from the recipient's side, not a failure to deliver.
NOT_A_FAILURE = frozenset(
    {"AutoResponder", "AddressChange", "Subscribe", "OpenRelayTest", "ChallengeVerification"}
)
_BOUNCE_AS: dict[str, EventName] = {
    "SpamNotification": "complained",
    "SpamComplaint": "complained",
    "Unsubscribe": "unsubscribed",
}
#: Where each record type keeps the recipient and the time.
_RECIPIENT = {"Delivery": "Recipient", "SubscriptionChange": "Recipient"}
_TIME = {"Delivery": "DeliveredAt", "SubscriptionChange": "ChangedAt"}


@dataclass(frozen=True)
class PostmarkWebhookSettings:
    """`webhook = {...}` of a Postmark upstream with `events = true`: the Basic
    credentials written into the webhook URL at Postmark."""

    user: Secret
    password: Secret

    def validate(self) -> None:
        for name in ("user", "password"):
            if not getattr(self, name):
                raise ValueError(
                    f"{name} is empty: Postmark does not sign webhooks, so the credentials"
                    " in the webhook URL (https://user:password@host/webhooks/<upstream>)"
                    " are what proves a request came from Postmark"
                )


class PostmarkWebhook:
    """POST /webhooks/<upstream> for a Postmark upstream."""

    Settings = PostmarkWebhookSettings

    def __init__(self, name: str, *, user: str, password: str) -> None:
        self.name = name
        self.user = user
        self.password = password

    @classmethod
    def from_config(
        cls, upstream: UpstreamConfig, settings: PostmarkWebhookSettings, context: WebhookContext
    ) -> PostmarkWebhook:
        return cls(upstream.name, user=settings.user, password=settings.password)

    async def handle(self, request: WebhookRequest) -> WebhookResult:
        check_basic_auth(request.headers, user=self.user, password=self.password)
        record = load_json(request.body)
        if not isinstance(record, dict):
            raise Malformed("expected one Postmark webhook object with a RecordType")
        event = read_record(record)
        return WebhookResult(events=[event] if event is not None else [])

    async def close(self) -> None:
        """Nothing to release: authentication needs no connections."""


def read_record(record: dict[str, Any]) -> ProviderEvent | None:
    """The normalised event of one Postmark record, or None for one that is not about
    delivery (opens, clicks, auto-replies, reactivations)."""
    kind = record.get("RecordType")
    if not isinstance(kind, str) or not kind:
        raise Malformed("the body has no RecordType")
    bounce_type = _text(record, "Type") or ""
    bounce: Bounce | None = None
    provider_event = kind
    name: EventName
    if kind == "Delivery":
        name = "delivered"
    elif kind == "SpamComplaint":
        name = "complained"
    elif kind == "Bounce":
        if not bounce_type:
            raise Malformed("a Bounce record needs its Type")
        if bounce_type in NOT_A_FAILURE:
            return None
        provider_event = f"Bounce/{bounce_type}"
        if bounce_type in _BOUNCE_AS:
            name = _BOUNCE_AS[bounce_type]
        else:
            name = "bounced"
            bounce = "hard" if bounce_type in HARD_BOUNCE_TYPES else "soft"
    elif kind == "SubscriptionChange":
        reason = _text(record, "SuppressionReason") or "ManualSuppression"
        if record.get("SuppressSending") is not True or reason != "ManualSuppression":
            return None
        name = "unsubscribed"
        provider_event = f"SubscriptionChange/{reason}"
    else:
        return None
    recipient = _text(record, _RECIPIENT.get(kind, "Email"))
    if recipient is None:
        raise Malformed(f"the {kind} record has no {_RECIPIENT.get(kind, 'Email')}")
    field = _TIME.get(kind, "BouncedAt")
    at = epoch(record.get(field), what=f"the {kind} record's {field}")
    provider_id = _text(record, "MessageID")
    return ProviderEvent(
        event=name,
        recipient=recipient,
        key=f"postmark:{kind}:{_text(record, 'ID') or provider_id}:{recipient}",
        at=at,
        provider_event=provider_event,
        relay_id=_relay_id(record.get("Metadata")),
        provider_id=provider_id,
        bounce=bounce,
        reason=_reason(record),
        sender=_text(record, "From"),
    )


def _reason(record: dict[str, Any]) -> str:
    """Postmark's diagnostic: the bounce's Details (the remote server's words) when there
    are some, else its Description of the bounce type."""
    for field in ("Details", "Description"):
        text = _text(record, field)
        if text:
            return " ".join(text.split())
    return ""


def _relay_id(metadata: object) -> str | None:
    value = metadata.get("relay_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


def _text(record: dict[str, Any], field: str) -> str | None:
    value = record.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # bounce IDs are numbers
    return value if isinstance(value, str) and value else None
