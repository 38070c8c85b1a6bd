"""Turn inbound notifications into units of work: which S3 object, for whom, with what verdicts.

Three shapes arrive, through SNS (verified by `sns.py`) or SQS, and this module accepts all
of them so the web handler and the SQS consumer share one parser:

- an SES "Received" notification for a receipt rule with an S3 action: `receipt.action`
  holds `bucketName` and `objectKey`; `receipt.recipients` holds the envelope recipients
  (RCPT TO that matched the rule -- not the headers, which may omit Bcc); `mail.messageId`
  identifies the message across SNS retries and SQS redeliveries;
- an S3 event notification (`Records[]`, `eventSource` "aws:s3"): keys are form-encoded
  (`+` for spaces); it carries no recipients, so routing falls back to the headers;
- the `s3:TestEvent` S3 sends when a notification is configured: nothing to do.

When SNS fans out to SQS without raw delivery, the SQS body is the SNS envelope and the
notification is its `Message` string; that wrapping is undone here.

`WorkRecorder` is what a notification path needs to record the work it parsed; the
`InboundService` provides it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote_plus

from relay.inbound import jsonlimits
from relay.inbound.jsonlimits import JSONLimitError

log = logging.getLogger("relay.inbound")

Origin = Literal["ses", "s3"]


class NotificationError(ValueError):
    """The payload is not a notification this relay can act on. `reason` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundWork:
    """One stored message to fetch, decrypt and deliver. JSON-serialisable for the queue."""

    bucket: str
    key: str
    origin: Origin
    recipients: tuple[str, ...] = ()
    message_id: str | None = None  # SES mail.messageId
    source: str | None = None  # SES mail.source: the envelope MAIL FROM
    spam_verdict: str | None = None  # PASS | FAIL | GRAY | PROCESSING_FAILED
    virus_verdict: str | None = None
    spf_verdict: str | None = None
    dkim_verdict: str | None = None
    dmarc_verdict: str | None = None
    etag: str | None = None
    size: int | None = None

    @property
    def dedupe_key(self) -> str:
        """The same stored message gets the same key however often it is announced.

        SES's messageId is also the S3 object's name under the rule's prefix, so it is the
        best identity; an S3 event has only the object (and its ETag, which changes if the
        object is rewritten, so a genuine new version is not swallowed as a duplicate).
        """
        if self.message_id:
            return f"ses:{self.message_id}"
        return f"s3:{self.bucket}/{self.key}@{self.etag or ''}"

    @property
    def is_spam(self) -> bool:
        return self.spam_verdict == "FAIL"

    @property
    def has_virus(self) -> bool:
        return self.virus_verdict == "FAIL"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InboundWork:
        fields = dict(data)
        fields["recipients"] = tuple(fields.get("recipients", ()))
        return cls(**fields)


class WorkRecorder(Protocol):
    """Where a notification path (the SQS consumer) records what it parsed, durably.

    `relay.inbound.service.InboundService` implements it. The consumer gets this rather
    than the service class because the service creates the consumer: importing the class
    back, even for type checking only, would make the two modules a circle.
    """

    async def enqueue(self, work: InboundWork, *, via: str, extra: dict[str, Any]) -> bool:
        """Record `work`; False when it was recorded before. Raises StoreError when the
        queue can't take it (the notification must then not be acknowledged)."""
        ...

    async def enqueue_unusable(
        self, reason: str, payload: str, *, via: str, dedupe: str, extra: dict[str, Any]
    ) -> bool:
        """Record an authentic notification that can't be acted on as failed work."""
        ...


def parse_notification(payload: str | bytes | Mapping[str, Any]) -> list[InboundWork]:
    """Units of work in a notification; [] for the ones to acknowledge and ignore.

    Raises NotificationError for anything else (not JSON, an SES notification without an
    S3 action, a missing bucket or key), which the caller should log and dead-letter.
    """
    doc = _load(payload)
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        doc = _load(doc["Message"])  # SNS envelope delivered through SQS
    if doc.get("Event") == "s3:TestEvent":
        log.info("ignoring s3:TestEvent for bucket %s", doc.get("Bucket"))
        return []
    if "Records" in doc:
        return _s3_event(doc["Records"])
    if "notificationType" in doc or "eventType" in doc:
        return [_ses_received(doc)]
    raise NotificationError("neither an SES notification nor an S3 event")


