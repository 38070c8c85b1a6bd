"""Amazon SES event publishing (a configuration set's event destination), read into
ProviderEvents.

SES posts nothing itself; its events reach the relay in one of two forms, told apart by
the body:

- **SNS-wrapped** (an SNS topic as the event destination, subscribed over https): an SNS
  message with `Type` and `Signature`, verified exactly as `/inbound/sns` verifies
  (relay.inbound.sns: topic allowlist, certificate host, SignatureVersion 1/2, age). Its
  `Message` is the SES event. A SubscriptionConfirmation is confirmed by visiting its
  (host-checked) SubscribeURL.
- **raw**: the SES event JSON itself, as SNS raw message delivery or an EventBridge API
  destination post it (EventBridge wraps it in `detail`). Nothing in such a body can be
  verified, so it is taken only with HTTP Basic credentials configured (`user`,
  `password`) and sent, compared in constant time.

The SES event carries `eventType` (configuration sets) or `notificationType` (the older
identity notifications); both are read. Each recipient is one event, keyed
`ses:<feedbackId or messageId>:<event>:<recipient>`, which stays the same when SNS
redelivers the notification. Our message id comes back in the `relay_id` message tag the
SES upstream sets; the provider id is SES's `mail.messageId`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any, Final, Literal

from relay.config import Duration, TokenSecret, UpstreamConfig
from relay.events.base import (
    Forbidden,
    Malformed,
    Unauthenticated,
    Unavailable,
    WebhookContext,
    WebhookError,
    WebhookRequest,
    WebhookResult,
)
from relay.events.model import EventName, ProviderEvent
from relay.events.verify import (
    check_basic_auth,
    epoch,
    load_json,
    optional_string,
    required_string,
)
from relay.inbound.sns import SNSError, SNSMalformed, SNSMessage, SNSUnavailable, SNSVerifier

log = logging.getLogger("relay.events")

#: The message tag the SES upstream puts our message id in (relay.upstreams.ses).
RELAY_ID_TAG: Final = "relay_id"

_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]{1,256}")

#: SES event types that are about delivery; the rest (Open, Click, Subscription, an
#: identity's setup notice) are skipped. Configuration sets write "Rendering Failure".
_KNOWN: Final = frozenset(
    {
        "Bounce",
        "Complaint",
        "Delivery",
        "Reject",
        "DeliveryDelay",
        "Send",
        "RenderingFailure",
        "Rendering Failure",
    }
)


@dataclass(frozen=True)
class SESWebhookSettings:
    """`[[upstream]] webhook = {...}` of an SES upstream with `events = true`."""

    # The SNS topics of the configuration set's event destination (required for the
    # SNS-wrapped form: a valid signature only proves *some* account's topic sent it).
    topics: tuple[str, ...] = ()
    # SNS messages older than this are refused (replays).
    max_age: Duration = Duration(3600.0)
    # HTTP Basic credentials for the raw form (SNS raw delivery, EventBridge).
    user: str = ""
    password: TokenSecret = TokenSecret("")

    def validate(self) -> None:
        if not self.topics and not self.user:
            raise ValueError(
                'nothing could ever be accepted: set topics = ["arn:aws:sns:..."] (the SNS'
                " topic of the configuration set's event destination) and/or user and"
                " password (HTTP Basic, for raw events from SNS raw delivery or EventBridge)"
            )
        if bool(self.user) != bool(self.password):
            raise ValueError("user and password go together (HTTP Basic for raw events)")
        for topic in self.topics:
            if not _TOPIC_ARN.fullmatch(topic):
                raise ValueError(f"topics: {topic!r} is not an SNS topic ARN")


class SESWebhook:
    """Verifies and reads one SES upstream's event notifications."""

    Settings = SESWebhookSettings

    def __init__(
        self,
        name: str,
        *,
        verifier: SNSVerifier,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.name = name
        self.verifier = verifier
        self.credentials = credentials

    @classmethod
    def from_config(
        cls, upstream: UpstreamConfig, settings: SESWebhookSettings, context: WebhookContext
    ) -> SESWebhook:
        verifier = SNSVerifier(
            topics=settings.topics,
            fetcher=context.fetch,  # None: the verifier's own HTTPSFetcher
            max_age=float(settings.max_age),
            clock=context.clock,
        )
        credentials = (settings.user, str(settings.password)) if settings.user else None
        return cls(upstream.name, verifier=verifier, credentials=credentials)

    async def close(self) -> None:
        await self.verifier.close()

    async def handle(self, request: WebhookRequest) -> WebhookResult:
        doc = load_json(request.body)
        if not isinstance(doc, dict):
            raise Malformed("an SES event (or the SNS message carrying it) is a JSON object")
        if "Type" in doc:
            return await self._sns(request.body, doc)
        if self.credentials is None:
            raise Unauthenticated(
                "an unsigned (raw) SES event, and no credentials are configured to accept it:"
                " set user and password (env:/file:) in this upstream's webhook settings and"
                " put them in the destination URL, or deliver the events through an SNS"
                " topic listed in topics"
            )
        check_basic_auth(request.headers, user=self.credentials[0], password=self.credentials[1])
        return WebhookResult(events=read_event(_unwrap_eventbridge(doc)))

    async def _sns(self, body: bytes, doc: Mapping[str, Any]) -> WebhookResult:
        topic = doc.get("TopicArn")
        if isinstance(topic, str) and topic not in self.verifier.topics:
            if not self.verifier.topics:
                raise Forbidden(
                    f"an SNS message from {topic}, but no topics are allowed: add it to"
                    f" topics in upstream {self.name!r}'s webhook settings"
                )
            raise Forbidden(f"SNS topic {topic} is not in upstream {self.name!r}'s topics")
        try:
            msg = await self.verifier.verify(body)
            if msg.type == "SubscriptionConfirmation":
                await self.verifier.confirm_subscription(msg)
                return WebhookResult(answer={"status": "confirmed", "topic": msg.topic_arn})
        except SNSError as exc:
            raise _webhook_error(exc) from None
        if msg.type == "UnsubscribeConfirmation":
            log.info("sns unsubscribe confirmation for %s ignored", msg.topic_arn)
            return WebhookResult(answer={"status": "ignored", "topic": msg.topic_arn})
        return WebhookResult(events=read_event(_message(msg)))


def _webhook_error(exc: SNSError) -> WebhookError:
    if isinstance(exc, SNSMalformed):
        return Malformed(exc.reason)
    if isinstance(exc, SNSUnavailable):
        return Unavailable(exc.reason)
    return Unauthenticated(exc.reason)  # signature, age, certificate URL


def _message(msg: SNSMessage) -> Any:
    return load_json(msg.message.encode("utf-8", "surrogatepass"), what="the SNS Message")


def _unwrap_eventbridge(doc: Mapping[str, Any]) -> Any:
    """An EventBridge event from SES carries the SES event in `detail`."""
    if doc.get("source") == "aws.ses" and isinstance(doc.get("detail"), dict):
        return doc["detail"]
    return doc


def read_event(doc: Any) -> list[ProviderEvent]:
    """The ProviderEvents of one SES event (one per recipient); [] for a type skipped."""
    if not isinstance(doc, dict):
        raise Malformed("an SES event is a JSON object")
    kind = doc.get("eventType", doc.get("notificationType"))
    if not isinstance(kind, str):
        raise Malformed("an SES event has eventType (or notificationType)")
    if kind not in _KNOWN:
        log.debug("ses event %r skipped (not a delivery event)", kind)
        return []
    mail = _object(doc, "mail", kind)
    reader = _Reader(kind, mail)
    if kind == "Bounce":
        return reader.bounce(_object(doc, "bounce", kind))
    if kind == "Complaint":
        return reader.complaint(_object(doc, "complaint", kind))
    if kind == "Delivery":
        return reader.delivery(_object(doc, "delivery", kind))
    if kind == "DeliveryDelay":
        return reader.delay(_object(doc, "deliveryDelay", kind))
    if kind == "Send":
        return reader.each_destination("processed", kind, reason="")
    if kind == "Reject":
        reject = _object(doc, "reject", kind)
        return reader.each_destination(
            "rejected",
            kind,
            reason=optional_string(reject, "reason", kind) or "",
            provider_fault=True,
        )
    failure = _object(doc, "failure", kind)  # Rendering Failure
    reason = optional_string(failure, "errorMessage", kind) or ""
    template = optional_string(failure, "templateName", kind)
    if template:
        reason = f"{reason} (template {template})" if reason else f"template {template}"
    return reader.each_destination("rejected", "RenderingFailure", reason, provider_fault=True)


class _Reader:
    """What every event of one SES notification shares: its `mail` object."""

    def __init__(self, kind: str, mail: Mapping[str, Any]) -> None:
        self.kind = kind
        self.message_id = required_string(mail, "messageId", f"{kind} mail")
        self.sent_at = epoch(mail.get("timestamp"), what=f"{kind} mail.timestamp")
        # `source` is the envelope sender, sometimes written with a display name.
        source = optional_string(mail, "source", f"{kind} mail")
        self.sender = (parseaddr(source)[1] or None) if source else None
        self.destination = _addresses(mail.get("destination", []), f"{kind} mail.destination")
        self.relay_id = _relay_id(mail.get("tags"))

    def event(
        self,
        event: EventName,
        recipient: str,
        *,
        key_id: str,
        at: float,
        provider_event: str,
        reason: str,
        bounce: Literal["hard", "soft"] | None = None,
        provider_fault: bool = False,
        key_suffix: str = "",
    ) -> ProviderEvent:
        name = self.kind.replace(" ", "").lower()
        return ProviderEvent(
            event=event,
            recipient=recipient,
            key=f"ses:{key_id}:{name}:{recipient}{key_suffix}",
            at=at,
            provider_event=provider_event,
            relay_id=self.relay_id,
            provider_id=self.message_id,
            bounce=bounce,
            reason=reason,
            provider_fault=provider_fault,
            sender=self.sender,
        )

    def bounce(self, bounce: Mapping[str, Any]) -> list[ProviderEvent]:
        where = "Bounce bounce"
        bounce_type = required_string(bounce, "bounceType", where)
        sub_type = optional_string(bounce, "bounceSubType", where) or ""
        key_id = optional_string(bounce, "feedbackId", where) or self.message_id
        at = self._at(bounce, where)
        severity: Literal["hard", "soft"] = "hard" if bounce_type == "Permanent" else "soft"
        events = []
        for i, rcpt in enumerate(_list(bounce, "bouncedRecipients", where)):
            item = f"{where}.bouncedRecipients[{i}]"
            if not isinstance(rcpt, dict):
                raise Malformed(f"{item} is not an object")
            address = required_string(rcpt, "emailAddress", item)
            diagnostic = optional_string(rcpt, "diagnosticCode", item)
            events.append(
                self.event(
                    "bounced",
                    address,
                    key_id=key_id,
                    at=at,
                    provider_event=f"Bounce/{bounce_type}" + (f"/{sub_type}" if sub_type else ""),
                    reason=diagnostic or f"{bounce_type} bounce ({sub_type or 'no detail'})",
                    bounce=severity,
                )
            )
        return events

    def complaint(self, complaint: Mapping[str, Any]) -> list[ProviderEvent]:
        where = "Complaint complaint"
        key_id = optional_string(complaint, "feedbackId", where) or self.message_id
        at = self._at(complaint, where)
        feedback_type = optional_string(complaint, "complaintFeedbackType", where) or ""
        events = []
        for i, rcpt in enumerate(_list(complaint, "complainedRecipients", where)):
            item = f"{where}.complainedRecipients[{i}]"
            if not isinstance(rcpt, dict):
                raise Malformed(f"{item} is not an object")
            events.append(
                self.event(
                    "complained",
                    required_string(rcpt, "emailAddress", item),
                    key_id=key_id,
                    at=at,
                    provider_event="Complaint" + (f"/{feedback_type}" if feedback_type else ""),
                    reason=feedback_type,
                )
            )
        return events

    def delivery(self, delivery: Mapping[str, Any]) -> list[ProviderEvent]:
        where = "Delivery delivery"
        at = self._at(delivery, where)
        response = optional_string(delivery, "smtpResponse", where) or ""
        recipients = _addresses(delivery.get("recipients"), f"{where}.recipients")
        return [
            self.event(
                "delivered",
                address,
                key_id=self.message_id,
                at=at,
                provider_event="Delivery",
                reason=response,
            )
            for address in recipients
        ]

    def delay(self, delay: Mapping[str, Any]) -> list[ProviderEvent]:
        where = "DeliveryDelay deliveryDelay"
        at = self._at(delay, where)
        delay_type = optional_string(delay, "delayType", where) or ""
        events = []
        for i, rcpt in enumerate(_list(delay, "delayedRecipients", where)):
            item = f"{where}.delayedRecipients[{i}]"
            if not isinstance(rcpt, dict):
                raise Malformed(f"{item} is not an object")
            diagnostic = optional_string(rcpt, "diagnosticCode", item)
            events.append(
                self.event(
                    "deferred",
                    required_string(rcpt, "emailAddress", item),
                    key_id=self.message_id,
                    at=at,
                    provider_event="DeliveryDelay" + (f"/{delay_type}" if delay_type else ""),
                    reason=diagnostic or delay_type,
                    # SES may report a recipient's delay more than once: each is an event.
                    key_suffix=f":{at:.3f}",
                )
            )
        return events

    def each_destination(
        self, event: EventName, provider_event: str, reason: str, *, provider_fault: bool = False
    ) -> list[ProviderEvent]:
        """Send, Reject and Rendering Failure concern the message: every recipient."""
        return [
            self.event(
                event,
                address,
                key_id=self.message_id,
                at=self.sent_at,
                provider_event=provider_event,
                reason=reason,
                provider_fault=provider_fault,
            )
            for address in self.destination
        ]

    def _at(self, part: Mapping[str, Any], where: str) -> float:
        if part.get("timestamp") is None:
            return self.sent_at
        return epoch(part["timestamp"], what=f"{where}.timestamp")


def _relay_id(tags: object) -> str | None:
    """`mail.tags` is {name: [values]}; our id is the first value of `relay_id`."""
    if not isinstance(tags, dict):
        return None
    values = tags.get(RELAY_ID_TAG)
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


def _object(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise Malformed(f"{where}: {key!r} is missing or not an object")
    return value


def _list(doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise Malformed(f"{where}: {key!r} is missing or not a list")
    return value


def _addresses(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
        raise Malformed(f"{where} is not a list of addresses")
    return list(_unique(value))


def _unique(items: Iterable[str]) -> Iterable[str]:
    seen: set[str] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item
