"""Upstream `smtp`: a smarthost, reached with our own client (`smtpclient`, PIPELINING).

Replies map per recipient: 4xx → try again (another upstream, or later), 5xx → refused for
good. Failing to connect, authenticate or negotiate TLS is the upstream's problem, not the
message's: it trips the breaker. A connection that dies after the final "." was sent is
ambiguous: the smarthost may have queued the message.

Connections are kept open between messages (the next MAIL FROM follows a completed DATA
directly: that ends the transaction, RFC 5321 4.1.1.4; an aborted one gets RSET), up to
`max_concurrency` of them: a new TCP+TLS+AUTH handshake per message would cost more than
the message itself. With PIPELINING a message costs two writes: MAIL, every RCPT and DATA
together, then the payload.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.config import Secret
from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, RecipientRefusal, TransientError
from relay.smtpclient import (
    AuthRefused,
    ConnectionLost,
    PayloadUnsent,
    Reply,
    ReplyTimeout,
    SMTPClient,
    SMTPClientError,
    client_tls_context,
    mail_command,
    rcpt_command,
)
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


class _StaleSession(Exception):
    """The session ended before the payload left (closed, or "421" to MAIL): on a pooled
    connection that is the server having timed it out, worth one fresh try."""


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
        self._idle: list[SMTPClient] = []
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
            self._tls_context = client_tls_context(
                verify=self.settings.verify_tls, ca_file=self.settings.ca_file
            )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        # Together: a smarthost that stopped answering costs one timeout, not one each.
        await asyncio.gather(*(client.quit() for client in idle))

    async def _connect(self) -> SMTPClient:
        s = self.settings
        try:
            return await SMTPClient.connect(
                s.host,
                s.port,
                timeout=self.timeout,
                helo=self.helo,
                tls=s.tls,
                tls_context=self._tls_context,
                username=s.username,
                password=str(s.password or ""),
            )
        except AuthRefused as exc:
            raise PermanentError(
                f"{s.host}:{s.port} refused our credentials: {exc.reply}", upstream_wide=True
            ) from exc
        except (TimeoutError, SMTPClientError, OSError) as exc:
            raise TransientError(
                f"cannot connect to {s.host}:{s.port}: {exc or type(exc).__name__}",
                upstream_wide=True,
            ) from exc

    def _pooled(self) -> SMTPClient | None:
        """An idle connection still fit for a transaction; the others are dropped."""
        while self._idle:
            client = self._idle.pop()
            if client.reusable:
                return client
            client.close()
        return None

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        client = self._pooled()
        reused = client is not None
        if client is None:
            client = await self._connect()
        try:
            try:
                return await self._transaction(client, envelope, data)
            except _StaleSession as exc:
                client.close()
                if not reused:
                    raise TransientError(str(exc), upstream_wide=True) from None
            # One fresh try is not a retry storm.
            client = await self._connect()
            try:
                return await self._transaction(client, envelope, data)
            except _StaleSession as exc:
                raise TransientError(str(exc), upstream_wide=True) from None
        finally:
            self._release(client)

    def _release(self, client: SMTPClient) -> None:
        """Back to the pool when between transactions (also after a refusal that ended in
        RSET); closed otherwise, and when the pool is full."""
        if client.reusable and len(self._idle) < self.pool_size:
            self._idle.append(client)
        else:
            client.close()

    async def _transaction(self, client: SMTPClient, envelope: Envelope, data: bytes) -> Accepted:
        host = self.settings.host
        rcpts = envelope.rcpt_tos
        if envelope.smtputf8 and "SMTPUTF8" not in client.extensions:
            # RFC 6531: only where offered. Another upstream may take it; this one takes
            # the rest of the mail as before.
            raise TransientError(
                f"{host} does not offer SMTPUTF8, which this message's addresses need"
            )
        try:
            replies = await client.begin(
                _mail_command(envelope), [_rcpt_command(envelope, rcpt) for rcpt in rcpts]
            )
        except ConnectionLost as exc:
            raise _StaleSession(f"{host} closed the connection: {exc}") from exc
        except ReplyTimeout as exc:
            raise TransientError(f"{host} did not answer: {exc}", upstream_wide=True) from exc
        except SMTPClientError as exc:
            raise TransientError(f"{host}: {exc}", upstream_wide=True) from exc
        if replies.mail.code != 250:
            if replies.mail.code == 421:
                raise _StaleSession(f"{host} refused sender <{envelope.mail_from}>: {replies.mail}")
            raise self._classify(replies.mail, f"{host} refused sender <{envelope.mail_from}>")
        refused: dict[str, RecipientRefusal] = {}
        for rcpt, reply in zip(rcpts, replies.rcpts, strict=True):
            if reply.code not in (250, 251):
                refused[rcpt] = RecipientRefusal(
                    permanent=reply.code >= 500, reason=f"{host}: {reply.code} {reply.message}"
                )
        if len(refused) == len(rcpts):
            return Accepted(refused=refused, detail="every recipient refused")
        if not replies.ready:
            assert replies.data is not None
            raise self._classify(replies.data, f"{host} refused the message")
        try:
            response = await client.payload(dot_stuff(data, crlf_checked=envelope.crlf_only))
        except PayloadUnsent as exc:
            raise TransientError(f"{host}: {exc}") from exc
        except ReplyTimeout as exc:
            raise TransientError(
                f"{host} did not answer after the message was sent; it may have been accepted",
                ambiguous=True,
            ) from exc
        except SMTPClientError as exc:
            raise TransientError(
                f"{host} disconnected after the message was sent; it may have been accepted"
                f" ({exc})",
                ambiguous=True,
            ) from exc
        if response.code != 250:
            raise self._classify(response, f"{host} refused the message")
        return Accepted(
            provider_id=_queue_id(response.message),
            refused=refused,
            detail=f"{response.code} {response.message}",
        )

    @staticmethod
    def _classify(reply: Reply, what: str) -> TransientError | PermanentError:
        reason = f"{what}: {reply}"
        if reply.code == 421:
            return TransientError(reason, upstream_wide=True)
        if reply.code >= 500:
            return PermanentError(reason)
        return TransientError(reason)


def _queue_id(message: str) -> str:
    """The smarthost's queue id, when its reply names one ("... queued as 4F2A1B3C")."""
    words = message.split()
    for i, word in enumerate(words[:-1]):
        if word.lower() == "as":
            return words[i + 1].strip(".,;")
    return message[:120]


def _mail_command(envelope: Envelope) -> bytes:
    """MAIL written directly: the address was checked when the message was accepted.
    SMTPUTF8 addresses go as UTF-8 (RFC 6531)."""
    try:
        return mail_command(
            envelope.mail_from, utf8=envelope.smtputf8, body_8bit=envelope.body_8bit
        )
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


def _rcpt_command(envelope: Envelope, rcpt: str) -> bytes:
    try:
        return rcpt_command(rcpt, utf8=envelope.smtputf8)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