def _load(payload: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(payload, Mapping):
        return dict(payload)
    try:
        doc = jsonlimits.loads(payload)
    except JSONLimitError as exc:
        raise NotificationError(f"refused: {exc}") from None
    except ValueError as exc:
        raise NotificationError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NotificationError("not a JSON object")
    return doc


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NotificationError(f"{where} is missing or not an object")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise NotificationError(f"{where} is missing or not a string")
    return value


def _verdict(receipt: Mapping[str, Any], name: str) -> str | None:
    verdict = receipt.get(name)
    if isinstance(verdict, dict) and isinstance(verdict.get("status"), str):
        return str(verdict["status"])
    return None


def _ses_received(doc: Mapping[str, Any]) -> InboundWork:
    kind = doc.get("notificationType", doc.get("eventType"))
    if kind != "Received":
        raise NotificationError(f"SES notification of type {kind!r}, not Received")
    receipt = _obj(doc.get("receipt"), "receipt")
    mail = _obj(doc.get("mail"), "mail")
    action = _obj(receipt.get("action"), "receipt.action")
    if action.get("type") != "S3":
        raise NotificationError(
            f"SES action {action.get('type')!r} is not S3: configure the receipt rule with "
            "an S3 action (the relay reads messages from the bucket)"
        )
    recipients = receipt.get("recipients") or []
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise NotificationError("receipt.recipients is not a list of addresses")
    source = mail.get("source")
    return InboundWork(
        bucket=_str(action.get("bucketName"), "receipt.action.bucketName"),
        key=_str(action.get("objectKey"), "receipt.action.objectKey"),
        origin="ses",
        recipients=tuple(recipients),
        message_id=_str(mail.get("messageId"), "mail.messageId"),
        source=source if isinstance(source, str) else None,
        spam_verdict=_verdict(receipt, "spamVerdict"),
        virus_verdict=_verdict(receipt, "virusVerdict"),
        spf_verdict=_verdict(receipt, "spfVerdict"),
        dkim_verdict=_verdict(receipt, "dkimVerdict"),
        dmarc_verdict=_verdict(receipt, "dmarcVerdict"),
    )


def _s3_event(records: Any) -> list[InboundWork]:
    if not isinstance(records, list):
        raise NotificationError("Records is not a list")
    work: list[InboundWork] = []
    for i, record in enumerate(records):
        rec = _obj(record, f"Records[{i}]")
        if rec.get("eventSource") != "aws:s3":
            raise NotificationError(f"Records[{i}] is not an S3 event")
        event = str(rec.get("eventName", ""))
        if not event.startswith("ObjectCreated:"):
            log.debug("ignoring S3 event %s", event)
            continue
        s3 = _obj(rec.get("s3"), f"Records[{i}].s3")
        bucket = _obj(s3.get("bucket"), f"Records[{i}].s3.bucket")
        obj = _obj(s3.get("object"), f"Records[{i}].s3.object")
        etag = obj.get("eTag")
        size = obj.get("size")
        work.append(
            InboundWork(
                bucket=_str(bucket.get("name"), f"Records[{i}].s3.bucket.name"),
                # S3 form-encodes keys in event notifications: "a+b%2Bc" is "a b+c".
                key=unquote_plus(_str(obj.get("key"), f"Records[{i}].s3.object.key")),
                origin="s3",
                etag=etag if isinstance(etag, str) else None,
                size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            )
        )
    return work


#: What SES publishes to a receipt rule's topic when the rule is created: not mail.
SES_SETUP_NOTIFICATION = "AMAZON_SES_SETUP_NOTIFICATION"


def is_ses_setup_notification(payload: str) -> bool:
    """Whether `payload` (raw, or wrapped in an SNS envelope) is SES's setup test, which
    is acknowledged and dropped rather than recorded as an unusable notification."""
    try:
        doc = jsonlimits.loads(payload)
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
            doc = jsonlimits.loads(doc["Message"])
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("notificationType") == SES_SETUP_NOTIFICATION
