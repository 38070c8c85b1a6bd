"""SparkPost Transmissions with raw RFC 822 content (POST /api/v1/transmissions).

The message goes over as `content.email_rfc822` with the envelope recipients as
`recipients`, so Bcc survives and our DKIM signature stays valid (tracking is off by
default because it rewrites the body). `header_to` carries the original To header so
SparkPost shows every recipient the same To line. The envelope sender becomes
`return_path`. The relay's message id goes as the transmission's `metadata.relay_id`,
which SparkPost copies into every event's `rcpt_meta` (relay.events.sparkpost). Success
is {"results": {"id", ...}}; errors are {"errors": [{"message", "code", "description"}]}.

Error codes (SparkPost "Extended Error Codes") beyond the generic HTTP reading:
420 (codes 2101-2103, sending limit reached) is the account's quota: transient,
upstream-wide. 1502 "server resources unavailable" (sent as 400) is transient.
7000/7001 (sending domain blocked or not configured) concern this sender at this
provider: transient, so another upstream may send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING, Any

from relay.config import Secret
from relay.message import HEADER_END, Envelope
from relay.outcomes import TransientError, UpstreamError
from relay.upstreams.http import HTTPUpstream, Reply, Request, retry_after
from relay.upstreams.jsonwire import Escaped, escaped_text, is_utf8, serialise

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig


@dataclass(frozen=True)
class SparkPostSettings:
    api_key: Secret
    # EU: "https://api.eu.sparkpost.com"; Enterprise accounts have their own host.
    base_url: str = "https://api.sparkpost.com"
    tracking: bool = False


class SparkPostUpstream(HTTPUpstream):
    type_name = "sparkpost"
    Settings = SparkPostSettings

    def __init__(
        self, name: str, *, api_key: str, base_url: str, timeout: float, tracking: bool = False
    ) -> None:
        super().__init__(name, base_url=base_url, timeout=timeout)
        self.api_key = api_key
        self.tracking = tracking

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: SparkPostSettings, relay_config: Config
    ) -> SparkPostUpstream:
        return cls(
            common.name,
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=float(common.timeout),
            tracking=settings.tracking,
        )

    def build(self, envelope: Envelope, data: bytes) -> Request:
        # The header section alone: the parser would otherwise copy the whole body too.
        end = HEADER_END.search(data)
        head = data if end is None else data[: end.end()]
        header_to = BytesHeaderParser(policy=compat32).parsebytes(head).get("To")
        address: dict[str, str] = {}
        if isinstance(header_to, str):
            address["header_to"] = " ".join(header_to.split())
        # limits() refused anything but UTF-8; escaped from the bytes, window by window.
        mime = Escaped(escaped_text(data, 0, len(data), codec="utf-8", crlf_to_lf=False))
        payload: dict[str, Any] = {
            "recipients": [{"address": {"email": rcpt, **address}} for rcpt in envelope.rcpt_tos],
            "content": {"email_rfc822": mime},
            "options": {"open_tracking": self.tracking, "click_tracking": self.tracking},
        }
        if envelope.mail_from:
            payload["return_path"] = envelope.mail_from
        if envelope.queue_id:
            payload["metadata"] = {"relay_id": envelope.queue_id}
        return Request(
            "/api/v1/transmissions",
            serialise(payload),
            "application/json",
            {"Authorization": self.api_key},
        )

    def limits(self, envelope: Envelope, data: bytes) -> str | None:
        if not is_utf8(data):
            # JSON strings are Unicode: bytes that are not UTF-8 could not arrive unchanged.
            return "the message has 8-bit bytes that are not UTF-8"
        return super().limits(envelope, data)

    def provider_id(self, reply: Reply) -> str | None:
        doc = reply.json()
        results = doc.get("results") if isinstance(doc, dict) else None
        value = results.get("id") if isinstance(results, dict) else None
        return str(value) if value is not None else None

    def _errors(self, reply: Reply) -> list[dict[str, Any]]:
        doc = reply.json()
        errors = doc.get("errors") if isinstance(doc, dict) else None
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    def error_detail(self, reply: Reply) -> str:
        parts = [
            " ".join(str(e[k]) for k in ("code", "message", "description") if e.get(k))
            for e in self._errors(reply)
        ]
        return "; ".join(parts) or reply.text()

    def classify(self, reply: Reply) -> UpstreamError:
        codes = {str(e.get("code", "")) for e in self._errors(reply)}
        reason = f"HTTP {reply.status}: {self.error_detail(reply)}"
        if reply.status == 420:
            return TransientError(
                reason, retry_after=retry_after(reply.headers, self.clock()), upstream_wide=True
            )
        if "1502" in codes or codes & {"7000", "7001"}:
            return TransientError(reason)
        return super().classify(reply)
