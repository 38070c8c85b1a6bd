"""Upstream `smtp`: a smarthost reached with aiosmtplib.

Replies map per recipient: 4xx → try again (another upstream, or later), 5xx → refused for
good. Failing to connect, authenticate or negotiate TLS is the upstream's problem, not the
message's: it trips the breaker. A connection that dies after the final "." was sent is
ambiguous: the smarthost may have queued the message.

Connections are kept open between messages (the next MAIL FROM follows a completed DATA
directly: that ends the transaction, RFC 5321 4.1.1.4; an aborted one gets RSET), up to
`max_concurrency` of them: a new TCP+TLS+AUTH handshake per message would cost more than
the message itself.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay.config import Secret
from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, RecipientRefusal, TransientError
from relay.upstreams.base import Upstream
from relay.wire import dot_stuff

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig

log = logging.getLogger("relay.upstreams")


@dataclass(frozen=True)
class SMTPSettings:
    host: str
    port: int = 25
    tls: str = "starttls"  # none | starttls | implicit
    username: str = ""
    password: Secret | None = None
    verify_tls: bool = True
    ca_file: str = ""
    helo: str = ""

    def validate(self) -> None:
        if self.tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls: must be none, starttls or implicit, got {self.tls!r}")
        if self.username and self.password is None:
            raise ValueError("password: required when username is set")


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}".strip()


class SMTPUpstream(Upstream):
    type_name = "smtp"
    Settings = SMTPSettings

    def __init__(
        self, name: str, settings: SMTPSettings, *, timeout: float, pool_size: int, helo: str
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.timeout = timeout
        self.pool_size = pool_size
        self.helo = settings.helo or helo
        self._idle: list[aiosmtplib.SMTP] = []
        self._tls_context: ssl.SSLContext | None = None

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: SMTPSettings, relay_config: Config
    ) -> SMTPUpstream:
        return cls(
            common.name,
            settings,
            timeout=common.timeout,
            pool_size=common.max_concurrency,
            helo=relay_config.server.hostname,
        )

    async def start(self) -> None:
        if self.settings.tls != "none":
            ctx = ssl.create_default_context(cafile=self.settings.ca_file or None)
            if not self.settings.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._tls_context = ctx

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self.helo,
            timeout=self.timeout,
            use_tls=s.tls == "implicit",
            start_tls=s.tls == "starttls",
            tls_context=self._tls_context,
            validate_certs=s.verify_tls,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # done by connect() only with STARTTLS
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            if s.username:
                await client.login(s.username, s.password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise PermanentError(
                f"{s.host}:{s.port} refused our credentials: {_reply(exc)}", upstream_wide=True
            ) from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise TransientError(
                f"cannot connect to {s.host}:{s.port}: {exc}", upstream_wide=True
            ) from exc
        return client

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        reused = bool(self._idle)
        client = self._idle.pop() if reused else await self._connect()
        try:
            result = await self._transaction(client, envelope, data)
        except aiosmtplib.SMTPServerDisconnected:
            client.close()
            if not reused:
                raise TransientError(
                    f"{self.settings.host} closed the connection", upstream_wide=True
                ) from None
            # An idle connection the server timed out: one fresh try is not a retry storm.
            client = await self._connect()
            try:
                result = await self._transaction(client, envelope, data)
            except BaseException:
                client.close()
                raise
        except BaseException:
            client.close()
            raise
        if len(self._idle) < self.pool_size and client.is_connected:
            self._idle.append(client)
        else:
            client.close()
        return result

    async def _transaction(
        self, client: aiosmtplib.SMTP, envelope: Envelope, data: bytes
    ) -> Accepted:
        host = self.settings.host
        # Commands one at a time, no PIPELINING: aiosmtplib drops input that arrives while
        # a parsed reply waits to be picked up, so a smarthost writing pipelined replies
        # one by one could lose one and stall the session until the timeout.
        mail = await client.execute_command(*_mail_command(envelope))
        if mail.code != 250:
            raise self._classify(
                aiosmtplib.SMTPSenderRefused(mail.code, mail.message, envelope.mail_from),
                f"{host} refused sender <{envelope.mail_from}>",
            )
        refused: dict[str, RecipientRefusal] = {}
        for rcpt in envelope.rcpt_tos:
            reply = await client.execute_command(*_rcpt_command(envelope, rcpt))
            if reply.code not in (250, 251):
                refused[rcpt] = RecipientRefusal(
                    permanent=reply.code >= 500, reason=f"{host}: {reply.code} {reply.message}"
                )
        if len(refused) == len(envelope.rcpt_tos):
            await client.rset()
            return Accepted(refused=refused, detail="every recipient refused")
        try:
            response = await self._data(client, dot_stuff(data, crlf_checked=envelope.crlf_only))
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise TransientError(
                f"{host} disconnected after the message was sent; it may have been accepted",
                ambiguous=True,
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise TransientError(
                f"{host} did not answer after the message was sent; it may have been accepted",
                ambiguous=True,
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise self._classify(exc, f"{host} refused the message") from exc
        return Accepted(
            provider_id=_queue_id(response.message),
            refused=refused,
            detail=f"{response.code} {response.message}",
        )

    async def _data(self, client: aiosmtplib.SMTP, payload: bytes) -> SMTPResponse:
        """DATA, the dot-stuffed `payload` and the final reply, written with aiosmtplib's
        protocol primitives: its data() would scan the message twice more with regexes."""
        protocol = client.protocol
        if protocol is None or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            # aiosmtplib's protocol primitives, used as its execute_data_command does
            # (pinned version; the tests send through this path).
            async with protocol._command_lock:
                protocol._response_pending = True
                protocol.write(b"DATA\r\n")
                start = await protocol.read_response(timeout=self.timeout)
                if start.code != 354:
                    raise aiosmtplib.SMTPDataError(start.code, start.message)
                protocol._response_pending = True
                protocol.write(payload)
                response = await protocol.read_response(timeout=self.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()
            raise
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    @staticmethod
    def _classify(
        exc: aiosmtplib.SMTPResponseException, what: str
    ) -> TransientError | PermanentError:
        reason = f"{what}: {_reply(exc)}"
        if exc.code == 421:
            return TransientError(reason, upstream_wide=True)
        if exc.code >= 500:
            return PermanentError(reason)
        return TransientError(reason)


def _queue_id(message: str) -> str:
    """The smarthost's queue id, when its reply names one ("... queued as 4F2A1B3C")."""
    words = message.split()
    for i, word in enumerate(words[:-1]):
        if word.lower() == "as":
            return words[i + 1].strip(".,;")
    return message[:120]


def _mail_command(envelope: Envelope) -> tuple[bytes, ...]:
    """MAIL written directly: the address was checked when the message was accepted, and
    aiosmtplib's mail() would parse it again with the email package (a tenth of the
    dispatcher's time on small messages). SMTPUTF8 addresses go as UTF-8 (RFC 6531)."""
    options = [b"SMTPUTF8"] if envelope.smtputf8 else []
    if envelope.body_8bit:
        options.append(b"BODY=8BITMIME")
    return (b"MAIL", b"FROM:<" + _address(envelope, envelope.mail_from) + b">", *options)


def _rcpt_command(envelope: Envelope, rcpt: str) -> tuple[bytes, ...]:
    return (b"RCPT", b"TO:<" + _address(envelope, rcpt) + b">")


def _address(envelope: Envelope, address: str) -> bytes:
    try:
        raw = address.encode("utf-8" if envelope.smtputf8 else "ascii")
    except UnicodeEncodeError:
        raise PermanentError(f"address {address!r} is not ASCII and SMTPUTF8 is off") from None
    if any(c in raw for c in b"\r\n<> "):
        raise PermanentError(f"address {address!r} cannot be written in an SMTP command")
    return raw
