"""Postmark's single-message endpoint (POST /email), which takes JSON, not MIME.

The message is converted by `mime_json` (envelope recipients decide who is mailed; Bcc is
kept). Auth is the X-Postmark-Server-Token header. Success is 200 with "MessageID";
failures carry {"ErrorCode", "Message"}, mostly with HTTP 422, and the code says more
than the status (Postmark "API error codes"):

- 10 bad or missing token; 405 not allowed to send (out of credits); 412 account
  pending; 413 account may not send: the account is unusable, upstream-wide, permanent.
- 100 maintenance: transient, upstream-wide. 429 rate limit: transient.
- 400/401 sender signature not found/not confirmed: this sender isn't set up at Postmark,
  another upstream may send it: transient.
- 300 invalid email request; 406 inactive recipient; 411 forbidden attachment type; and
  the JSON-shape codes (402, 403, 409): this message is refused, permanent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import Secret
from relay.outcomes import PermanentError, TransientError, UpstreamError
from relay.upstreams.http import Reply, retry_after
from relay.upstreams.mime_json import JsonMessage, JsonUpstream, Mailbox

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig

_ACCOUNT_UNUSABLE = frozenset({10, 405, 412, 413})
_MAINTENANCE = 100
_SENDER_NOT_SET_UP = frozenset({400, 401})


@dataclass(frozen=True)
class PostmarkSettings:
    api_key: Secret  # the Server API token
    base_url: str = "https://api.postmarkapp.com"  # Postmark has no separate EU endpoint
    message_stream: str = "outbound"


class PostmarkUpstream(JsonUpstream):
    type_name = "postmark"
    Settings = PostmarkSettings
    path = "/email"
    max_message_size = 10 * 1000**2  # measured by Postmark after base64, so approximate
    max_recipients = 50  # To, Cc and Bcc together

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        message_stream: str = "outbound",
    ) -> None:
        super().__init__(name, base_url=base_url, timeout=timeout)
        self.api_key = api_key
        self.message_stream = message_stream

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: PostmarkSettings, relay_config: Config
    ) -> PostmarkUpstream:
        return cls(
            common.name,
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=float(common.timeout),
            message_stream=settings.message_stream,
        )

    def auth_headers(self) -> dict[str, str]:
        return {"X-Postmark-Server-Token": self.api_key}

    def payload(self, msg: JsonMessage) -> dict[str, Any]:
        """The /email body for one converted message."""
        body: dict[str, Any] = {
            "From": msg.sender.formatted(),
            "To": _join(msg.to),
            "Subject": msg.subject,
            "MessageStream": self.message_stream,
        }
        if msg.cc:
            body["Cc"] = _join(msg.cc)
        if msg.bcc:
            body["Bcc"] = _join(msg.bcc)
        if msg.reply_to:
            body["ReplyTo"] = _join(msg.reply_to)
        text, html = msg.bodies()
        if html is not None:
            body["HtmlBody"] = html.escaped()
        if text is not None or html is None:
            body["TextBody"] = text.escaped() if text is not None else " "  # one is required
        if msg.headers:
            body["Headers"] = [{"Name": n, "Value": v} for n, v in msg.headers]
        if msg.attachments:
            body["Attachments"] = [
                {
                    "Name": a.filename,
                    "Content": a.base64(),
                    "ContentType": a.content_type,
                    **({"ContentID": f"cid:{a.content_id}"} if a.content_id else {}),
                }
                for a in msg.attachments
            ]
        if msg.relay_id:
            body["Metadata"] = {"relay_id": msg.relay_id}
        return body

    def provider_id(self, reply: Reply) -> str | None:
        doc = reply.json()
        value = doc.get("MessageID") if isinstance(doc, dict) else None
        return str(value) if value is not None else None

    def _code(self, reply: Reply) -> int | None:
        doc = reply.json()
        code = doc.get("ErrorCode") if isinstance(doc, dict) else None
        return code if isinstance(code, int) else None

    def error_detail(self, reply: Reply) -> str:
        doc = reply.json()
        if isinstance(doc, dict) and "Message" in doc:
            return f"ErrorCode {doc.get('ErrorCode')}: {doc['Message']}"
        return reply.text()

    def classify(self, reply: Reply) -> UpstreamError:
        code = self._code(reply)
        reason = f"HTTP {reply.status}: {self.error_detail(reply)}"
        if code in _ACCOUNT_UNUSABLE:
            return PermanentError(reason, upstream_wide=True)
        if code == _MAINTENANCE:
            return TransientError(
                reason, retry_after=retry_after(reply.headers, self.clock()), upstream_wide=True
            )
        if code == 429:
            return TransientError(reason, retry_after=retry_after(reply.headers, self.clock()))
        if code in _SENDER_NOT_SET_UP:
            return TransientError(reason)
        if code is not None and reply.status == 422:
            return PermanentError(reason)
        return super().classify(reply)


def _join(boxes: tuple[Mailbox, ...]) -> str:
    return ", ".join(b.formatted() for b in boxes)
