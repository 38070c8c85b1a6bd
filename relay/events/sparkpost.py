"""SparkPost's event webhooks, authenticated and read into ProviderEvents.

SparkPost does not sign its event batches. What proves a request came from our SparkPost
account is a credential only SparkPost was given: HTTP Basic (the webhook's `auth_type`
basic, Settings `user`/`password`) and/or a shared token in the `X-MessageSystems-Webhook-
Token` header (Settings `token`). Every credential configured must be present and right.

A POST is a JSON array of `{"msys": {"<class>_event": {"type": ..., ...}}}`; the test
ping SparkPost sends when a webhook is created is `[{"msys": {}}]` (200, no events).
What the types mean here:
- `injection` → processed; `delivery` → delivered; `delay` → deferred (SparkPost retries).
- `bounce` (in-band) and `out_of_band` → bounced, hard for bounce classes 10 (invalid
  recipient), 30 (no RCPT, generic) and 90 (unsubscribe), soft for every other class
  (20-24 soft/DNS/mailbox full/too large/timeout, 25 admin, 40 generic, 50-54 blocks and
  spam filters at the mailbox provider, 60 auto-reply, 70 transient, 100 challenge).
- `policy_rejection`, `generation_failure`, `generation_rejection` → rejected by SparkPost
  itself, the provider's fault (re-sent elsewhere), except a policy rejection of an
  address on SparkPost's suppression list: that address bounced or complained before, so
  it is not re-sent through another provider.
- `spam_complaint` → complained; `list_unsubscribe`, `link_unsubscribe` → unsubscribed.
- opens, clicks, relay (inbound) events and anything else: skipped.

The provider id is the transmission id (what the send API returned as `results.id`); the
relay id is `rcpt_meta.relay_id`, the transmission metadata the upstream set
(relay.upstreams.sparkpost), which SparkPost merges into each recipient's `rcpt_meta`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from relay.config import Secret
from relay.events.base import (
    Malformed,
    Unauthenticated,
    WebhookContext,
    WebhookRequest,
    WebhookResult,
)
from relay.events.model import EventName, ProviderEvent
from relay.events.verify import (
    basic_credentials,
    epoch,
    equal,
    hashed_key,
    header,
    load_json,
)

if TYPE_CHECKING:
    from relay.config import UpstreamConfig

TOKEN_HEADER = "X-MessageSystems-Webhook-Token"

#: Bounce classes that say the address itself is bad (SparkPost's bounce classification).
HARD_BOUNCE_CLASSES = frozenset({10, 30, 90})

_SIMPLE: dict[str, EventName] = {
    "injection": "processed",
    "delivery": "delivered",
    "delay": "deferred",
    "spam_complaint": "complained",
    "list_unsubscribe": "unsubscribed",
    "link_unsubscribe": "unsubscribed",
}
_BOUNCES = frozenset({"bounce", "out_of_band"})
_REJECTIONS = frozenset({"policy_rejection", "generation_failure", "generation_rejection"})
# SparkPost's reason for a recipient on its suppression list ("... was suppressed due to
# customer policy").
_SUPPRESSED = re.compile(r"\bsuppress", re.IGNORECASE)


@dataclass(frozen=True)
class SparkPostWebhookSettings:
    """`webhook = {...}` of a SparkPost upstream with `events = true`: the credentials set
    on the SparkPost webhook (Basic auth, and/or a token sent as a custom header)."""

    user: Secret = Secret("")
    password: Secret = Secret("")
    token: Secret = Secret("")

    def validate(self) -> None:
        if bool(self.user) != bool(self.password):
            raise ValueError(
                "user and password go together (the webhook's Basic authentication):"
                " set both, or neither and a token"
            )
        if not self.user and not self.token:
            raise ValueError(
                "SparkPost does not sign its webhooks, so a credential is required: set"
                " user and password (auth_type basic on the SparkPost webhook), or token"
                f" (sent by SparkPost as the custom header {TOKEN_HEADER})"
            )


class SparkPostWebhook:
    """POST /webhooks/<upstream> for a SparkPost upstream."""

    Settings = SparkPostWebhookSettings

    def __init__(self, name: str, *, user: str = "", password: str = "", token: str = "") -> None:
        self.name = name
        self.user = user
        self.password = password
        self.token = token

    @classmethod
    def from_config(
        cls, upstream: UpstreamConfig, settings: SparkPostWebhookSettings, context: WebhookContext
    ) -> SparkPostWebhook:
        return cls(
            upstream.name, user=settings.user, password=settings.password, token=settings.token
        )

    async def handle(self, request: WebhookRequest) -> WebhookResult:
        self._authenticate(request)
        batch = load_json(request.body)
        if not isinstance(batch, list):
            raise Malformed('expected SparkPost\'s JSON array of {"msys": {...}} objects')
        events: list[ProviderEvent] = []
        for index, item in enumerate(batch):
            msys = item.get("msys") if isinstance(item, dict) else None
            if not isinstance(msys, dict):
                raise Malformed(f"item {index} is not an object with an 'msys' object")
            for payload in msys.values():  # one "<class>_event" per item; {} is the ping
                if not isinstance(payload, dict):
                    raise Malformed(f"item {index}: the event is not an object")
                event = read_event(payload, index)
                if event is not None:
                    events.append(event)
        return WebhookResult(events=events)

    def _authenticate(self, request: WebhookRequest) -> None:
        """Check every configured credential, each in constant time, before reading."""
        failures: list[str] = []
        if self.user:
            given = basic_credentials(request.headers)
            if given is None:
                failures.append("no HTTP Basic credentials (auth_type basic on the webhook)")
            else:
                user_ok = equal(given[0], self.user)
                password_ok = equal(given[1], self.password)
                if not (user_ok and password_ok):
                    failures.append("the HTTP Basic credentials do not match webhook.user/password")
        if self.token:
            sent = header(request.headers, TOKEN_HEADER)
            if sent is None:
                failures.append(f"no {TOKEN_HEADER} header")
            elif not equal(sent, self.token):
                failures.append(f"the {TOKEN_HEADER} header does not match webhook.token")
        if failures:
            raise Unauthenticated("; ".join(failures))

    async def close(self) -> None:
        """Nothing to release: authentication needs no connections."""


def read_event(payload: dict[str, Any], index: int) -> ProviderEvent | None:
    """The normalised event of one SparkPost event object, or None for one that is not
    about delivery (opens, clicks, inbound relay events)."""
    kind = payload.get("type")
    if not isinstance(kind, str) or not kind:
        raise Malformed(f"item {index}: the event has no 'type'")
    bounce: Literal["hard", "soft"] | None = None
    provider_fault = False
    bounce_class = _bounce_class(payload.get("bounce_class"))
    reason = _text(payload, "raw_reason") or _text(payload, "reason") or ""
    provider_event = kind
    name: EventName
    if kind in _SIMPLE:
        name = _SIMPLE[kind]
    elif kind in _BOUNCES:
        name = "bounced"
        bounce = "hard" if bounce_class in HARD_BOUNCE_CLASSES else "soft"
        if bounce_class is not None:
            provider_event = f"{kind}/{bounce_class}"
    elif kind in _REJECTIONS:
        name = "rejected"
        provider_fault = not (kind == "policy_rejection" and _SUPPRESSED.search(reason))
    else:
        return None
    recipient = _text(payload, "raw_rcpt_to") or _text(payload, "rcpt_to")
    if recipient is None:
        raise Malformed(f"item {index}: the {kind} event has no 'rcpt_to'")
    at = epoch(payload.get("timestamp"), what=f"item {index}: timestamp")
    provider_id = _text(payload, "transmission_id")
    event_id = _text(payload, "event_id")
    return ProviderEvent(
        event=name,
        recipient=recipient,
        key=(
            f"sparkpost:{event_id}"
            if event_id
            else hashed_key("sparkpost", kind, at, recipient, provider_id)
        ),
        at=at,
        provider_event=provider_event,
        relay_id=_relay_id(payload),
        provider_id=provider_id,
        bounce=bounce,
        reason=" ".join(reason.split()),
        provider_fault=provider_fault,
        sender=_text(payload, "msg_from"),
    )


def _bounce_class(value: object) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _relay_id(payload: dict[str, Any]) -> str | None:
    for field in ("rcpt_meta", "metadata"):
        meta = payload.get(field)
        value = meta.get("relay_id") if isinstance(meta, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def _text(payload: dict[str, Any], field: str) -> str | None:
    value = payload.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # ids are decimal strings, but a number must not be dropped
    return value if isinstance(value, str) and value else None
