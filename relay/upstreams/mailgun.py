"""Mailgun's raw MIME endpoint (POST /v3/{domain}/messages.mime).

The message goes over unchanged as a file part named `message`, and the envelope
recipients as repeated `to` fields: Mailgun delivers to `to`, not to the headers, so Bcc
survives and the DKIM signature stays valid. The relay's message id goes as the custom
variable `v:relay_id`, which Mailgun puts in every event's `user-variables`
(relay.events.mailgun). Basic auth is `api:<key>`. Success is 200
{"id": "<...>", "message": "Queued. Thank you."}; errors are {"message": ...} (or a bare
"Forbidden" for a bad key). Beyond the generic HTTP reading, 404 means the configured
domain does not exist in the account: the upstream is misconfigured, not the message.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.config import Secret
from relay.message import Envelope, random_token
from relay.outcomes import PermanentError, UpstreamError
from relay.upstreams.http import HTTPUpstream, Reply, Request

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig


@dataclass(frozen=True)
class MailgunSettings:
    api_key: Secret
    domain: str
    # EU region: "https://api.eu.mailgun.net".
    base_url: str = "https://api.mailgun.net"
    # Open/click tracking rewrites the body after we signed it; off unless asked for.
    tracking: bool = False


class MailgunUpstream(HTTPUpstream):
    type_name = "mailgun"
    Settings = MailgunSettings
    max_message_size = 25 * 1000**2
    max_recipients = 1000

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        domain: str,
        base_url: str,
        timeout: float,
        tracking: bool = False,
    ) -> None:
        super().__init__(name, base_url=base_url, timeout=timeout)
        self.auth = "Basic " + base64.b64encode(f"api:{api_key}".encode()).decode()
        self.domain = domain
        self.tracking = tracking

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: MailgunSettings, relay_config: Config
    ) -> MailgunUpstream:
        return cls(
            common.name,
            api_key=settings.api_key,
            domain=settings.domain,
            base_url=settings.base_url,
            timeout=float(common.timeout),
            tracking=settings.tracking,
        )

    def build(self, envelope: Envelope, data: bytes) -> Request:
        # Serialised here rather than by aiohttp.FormData so the length is known: that is
        # what tells a timeout after the upload (ambiguous) from one before it.
        boundary = random_token()
        while boundary.encode() in data:  # 128 random bits: never, unless it was crafted
            boundary = random_token()
        fields = [("to", rcpt) for rcpt in envelope.rcpt_tos]
        fields.append(("o:tracking", "yes" if self.tracking else "no"))
        if envelope.queue_id:
            fields.append(("v:relay_id", envelope.queue_id))
        head = "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in fields
        )
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="message"; '
            f'filename="message.mime"\r\nContent-Type: message/rfc822\r\n\r\n'
        )
        # The message itself is one of the chunks, never copied into a joined body.
        body = (head.encode(), data, f"\r\n--{boundary}--\r\n".encode())
        return Request(
            f"/v3/{self.domain}/messages.mime",
            body,
            f"multipart/form-data; boundary={boundary}",
            {"Authorization": self.auth},
        )

    def provider_id(self, reply: Reply) -> str | None:
        doc = reply.json()
        value = doc.get("id") if isinstance(doc, dict) else None
        # Mailgun's events quote the Message-ID without angle brackets.
        return value.strip("<>") if isinstance(value, str) else None

    def error_detail(self, reply: Reply) -> str:
        doc = reply.json()
        message = doc.get("message") if isinstance(doc, dict) else None
        return message if isinstance(message, str) else reply.text()

    def classify(self, reply: Reply) -> UpstreamError:
        if reply.status == 404:
            return PermanentError(
                f"HTTP 404: {self.error_detail(reply)} (domain {self.domain!r})", upstream_wide=True
            )
        return super().classify(reply)
