"""The one event model every provider's webhook is read into (django-anymail's idea)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relay.message import EventType

EventName = Literal[
    "processed",
    "delivered",
    "deferred",
    "bounced",
    "complained",
    "dropped",
    "rejected",
    "unsubscribed",
]

#: The timeline type of each event (the relay's own retry is `deferred` there, so a
#: provider's deferral is `delayed`).
TIMELINE_TYPE: dict[str, EventType] = {
    "processed": EventType.PROCESSED,
    "delivered": EventType.DELIVERED,
    "deferred": EventType.DELAYED,
    "bounced": EventType.BOUNCED,
    "complained": EventType.COMPLAINED,
    "dropped": EventType.DROPPED,
    "rejected": EventType.REJECTED,
    "unsubscribed": EventType.UNSUBSCRIBED,
}

#: The recipient status an event leaves (relay.queue.base.STATUS_RANK); None: no change.
STATUS_OF: dict[str, str | None] = {
    "processed": None,
    "delivered": "delivered",
    "deferred": "delayed",
    "bounced": "bounced",
    "complained": "complained",
    "dropped": "dropped",
    "rejected": "rejected",
    "unsubscribed": "unsubscribed",
}


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One thing a provider reports about one recipient of one message.

    `key` must be the same every time the provider sends this event again (its event id,
    or a hash of the event's identifying fields when it has none), prefixed with the
    provider type ("sendgrid:..."), so retried deliveries add one event.
    """

    event: EventName
    recipient: str
    key: str
    at: float  # when it happened at the provider (epoch seconds)
    provider_event: str  # the provider's own name: "Bounce/Permanent", "spamreport"
    relay_id: str | None = None  # our message id, when the provider echoes it back
    provider_id: str | None = None  # the provider's message id
    bounce: Literal["hard", "soft"] | None = None  # for "bounced"
    reason: str = ""  # the provider's diagnostic, as given
    # Dropped or rejected for the provider's own reason (not the recipient's): the
    # recipient is re-sent through another upstream.
    provider_fault: bool = False
    sender: str | None = None  # the envelope sender, when the event carries it


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """What an application's webhook receives (relay.events.outbox), one POST each: the
    relay's own `sent`/`failed`/`requeued` and the providers' normalised events."""

    id: str  # stable: the same event posted again carries the same id (de-duplication)
    event: str  # one of relay.config.WEBHOOK_EVENTS
    message_id: str
    at: float
    recipient: str | None = None
    upstream: str | None = None
    reason: str = ""
    detail: dict[str, object] | None = None  # bounce type, provider id, provider's name
