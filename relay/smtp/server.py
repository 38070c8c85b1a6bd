"""The SMTP protocol: aiosmtpd, with our own DATA reader, AUTH for scanners and policy.

What differs from stock aiosmtpd, and why:
- DATA is read in blocks up to the one true end marker `<CRLF>.<CRLF>` into a spool that
  moves to disk past a threshold (`relay.smtp.data`): bounded memory, no smuggling.
- Envelope addresses are parsed by `relay.address` (strict RFC 5321/6531 grammar)
  instead of the email package's header parser, whose exceptions reached clients.
- AUTH LOGIN prompts are the `Username:`/`Password:` that picky scanners wait for, the
  user name may come inline, AUTH is accepted after HELO as well as EHLO (old devices do
  that; Postfix allows it), and password checks run off the event loop.
- Replies carry enhanced status codes (RFC 3463), say what to do, never echo a client's
  bytes unprintable and never carry exception text. Every refusal is logged once
  (`relay.smtp.refusals`); what a client sends during or after AUTH never is.
- Connections past the configured limits get `421 4.7.0` (`relay.smtp.limits`).
- At shutdown, sessions end with `421 4.3.2` between transactions, never inside one
  unless the grace period ran out (`relay.smtp.drain`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from asyncio import sslproto
from base64 import b64decode
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, TLSSetupException, _AuthMechAttr

from relay.address import split_path
from relay.smtp import replies
from relay.smtp.auth import Authenticator
from relay.smtp.data import DataError, Spool, read_data
from relay.smtp.drain import Sessions
from relay.smtp.limits import ConnectionLimits, LargeMessages
from relay.smtp.refusals import RefusalLog, printable

if TYPE_CHECKING:
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.smtp")

# Unrecognised commands a session may send before it is closed (aiosmtpd's own limit).
BOGUS_LIMIT = 5

Command = Callable[[str | None], Coroutine[Any, Any, None]]


class Commands(dict[str, Command]):
    """aiosmtpd's command table, where an unknown command finds `smtp_unknown`.

    aiosmtpd looks commands up with `.get()` and logs an unknown one's text at WARNING;
    after a refused AUTH that text is a client's base64 user name or password. `gate`
    sees every command before it runs (the shutdown drain answers some with 421).
    """

    def __init__(
        self,
        methods: dict[str, Command],
        unknown: Command,
        gate: Callable[[str, Command], Command],
    ) -> None:
        super().__init__(methods)
        self.unknown = unknown
        self.gate = gate
        self.last = "CONNECT"  # the command being answered, for the refusal log

    def get(self, key: str, default: Any = None) -> Command:
        method = super().get(key)
        self.last = key if method is not None else "UNKNOWN"
        return self.gate(key, method or self.unknown)


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}"
    return str(peer)


class RelaySMTP(SMTP):
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: Any,
        *,
        authenticator: Authenticator,
        implicit_tls: bool,
        max_auth_failures: int,
        limits: ConnectionLimits,
        large: LargeMessages,
        refusals: RefusalLog,
        spool_dir: Path | None,
        spool_threshold: int,
        telemetry: Telemetry | None = None,
        listener_name: str = "",
        sessions: Sessions | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.relay_authenticator = authenticator
        self.implicit_tls = implicit_tls
        self.max_auth_failures = max_auth_failures
        self.limits = limits
        self.large = large
        self.refusals = refusals
        self.spool_dir = spool_dir
        self.spool_threshold = spool_threshold
        self.telemetry = telemetry
        self.listener_name = listener_name  # the configured address, a metrics label
        self.sessions = sessions  # this process's open sessions, drained at shutdown
        self._reset_connection_state()

    def _reset_connection_state(self) -> None:
        self._auth_failures = 0
        self._bogus = 0
        self._in_greeting = False
        # The EHLO reply's lines, gathered to go out in one write, not one per line.
        self._ehlo_reply: list[str] | None = None
        self._slot: str | None = None  # the client address holding a connection slot
        self._refused = self._lost = False
        self._address = ""  # the path of the MAIL or RCPT being answered, for the log
        self._auth_login = ""  # the user name of the AUTH being answered, for the log
        # Where the session is, for the shutdown drain: running a command, storing a
        # message (the reply to DATA waits for the fsync), or told 421 and closing.
        self._busy = self._storing = self._closing = False

    @classmethod
    def from_template(cls, template: RelaySMTP) -> RelaySMTP:
        """A new connection's protocol, cloned from the listener's first one.

        aiosmtpd's constructor rebuilds its command, hook and AUTH tables with
        `inspect.getmembers` on every connection: 13 % of the CPU of a loaded relay in a
        py-spy profile. The tables only differ in which instance their methods are bound
        to, so the clone copies the template's settings and rebinds just those.
        """
        self = cls.__new__(cls)
        self.__dict__.update(template.__dict__)
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=template.loop, limit=template.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=template.loop,
        )
        self._smtp_methods = Commands(
            {name: getattr(self, f"smtp_{name}") for name in template._smtp_methods},
            self._unknown_command,
            self._gate,
        )
        self._auth_methods = {
            mech: _AuthMechAttr(getattr(self, attr.method.__name__), True)
            if attr.is_builtin
            else attr
            for mech, attr in template._auth_methods.items()
        }
        self.session = self.envelope = self.transport = None
        self._handler_coroutine = self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = self._original_transport = None
        self._reset_connection_state()
        return self

    # -- connections ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        if self._original_transport is None and not self._admit(transport):
            return
        # RFC 3207 asks clients to EHLO again after STARTTLS; several (aiosmtplib among
        # them, and scanners) go straight to AUTH or MAIL. The EHLO name carries no
        # security weight, so keep it rather than answer "503 send EHLO first".
        previous = self.session if self._original_transport is not None else None
        super().connection_made(transport)
        if previous is not None and self.session is not None:
            self.session.host_name = previous.host_name
            self.session.extended_smtp = previous.extended_smtp

    def _admit(self, transport: Any) -> bool:
        """Take a connection slot, or answer 421 and close (RFC 5321 3.8)."""
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "unknown"
        sessions = self.sessions
        if sessions is not None and sessions.draining:
            refusal: str | None = replies.SHUTTING_DOWN.format(hostname=self.hostname)
        else:
            refusal = self.limits.acquire(ip)
        if refusal is None:
            self._slot = ip
            if sessions is not None:
                sessions.add(self)
            if self.telemetry is not None:
                self.telemetry.session_opened(self.listener_name)
            return True
        self._refused = True
        self.refusals.refused(command="CONNECT", peer=_peer(peer), reply=refusal)
        transport.write(refusal.encode() + b"\r\n")
        transport.close()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd calls this itself after a failed STARTTLS handshake, then the
        # transport may call it again: the slot is given back once.
        if self._refused or self._lost:
            return
        self._lost = True
        if self._slot is not None:
            self.limits.release(self._slot)
            self._slot = None
        if self.sessions is not None:
            self.sessions.discard(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    async def _handle_client(self) -> None:
        """aiosmtpd's session loop, with network failures as one line, not a traceback
        from a task whose exception nobody retrieves."""
        try:
            await super()._handle_client()
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("%s connection lost: %s", self._peer_text, _reason(exc))

    @property
    def _peer_text(self) -> str:
        return _peer(self.session.peer if self.session else None)

    async def handle_exception(self, error: Exception) -> str:
        """The reply to a command that raised: never the exception's text (it reached
        clients as `500 Error: (AttributeError) ...`)."""
        if isinstance(error, TLSSetupException):
            # One line an operator can act on; scanners retry every minute.
            log.warning("%s TLS handshake failed: %s", self._peer_text, _reason(error.__cause__))
            return replies.INTERNAL_ERROR  # not sent: aiosmtpd closes the connection
        log.error("%s command failed", self._peer_text, exc_info=error)
        return replies.INTERNAL_ERROR

    # -- the shutdown drain (relay.smtp.drain) ------------------------------------------

    def _gate(self, name: str, method: Command) -> Command:
        """The command to run for `name`: `method`, or a 421 while the relay drains."""
        if self._busy:
            return method  # HELP looking a command up for its syntax, not running it
        if self._closing:
            return _ignore  # told 421 already: what the client pipelined after is not read
        sessions = self.sessions
        if (
            sessions is not None
            and sessions.draining
            and name != "QUIT"
            and not self._may_continue(sessions)
        ):
            return self._refuse_shutting_down
        return functools.partial(self._run_command, method)

    async def _run_command(self, method: Command, arg: str | None) -> None:
        self._busy = True
        try:
            await method(arg)
        finally:
            self._busy = False
        sessions = self.sessions
        if sessions is not None and sessions.draining and not self._may_continue(sessions):
            self._shut_down()  # the command is answered; the session ends here

    def _may_continue(self, sessions: Sessions) -> bool:
        """During the grace, a session inside a transaction (MAIL given) may finish it."""
        envelope = self.envelope
        return not sessions.grace_over and envelope is not None and envelope.mail_from is not None

    async def _refuse_shutting_down(self, _: str | None) -> None:
        self._shut_down()

    def drain_check(self) -> None:
        """Called when the drain begins and when its grace ends (see relay.smtp.drain)."""
        sessions = self.sessions
        if self._closing or self._storing or sessions is None:
            return  # a message being stored gets its reply; the 421 follows it
        if self._busy and not sessions.grace_over:
            return  # its command ends first; `_run_command` then decides
        if not self._busy and self._may_continue(sessions):
            return
        self._shut_down()

    def _shut_down(self) -> None:
        """Send `421 4.3.2` and close (RFC 5321 3.8), once."""
        if self._closing:
            return
        self._closing = True
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is None or transport.is_closing():
            return
        reply = replies.SHUTTING_DOWN.format(hostname=self.hostname)
        log.info("%s closed: %s", self._peer_text, reply)
        transport.write(reply.encode() + b"\r\n")
        transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()

    # -- replies -------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not (status.isascii() and status.isprintable()):
                # A reply that quotes the client must not carry its CR, NUL or 8-bit bytes.
                status = printable(status)
            code, sep, rest = status.partition(" ")
            enhanced = replies.ENHANCED_DEFAULTS.get(code)
            if sep and enhanced and not rest[:1].isdigit() and not self._in_greeting:
                status = f"{code} {enhanced} {rest}"
            if code[:1] in ("4", "5") and self.session is not None:
                self._log_refusal(status)
            if self.telemetry is not None:
                self._count_message(code, status)
            if self._ehlo_reply is not None:
                self._ehlo_reply.append(status)
                return
        await super().push(status)

    def _count_message(self, code: str, reply: str) -> None:
        """A transaction ends with the reply to DATA after its content (or to DATA when
        it is refused outright), or with a refused MAIL: one message offered, counted
        once. A DATA refused when no MAIL was taken is not a second message."""
        command = cast(Commands, self._smtp_methods).last
        if command == "DATA":
            if code == "354" or self.envelope is None or self.envelope.mail_from is None:
                return
        elif command != "MAIL" or code[:1] not in ("4", "5"):
            return
        assert self.telemetry is not None
        self.telemetry.message_replied(self.listener_name, reply)

    def _log_refusal(self, reply: str) -> None:
        assert self.session is not None
        command = getattr(self._smtp_methods, "last", "?")
        envelope = self.envelope
        sender = envelope.mail_from if envelope is not None else None
        recipient = None
        if command == "MAIL":
            sender = self._address
        elif command == "RCPT":
            recipient = self._address
        elif command == "DATA" and envelope is not None:
            recipient = ",".join(envelope.rcpt_tos)
        self.refusals.refused(
            command=command,
            peer=self._peer_text,
            reply=reply,
            user=self._user_name() or self._auth_login,
            sender="" if sender == "<>" else sender,
            recipient=recipient,
        )

    def _user_name(self) -> str | None:
        if self.session is None or not self.session.authenticated:
            return None
        name = self.session.auth_data
        return name if isinstance(name, str) else None

    async def smtp_EHLO(self, hostname: str) -> None:
        """aiosmtpd's EHLO, its seven or so lines sent in one write: a send() per line was
        half the system calls of a short session."""
        self._in_greeting = True
        self._ehlo_reply = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_greeting = False
            lines, self._ehlo_reply = self._ehlo_reply, None
            if lines:
                await super().push("\r\n".join(lines))

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_greeting = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_greeting = False

    async def _unknown_command(self, arg: str | None) -> None:
        """Not echoed and not logged: after a refused AUTH it may be a password."""
        self._bogus += 1
        if self._bogus >= BOGUS_LIMIT:
            await self.push(replies.TOO_MANY_UNKNOWN)
            assert self.transport is not None
            self.transport.close()
            return
        await self.push(replies.UNKNOWN_COMMAND)

    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS with two fixes: inside TLS it is refused (aiosmtpd started
        a second handshake and broke the session), and reading resumes once the socket
        belongs to the handshake. The session's reader pauses the socket when a client
        pipelines past its buffer; the handshake then never saw the client's hello and
        the connection hung until the session timeout. What the client pipelined after
        the command is discarded unread (RFC 3207 4.2)."""
        if self.uses_tls:
            await self.push(replies.ALREADY_TLS)
            return
        if arg:
            await self.push(replies.STARTTLS_SYNTAX)
            return
        if not self.tls_context:
            await self.push(replies.TLS_NOT_AVAILABLE)
            return
        await self.push(replies.TLS_GO_AHEAD)
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = plain = cast(asyncio.Transport, self.transport)
        plain.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(plain)
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        plain.resume_reading()
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    @property
    def uses_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    # -- addresses -----------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """(path, parameters); ("", "") makes aiosmtpd answer 501 (syntax). The mailbox
        itself is judged by the handler, which knows whether SMTPUTF8 was given."""
        path = split_path(arg)
        if path is None:
            self._address = arg.strip()
            return "", ""
        self._address = path[0]
        if not path[0]:
            return "<>", path[1]
        return path

    # -- AUTH ----------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH, also after HELO: old scanners send AUTH without EHLO, and
        Postfix accepts it. aiosmtpd answered them `500 not recognized`, then logged
        their base64 user name and password as unrecognised commands."""
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        args = (arg or "").split()
        status = await self._call_handler_hook("AUTH", args)
        if status is not MISSING:
            await self.push(status)
        elif self.session.authenticated:
            await self.push(replies.ALREADY_AUTHENTICATED)
        elif self._auth_require_tls and not self.uses_tls:
            await self.push(replies.AUTH_ENCRYPTION_REQUIRED)
        elif not 1 <= len(args) <= 2:
            await self.push(replies.AUTH_SYNTAX)
        elif args[0].upper() not in self._auth_methods:
            await self.push(replies.AUTH_UNKNOWN_MECHANISM)
        else:
            await self._authenticate_with(args)
        self._auth_login = ""

    async def _authenticate_with(self, args: list[str]) -> None:
        assert self.session is not None and self.transport is not None
        mechanism = self._auth_methods[args[0].upper()]
        result: AuthResult = await mechanism.method(self, args)
        if result.success:
            self.session.authenticated = True
            self.session.auth_data = result.auth_data
            await self.push(replies.AUTH_OK)
            return
        if not result.handled:
            await self.push(result.message or replies.AUTH_INVALID)
        if self._auth_failures >= self.max_auth_failures:
            await self.push(replies.AUTH_TOO_MANY)
            self.transport.close()

    async def _auth_answer(self, challenge: str, *, encode: bool = True) -> bytes | None:
        """The client's decoded answer to a 334 challenge, or None (already answered)."""
        try:
            answer = await self.challenge_auth(challenge, encode_to_b64=encode)
        except ValueError:  # longer than the line limit
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return None
        return answer if isinstance(answer, bytes) else None

    async def _initial_response(self, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except ValueError:
            await self.push(replies.AUTH_BAD_BASE64)
            return None

    def _failed(self, mechanism: str, login: bytes, message: str) -> AuthResult:
        self._auth_failures += 1
        self._auth_login = login.decode("utf-8", "replace")
        if self.telemetry is not None:
            self.telemetry.auth_failed(self.listener_name)
        log.info(
            "%s AUTH %s failed (%d of %d)",
            self._peer_text,
            mechanism,
            self._auth_failures,
            self.max_auth_failures,
        )
        return AuthResult(success=False, handled=False, message=message)

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        user = await self.relay_authenticator.check(login, password)
        if user is None:
            return self._failed(mechanism, login, replies.AUTH_INVALID)
        log.info("%s authenticated as %s", self._peer_text, printable(user.name))
        # The user's name, not the password: aiosmtpd keeps auth_data for the session.
        return AuthResult(success=True, auth_data=user.name)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = (
            await self._auth_answer("", encode=False)
            if len(args) == 1
            else await self._initial_response(args[1])
        )
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push(replies.AUTH_PLAIN_SYNTAX)
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616 2: `bob NUL alice NUL pw` asks to act as bob with alice's password.
            return self._failed("PLAIN", login, replies.AUTH_AUTHZID_REFUSED)
        return await self._check("PLAIN", login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = (
            await self._auth_answer(self.AuthLoginUsernameChallenge)
            if len(args) == 1
            else await self._initial_response(args[1])
        )
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_answer(self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check("LOGIN", login, password)

    # -- DATA ----------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        await self.push(replies.DATA_GO_AHEAD)
        spool = Spool(threshold=self.spool_threshold, directory=self.spool_dir)
        try:
            status = await self._receive(spool)
        finally:
            spool.close()
        if status is not None:
            await self.push(status)
            self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def _receive(self, spool: Spool) -> str | None:
        """Read the content and hand it on; the reply, or None if the client is gone."""
        assert self.session is not None and self.transport is not None
        try:
            await read_data(
                self._reader,
                spool,
                limit=self.data_size_limit or 2**31,
                normalize=self.event_handler.normalizes_bare_lf(self.session),
            )
        except DataError as exc:
            return exc.reply
        except asyncio.IncompleteReadError:
            log.info("%s disconnected during DATA; nothing stored", self._peer_text)
            self.transport.close()
            return None
        self._storing = True
        try:
            if not spool.on_disk:
                return await self._hand_off(spool)
            async with self.large.handoff():
                return await self._hand_off(spool)
        finally:
            self._storing = False

    async def _hand_off(self, spool: Spool) -> str:
        assert self.envelope is not None
        self.envelope.content = self.envelope.original_content = spool.read()
        spool.close()
        status: str = await self._call_handler_hook("DATA")
        self.envelope.content = self.envelope.original_content = None
        return status


async def _ignore(_: str | None) -> None:
    """A command that arrived after the session was told 421: not answered."""


def _reason(exc: BaseException | None) -> str:
    """An exception as a short phrase for a log line (an SSL error's reason code)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return printable(exc.reason)
    if exc is None:
        return "unknown error"
    return printable(f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)
