"""SendGrid v3 Mail Send (POST /v3/mail/send), which takes JSON, not MIME.

The message is converted by `mime_json` (envelope recipients decide who is mailed; Bcc is
kept as personalization bcc). SendGrid answers 202 with the message id in X-Message-Id,
and errors as {"errors": [{"message", "field", "help"}]}. Beyond the generic HTTP reading:
403 for a From address that is not a verified Sender Identity is this sender's problem at
this provider (another upstream may send it), while other 403s (temporary block after
repeated bad requests, key without permission) are the account's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import Secret
from relay.outcomes import TransientError, UpstreamError
from relay.upstreams.http import Reply
from relay.upstreams.mime_json import JsonMessage, JsonUpstream, Mailbox

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig


@dataclass(frozen=True)
class SendGridSettings:
    api_key: Secret
    # EU regional subusers: "https://api.eu.sendgrid.com".
    base_url: str = "https://api.sendgrid.com"
    ip_pool: str = ""
    categories: tuple[str, ...] = ()

    def validate(self) -> None:
        if len(self.categories) > 10:
            raise ValueError("categories: SendGrid allows at most 10")


class SendGridUpstream(JsonUpstream):
    type_name = "sendgrid"
    Settings = SendGridSettings
    path = "/v3/mail/send"
    # The whole JSON request may be 30 MB; base64 attachments in the MIME are about the
    # same size in the JSON, so the queued size is a fair first check.
    max_message_size = 30 * 1000**2
    max_recipients = 1000

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        ip_pool: str = "",
        categories: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, base_url=base_url, timeout=timeout)
        self.api_key = api_key
        self.ip_pool = ip_pool
        self.categories = categories

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: SendGridSettings, relay_config: Config
    ) -> SendGridUpstream:
        return cls(
            common.name,
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=float(common.timeout),
            ip_pool=settings.ip_pool,
            categories=settings.categories,
        )

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def payload(self, msg: JsonMessage) -> dict[str, Any]:
        """The Mail Send body for one converted message."""
        personalization: dict[str, Any] = {"to": _boxes(msg.to)}
        if msg.cc:
            personalization["cc"] = _boxes(msg.cc)
        if msg.bcc:
            personalization["bcc"] = _boxes(msg.bcc)
        # SendGrid requires at least one content item of at least one character, with
        # text/plain first; an attachment-only scan gets a blank text body.
        text, html = msg.bodies()
        content: list[dict[str, Any]] = []
        if text is not None or html is None:
            value = text.escaped() if text is not None else " "
            content.append({"type": "text/plain", "value": value})
        if html is not None:
            content.append({"type": "text/html", "value": html.escaped()})
        body: dict[str, Any] = {
            "personalizations": [personalization],
            "from": _box(msg.sender),
            "subject": msg.subject or " ",
            "content": content,
        }
        if len(msg.reply_to) == 1:
            body["reply_to"] = _box(msg.reply_to[0])
        elif msg.reply_to:
            body["reply_to_list"] = _boxes(msg.reply_to)
        if msg.attachments:
            body["attachments"] = [
                {
                    "content": a.base64(),
                    "type": a.content_type,
                    "filename": a.filename,
                    "disposition": "inline" if a.inline else "attachment",
                    **({"content_id": a.content_id} if a.content_id else {}),
                }
                for a in msg.attachments
            ]
        headers: dict[str, str] = {}
        for name, value in msg.headers:
            headers.setdefault(name, value)  # a JSON object holds one value per name
        if headers:
            body["headers"] = headers
        if msg.relay_id:
            body["custom_args"] = {"relay_id": msg.relay_id}
        if self.categories:
            body["categories"] = list(self.categories)
        if self.ip_pool:
            body["ip_pool_name"] = self.ip_pool
        return body

    def provider_id(self, reply: Reply) -> str | None:
        return reply.headers.get("X-Message-Id")

    def error_detail(self, reply: Reply) -> str:
        doc = reply.json()
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
            return "; ".join(
                f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
                for e in doc["errors"]
                if isinstance(e, dict)
            )
        return reply.text()

    def classify(self, reply: Reply) -> UpstreamError:
        detail = self.error_detail(reply)
        if reply.status == 403 and "sender identity" in detail.lower():
            return TransientError(f"HTTP 403: {detail}", sender_scoped=True)
        return super().classify(reply)


def _box(box: Mailbox) -> dict[str, str]:
    return {"email": box.email, "name": box.name} if box.name else {"email": box.email}


def _boxes(boxes: tuple[Mailbox, ...]) -> list[dict[str, str]]:
    return [_box(b) for b in boxes]
