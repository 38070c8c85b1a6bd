"""The `smtp` and `lmtp` destinations: forwarding to a downstream server.

SMTP goes through aiosmtplib. LMTP (RFC 2033) answers DATA once *per recipient*, which
aiosmtplib's single-reply DATA can't read, so it uses a small client of its own over TCP or
a Unix socket (Dovecot, Cyrus). Both read one settings class (`protocol` tells them apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiosmtplib

from relay.config import Duration, Secret
from relay.inbound.destinations.base import Destination, raise_for_refusals
from relay.inbound.parse import ParsedMessage
from relay.outcomes import PermanentError, RecipientRefusal, TransientError
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


def _refusal(code: int, message: str) -> RecipientRefusal:
    return RecipientRefusal(permanent=500 <= code < 600, reason=f"{code} {message}".strip())


def _reply_error(what: str, code: int, message: str, *, ambiguous: bool = False) -> Exception:
    reason = f"{what}: {code} {message}".strip()
    if 500 <= code < 600:
        return PermanentError(reason)
    return TransientError(reason, ambiguous=ambiguous)


class SMTPDestination(Destination):
    """Forwarding to a downstream SMTP server with aiosmtplib: 4xx retry, 5xx permanent."""

    type_name = "smtp"

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
        self.where = f"smtp {settings.host}:{settings.port}"

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
        s = self.settings
        if not recipients:
            raise PermanentError(f"{self.where}: the message has no recipients")
        mail_from = self._envelope_sender(parsed, sender)
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=float(s.timeout),
            use_tls=s.tls == "implicit",
            start_tls={"none": False, "opportunistic": None, "starttls": True, "implicit": False}[
                s.tls
            ],
            validate_certs=s.verify_tls,
            tls_context=self.tls_context,
            username=s.username or None,
            password=str(s.password) if s.password else None,
            local_hostname=s.local_hostname or None,
        )
        sent_data = False
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            options: list[str] = []
            if not all(a.isascii() for a in (mail_from, *recipients)):
                options.append("SMTPUTF8")
            if not raw.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            sent_data = True
            errors, reply = await client.sendmail(
                mail_from, list(recipients), raw, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = {e.recipient: _refusal(e.code, e.message) for e in exc.recipients}
            raise_for_refusals(self.where, [], refused)
            raise AssertionError("unreachable") from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise TransientError(
                f"{self.where}: authentication failed: {exc.code} {exc.message}", upstream_wide=True
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _reply_error(self.where, exc.code, exc.message) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise TransientError(f"{self.where}: {exc}", upstream_wide=True) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Connection refused, reset, or timed out. After DATA started, the server may
            # have taken the message: a retry may duplicate (ambiguous).
            raise TransientError(
                f"{self.where}: {exc!r}",
                upstream_wide=True,
                ambiguous=sent_data and not isinstance(exc, aiosmtplib.SMTPConnectError),
            ) from exc
        finally:
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()
                client.close()
        refused = {r: _refusal(code, msg) for r, (code, msg) in errors.items()}
        delivered = [r for r in recipients if r not in refused]
        raise_for_refusals(self.where, delivered, refused)
        return f"{self.where}: {reply}"


class LMTPProtocolError(Exception):
    """The LMTP server's answer made no sense (not a reply line, closed early)."""


class LMTPDestination(SMTPDestination):
    """LMTP (RFC 2033): one reply per recipient after DATA, so a mailbox over quota defers
    only its own recipient. Over TCP or a Unix socket; no TLS (local delivery)."""

    type_name = "lmtp"

    def __init__(
        self,
        name: str,
        settings: SMTPDestinationConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name, settings, tls_context=tls_context)
        self.where = (
            f"lmtp unix:{settings.socket}"
            if settings.socket
            else f"lmtp {settings.host}:{settings.port}"
        )

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
        stage = "connect"
        try:
            async with asyncio.timeout(float(self.settings.timeout)):
                if self.settings.socket:
                    reader, writer = await asyncio.open_unix_connection(self.settings.socket)
                else:
                    reader, writer = await asyncio.open_connection(
                        self.settings.host, self.settings.port
                    )
                try:
                    stage = "transaction"
                    delivered, refused, last = await self._transaction(
                        reader, writer, mail_from, recipients, raw
                    )
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, LMTPProtocolError, asyncio.IncompleteReadError) as exc:
            raise TransientError(
                f"{self.where}: {exc!r}", upstream_wide=True, ambiguous=stage != "connect"
            ) from exc
        raise_for_refusals(self.where, delivered, refused)
        return f"{self.where}: {last}"

    async def _transaction(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mail_from: str,
        recipients: Sequence[str],
        raw: bytes,
    ) -> tuple[list[str], dict[str, RecipientRefusal], str]:
        async def command(line: str) -> tuple[int, str]:
            writer.write(line.encode("utf-8") + b"\r\n")
            await writer.drain()
            return await self._reply(reader)

        code, text = await self._reply(reader)
        if code != 220:
            raise _reply_error(f"{self.where} greeting", code, text)
        hostname = self.settings.local_hostname or socket.gethostname()
        code, text = await command(f"LHLO {hostname}")
        if code != 250:
            raise _reply_error(f"{self.where} LHLO", code, text)
        utf8 = "" if all(a.isascii() for a in (mail_from, *recipients)) else " SMTPUTF8"
        code, text = await command(f"MAIL FROM:<{mail_from}>{utf8}")
        if code != 250:
            raise _reply_error(f"{self.where} MAIL FROM", code, text)
        accepted: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        for rcpt in recipients:
            code, text = await command(f"RCPT TO:<{rcpt}>")
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                refused[rcpt] = _refusal(code, text)
        if not accepted:
            await command("RSET")
            return [], refused, ""
        code, text = await command("DATA")
        if code != 354:
            raise _reply_error(f"{self.where} DATA", code, text)
        writer.write(dot_stuff(raw))
        await writer.drain()
        delivered: list[str] = []
        last = ""
        for rcpt in accepted:  # RFC 2033 4.2: one reply per accepted RCPT, in order
            code, text = await self._reply(reader)
            if code == 250:
                delivered.append(rcpt)
                last = f"{code} {text}"
            else:
                refused[rcpt] = _refusal(code, text)
        with contextlib.suppress(OSError, LMTPProtocolError, asyncio.IncompleteReadError):
            await command("QUIT")
        return delivered, refused, last

    @staticmethod
    async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = await reader.readuntil(b"\n")
            if (
                len(line) < 4
                or not line[:3].isdigit()
                or line[3:4] not in (b" ", b"-", b"\r", b"\n")
            ):
                raise LMTPProtocolError(f"not a reply line: {line[:80]!r}")
            lines.append(line[4:].decode("utf-8", "replace").strip())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)
