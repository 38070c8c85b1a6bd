"""Relay policy for one listener (who may send, from which address, to how many), and the
hand-off of each accepted message to the queue.

The SMTP layer knows nothing of upstreams: it calls `submit(message)` and answers 250 only
when that returns, i.e. when the queue has fsynced the message (DESIGN.md invariant 1).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

from relay.address import Problem, mailbox_problem
from relay.config import ListenConfig, SMTPConfig
from relay.message import Envelope, Kind, NewMessage, new_message_id
from relay.queue.base import StoreError, StoreFull
from relay.smtp import replies
from relay.smtp.auth import Authenticator, sender_allowed
from relay.suppression import SuppressionList, refusal_reply

log = logging.getLogger("relay.smtp")

# What a client's HELO name may not bring into our Received header: controls (a bare CR
# there would break the CRLF-only promise the envelope makes) and spaces.
UNSAFE_IN_HEADER = re.compile(r"[\x00-\x20\x7f]")

Submit = Callable[[NewMessage], Awaitable[None]]
# How a user's allowed_senders admits the null reverse-path `MAIL FROM:<>`.
NULL_SENDER = "<>"


def _networks(networks: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def _in_networks(peer: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class RelayHandler:
    def __init__(
        self,
        *,
        listener: ListenConfig,
        smtp: SMTPConfig,
        hostname: str,
        authenticator: Authenticator,
        submit: Submit,
        clock: Callable[[], float] = time.time,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.listener = listener
        self.smtp = smtp
        self.hostname = hostname
        self.authenticator = authenticator
        self.submit = submit
        self.clock = clock
        self.suppressions = suppressions
        self.trusted = _networks(smtp.trusted_networks)
        # Whose bare LFs are normalised on a bare_lf = "reject" listener (Postfix exempts
        # $mynetworks the same way).
        exempt = listener.bare_lf_exempt
        self.bare_lf_exempt = self.trusted if exempt is None else _networks(exempt)
        # Scanners and apps come back from the same few addresses all day: remember the
        # verdict per address instead of parsing it for every session.
        self._trusted_peers: dict[str, bool] = {}
        self._date_second = -1
        self._date = ""

    def replace_policy(self, smtp: SMTPConfig) -> None:
        """A reload's `[smtp]` policy (trusted networks, recipient limit), in force for
        the next command of every session; the listener's own settings stay."""
        self.smtp = smtp
        self.trusted = _networks(smtp.trusted_networks)
        exempt = self.listener.bare_lf_exempt
        self.bare_lf_exempt = self.trusted if exempt is None else _networks(exempt)
        self._trusted_peers = {}

    def _is_trusted(self, session: Any) -> bool:
        if not self.trusted or not session.peer:
            return False
        peer = session.peer[0]
        verdict = self._trusted_peers.get(peer)
        if verdict is None:
            verdict = self._trusted_peers[peer] = self._in_trusted_networks(peer)
            if len(self._trusted_peers) > 10_000:
                self._trusted_peers.clear()
        return verdict

    def _in_trusted_networks(self, peer: str) -> bool:
        return _in_networks(peer, self.trusted)

    def normalizes_bare_lf(self, session: Any) -> bool:
        """Whether this client's bare LFs become CRLF (else its message is refused)."""
        if self.listener.bare_lf == "normalize":
            return True
        if self.bare_lf_exempt is self.trusted:
            return self._is_trusted(session)
        return bool(session.peer) and _in_networks(session.peer[0], self.bare_lf_exempt)

    def _received_date(self, now: float) -> str:
        """The Received header's date, formatted once a second (email.utils is slow)."""
        second = int(now)
        if second != self._date_second:
            self._date_second, self._date = second, formatdate(second)
        return self._date

    def _user(self, session: Any) -> Any:
        """The authenticated user: RelaySMTP keeps its name in `auth_data` (aiosmtpd's
        `login_data` is deprecated and warns on every use)."""
        if not session.authenticated or not isinstance(session.auth_data, str):
            return None
        return self.authenticator.users.get(session.auth_data)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        out = [
            r
            for r in responses[:-1]
            if not (self.listener.auth == "none" and r.startswith("250-AUTH"))
        ]
        out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]
        return out

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> Any:
        if self.listener.auth == "none":
            return replies.AUTH_NOT_OFFERED
        from aiosmtpd.smtp import MISSING

        return MISSING

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        user = self._user(session)
        if user is None:
            if self.listener.auth == "required":
                return replies.AUTH_REQUIRED
            if not self._is_trusted(session):
                return replies.RELAY_DENIED.format(ip=session.peer[0])
        sender = "" if address == "<>" else address
        if sender:
            problem = mailbox_problem(sender, smtputf8="SMTPUTF8" in mail_options)
            if problem is Problem.NEEDS_SMTPUTF8:
                return replies.SENDER_NEEDS_SMTPUTF8
            if problem is not None:
                return replies.SENDER_SYNTAX
        if user is not None:
            refusal = self._sender_refusal(user, sender)
            if refusal is not None:
                return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    @staticmethod
    def _sender_refusal(user: Any, sender: str) -> str | None:
        """An authenticated user may use its allowed_senders only. The null sender is for
        bounces, which a submission account rarely sends: it must be listed as "<>"."""
        if not sender:
            if NULL_SENDER in user.allowed_senders:
                return None
            allowed = ", ".join(user.allowed_senders)
            return replies.NULL_SENDER_NOT_ALLOWED.format(user=user.name, allowed=allowed)
        if not sender_allowed(user, sender):
            allowed = ", ".join(user.allowed_senders)
            return replies.SENDER_NOT_ALLOWED.format(sender=sender, user=user.name, allowed=allowed)
        return None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        problem = mailbox_problem(address, smtputf8=bool(envelope.smtp_utf8))
        if problem is Problem.NO_DOMAIN:
            return replies.RECIPIENT_NO_DOMAIN
        if problem is Problem.NEEDS_SMTPUTF8:
            return replies.RECIPIENT_NEEDS_SMTPUTF8
        if problem is not None:
            return replies.RECIPIENT_SYNTAX
        if len(envelope.rcpt_tos) >= self.smtp.max_recipients:
            return replies.TOO_MANY_RECIPIENTS.format(limit=self.smtp.max_recipients)
        if self.suppressions is not None and self.suppressions.refuses:
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
            entry = self.suppressions.check(address, sender)
            if entry is not None:
                return refusal_reply(address, entry)  # logged with the client by the server
        envelope.rcpt_tos.append(address)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = self.clock()
        msg_id = new_message_id(now)
        user = self._user(session)
        tls = server.uses_tls
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if tls:
            protocol += "S"
        if user is not None:
            protocol += "A"
        peer_ip = session.peer[0] if session.peer else "unknown"
        rcpts = tuple(envelope.rcpt_tos)
        # "for" names the recipient only when there is one: listing several would reveal
        # Bcc recipients to everyone.
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        received = (
            f"Received: from {UNSAFE_IN_HEADER.sub('?', session.host_name or 'unknown')}"
            f" ([{peer_ip}])\r\n"
            f"\tby {self.hostname} (relay) with {protocol} id {msg_id}{for_clause};"
            f"\r\n\t{self._received_date(now)}\r\n"
        ).encode("utf-8", "replace")
        opts = [o.upper() for o in envelope.mail_options]
        env = Envelope(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            rcpt_tos=rcpts,
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in opts,
            crlf_only=True,
        )
        detail: dict[str, Any] = {
            "client": peer_ip,
            "helo": session.host_name,
            "tls": tls,
            "protocol": protocol,
            "listener": self.listener.address,
            "size": len(envelope.content),
            "from": env.mail_from,
            "to": list(rcpts),
        }
        if tls:
            ssl_object = server.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                detail["tls_version"] = ssl_object.version()
        if user is not None:
            detail["user"] = user.name
        message = NewMessage(
            id=msg_id,
            kind=Kind.OUTBOUND,
            envelope=env,
            data=received + envelope.content,
            received_at=now,
            received=detail,
        )
        try:
            await self.submit(message)
        except StoreError as exc:
            full = isinstance(exc, StoreFull)
            log.error(
                "refusing mail from %s: %s",
                peer_ip,
                exc,
                extra={
                    # The cause; the 4xx reply itself is the NOQUEUE `refused` line.
                    "event": "queue_error",
                    "client": peer_ip,
                    "user": detail.get("user"),
                    "sender": env.mail_from,
                    "recipients": list(rcpts),
                    "size": len(message.data),
                    "reason": str(exc),
                    "reply": replies.QUEUE_FULL if full else replies.QUEUE_ERROR,
                },
            )
            return replies.QUEUE_FULL if full else replies.QUEUE_ERROR
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s queued from %s%s: <%s> -> %d recipient(s), %d bytes",
                msg_id,
                peer_ip,
                f" as {user.name}" if user else "",
                env.mail_from,
                len(rcpts),
                len(message.data),
                extra={
                    "event": "received",
                    "msg_id": msg_id,
                    "client": peer_ip,
                    "helo": detail["helo"],
                    "user": detail.get("user"),
                    "sender": env.mail_from,
                    "recipients": list(rcpts),
                    "size": len(message.data),
                    "tls": detail.get("tls_version"),
                    "listener": self.listener.address,
                },
            )
        return replies.QUEUED.format(id=msg_id)
