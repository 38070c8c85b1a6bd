"""The `smtp` and `lmtp` destinations: forwarding to a downstream server.

Both speak through the relay's own client (`relay.smtpclient`, as the `smtp` upstream
does). LMTP (RFC 2033) greets with LHLO, may be a Unix socket (Dovecot, Cyrus), and answers
the data once *per accepted recipient*, so a mailbox over quota defers only its own
recipient. Both read one settings class (`protocol` tells them apart).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relay.config import Duration, Secret
from relay.inbound.destinations.base import Destination, raise_for_refusals
from relay.inbound.parse import ParsedMessage
from relay.outcomes import PermanentError, RecipientRefusal, TransientError
from relay.smtpclient import (
    AuthRefused,
    PayloadUnsent,
    Reply,
    SMTPClient,
    SMTPClientError,
    client_tls_context,
    mail_command,
    rcpt_command,
)
from relay.wire import dot_stuff

TLSMode = Literal["none", "opportunistic", "starttls", "implicit"]
_SMTP_TIMEOUT = Duration(60.0)


@dataclass(frozen=True)
class SMTPDestinationConfig:
    host: str = ""
    port: int = 25
    # A Unix socket instead of host:port (LMTP to a local Dovecot or Cyrus).
    socket: str = ""
    protocol: Literal["smtp", "lmtp"] = "smtp"
    # opportunistic: STARTTLS when offered. LMTP is local delivery and runs without TLS.
    tls: TLSMode = "opportunistic"
    verify_tls: bool = True
    username: str | None = None
    password: Secret | None = None
    # Envelope sender; empty: the original MAIL FROM SES received, else the null sender.
    mail_from: str = ""
    local_hostname: str = ""
    timeout: Duration = _SMTP_TIMEOUT

    def validate(self) -> None:
        if bool(self.host) == bool(self.socket):
            raise ValueError("give exactly one of host or socket")
        if self.socket and self.protocol != "lmtp":
            raise ValueError('socket is only supported with protocol = "lmtp"')
        if self.protocol == "lmtp" and self.tls in ("starttls", "implicit"):
            raise ValueError('LMTP runs without TLS: set tls = "none"')
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password must be given together")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")


def _refusal(reply: Reply) -> RecipientRefusal:
    return RecipientRefusal(permanent=500 <= reply.code < 600, reason=str(reply))


def _reply_error(what: str, reply: Reply) -> Exception:
    reason = f"{what}: {reply}"
    if 500 <= reply.code < 600:
        return PermanentError(reason)
    return TransientError(reason, upstream_wide=reply.code == 421)


class SMTPDestination(Destination):
    """Forwarding to a downstream SMTP server: 4xx retry, 5xx permanent; failing to connect,
    negotiate TLS or log in is the destination's problem (upstream-wide), not the message's."""

    type_name = "smtp"
    lmtp = False

    def __init__(
        self,
        name: str,
        settings: SMTPDestinationConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.tls_context = tls_context
        self.where = f"{self.type_name} {settings.host}:{settings.port}"
        self._helo = ""

    def _envelope_sender(self, parsed: ParsedMessage, sender: str | None) -> str:
        return self.settings.mail_from or sender or ""

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not recipients:
            raise PermanentError(f"{self.where}: the message has no recipients")
        mail_from = self._envelope_sender(parsed, sender)
        client = await self._connect()
        try:
            return await self._transaction(client, mail_from, recipients, raw)
        finally:
            await client.quit()

    async def _connect(self) -> SMTPClient:
        s = self.settings
        tls = "none" if self.lmtp else s.tls  # LMTP is local delivery (see validate)
        if tls != "none" and self.tls_context is None:  # once: it reads the CA bundle
            self.tls_context = client_tls_context(verify=s.verify_tls)
        if not self._helo:  # once, off the loop: a reverse DNS lookup may block
            self._helo = s.local_hostname or await asyncio.to_thread(socket.getfqdn)
        try:
            return await SMTPClient.connect(
                s.host,
                s.port,
                timeout=float(s.timeout),
                helo=self._helo,
                tls=tls,
                tls_context=self.tls_context,
                username=s.username or "",
                password=str(s.password) if s.password else "",
                unix_socket=s.socket,
                lmtp=self.lmtp,
            )
        except AuthRefused as exc:
            raise TransientError(
                f"{self.where}: authentication failed: {exc.reply}", upstream_wide=True
            ) from exc
        except (TimeoutError, SMTPClientError, OSError) as exc:
            raise TransientError(
                f"{self.where}: cannot connect: {exc or type(exc).__name__}", upstream_wide=True
            ) from exc

    async def _transaction(
        self, client: SMTPClient, mail_from: str, recipients: Sequence[str], raw: bytes
    ) -> str:
        utf8 = not all(a.isascii() for a in (mail_from, *recipients))
        body_8bit = not raw.isascii() and "8BITMIME" in client.extensions
        try:
            mail = mail_command(mail_from, utf8=utf8, body_8bit=body_8bit)
            rcpts = [rcpt_command(r, utf8=utf8) for r in recipients]
        except ValueError as exc:
            raise PermanentError(f"{self.where}: {exc}") from None
        if utf8 and "SMTPUTF8" not in client.extensions:  # RFC 6531: only where offered
            raise TransientError(
                f"{self.where} does not offer SMTPUTF8, which the address"
                f" <{next(a for a in (mail_from, *recipients) if not a.isascii())}> needs"
            )
        try:
            replies = await client.begin(mail, rcpts)
        except SMTPClientError as exc:
            raise TransientError(f"{self.where}: {exc}", upstream_wide=True) from exc
        if replies.mail.code != 250:
            raise _reply_error(f"{self.where} refused sender <{mail_from}>", replies.mail)
        refused = {
            rcpt: _refusal(reply)
            for rcpt, reply in zip(recipients, replies.rcpts, strict=True)
            if reply.code not in (250, 251)
        }
        accepted = [r for r in recipients if r not in refused]
        if not accepted:
            raise_for_refusals(self.where, [], refused)
        if not replies.ready:
            assert replies.data is not None
            raise _reply_error(f"{self.where} refused DATA", replies.data)
        try:
            answers = await client.payload_replies(
                dot_stuff(raw), len(accepted) if self.lmtp else 1
            )
        except PayloadUnsent as exc:
            raise TransientError(f"{self.where}: {exc}", upstream_wide=True) from exc
        except SMTPClientError as exc:
            raise TransientError(
                f"{self.where}: no answer after the message was sent, it may have been "
                f"delivered ({exc})",
                upstream_wide=True,
                ambiguous=True,
            ) from exc
        if self.lmtp:  # one answer per accepted recipient, in RCPT order (RFC 2033 4.2)
            delivered = []
            for rcpt, answer in zip(accepted, answers, strict=True):
                if answer.code == 250:
                    delivered.append(rcpt)
                else:
                    refused[rcpt] = _refusal(answer)
        elif answers[0].code == 250:
            delivered = accepted
        else:
            raise _reply_error(f"{self.where} refused the message", answers[0])
        raise_for_refusals(self.where, delivered, refused)
        return f"{self.where}: {answers[-1]}"


class LMTPDestination(SMTPDestination):
    """LMTP (RFC 2033): one reply per recipient after DATA. Over TCP or a Unix socket; no
    TLS (local delivery)."""

    type_name = "lmtp"
    lmtp = True

    def __init__(
        self,
        name: str,
        settings: SMTPDestinationConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name, settings, tls_context=tls_context)
        if settings.socket:
            self.where = f"lmtp unix:{settings.socket}"
