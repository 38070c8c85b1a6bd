"""The relay's SMTP and LMTP client, with PIPELINING (RFC 2920): the `smtp` upstream (the
smarthost) and the inbound `smtp` and `lmtp` destinations speak through it.

Why not aiosmtplib: it writes every command on its own and waits for its reply (a send()
and a wake-up per command, 16 % of the relay's GIL time at 100 KB), and it drops input that
arrives while a parsed reply waits to be picked up, so it cannot pipeline safely. Here every
byte the server sends is buffered and parsed, in order, into a queue of replies: replies
that arrive one per segment, all in one, or split anywhere read the same. With PIPELINING
a transaction costs two writes: MAIL, every RCPT and DATA together, then the payload.

Only what a relay needs to hand a message over: greeting, EHLO (HELO when refused) or
LMTP's LHLO (RFC 2033, over TCP or a Unix socket, one reply per recipient after the data),
STARTTLS (required or when offered) or implicit TLS, AUTH PLAIN and LOGIN, MAIL/RCPT/DATA,
RSET and QUIT. No BDAT. Failures are exceptions of this module; the caller decides what
they mean for a message.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

#: RFC 5321 4.5.3.1.5 allows 512 octets a reply line; real servers write longer ones
#: (long EHLO keywords, verbose refusals). Past this it is not SMTP.
MAX_LINE = 8192
#: Lines one reply may have (EHLO lists are the longest).
MAX_REPLY_LINES = 200
#: Payloads are written in slices of this size, each waited out with the timeout, so that
#: a large message on a slow link times out on lack of progress, not on its size.
WRITE_SLICE = 1 << 20


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    #: The text of every line after the code, joined with "\n".
    message: str

    def __str__(self) -> str:
        return f"{self.code} {self.message}".strip()


class SMTPClientError(Exception):
    """Anything that ends a session or a command badly."""


class ConnectionLost(SMTPClientError):
    """The server closed the connection (or it broke) while we waited for it."""


class ReplyTimeout(SMTPClientError):
    """No complete reply within the timeout; the connection has been closed."""


class ProtocolViolation(SMTPClientError):
    """The server wrote something that is not an SMTP reply; the connection is closed."""


class NotOffered(SMTPClientError):
    """The server does not offer what the configuration asks for (STARTTLS, AUTH)."""


class PayloadUnsent(SMTPClientError):
    """The connection failed before the payload's final "." was written: unlike a failure
    after it, the server cannot have taken the message."""


class ReplyError(SMTPClientError):
    """The server answered a session step (greeting, EHLO, STARTTLS, RSET) with a refusal."""

    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"{step}: {reply}")
        self.reply = reply


class AuthRefused(ReplyError):
    """Every AUTH mechanism we tried was refused."""


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(ReplyTimeout(f"no reply within {timeout:g} s"))


class _ReplyReader(asyncio.Protocol):
    """The socket end: buffers what arrives, parses replies into `replies`, never drops
    input; `wait` hands over a number of them. Also tracks write flow control."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lines: list[str] = []  # the reply in progress (multi-line)
        self._code = 0
        self.replies: deque[Reply] = deque()
        self.error: SMTPClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > MAX_LINE:
                self._fail(ProtocolViolation(f"a reply line longer than {MAX_LINE} bytes"))
                return
            if not self._line(buffer[start:end].rstrip(b"\r")):
                return
            start = end + 1
        self._buffer = buffer[start:] if start < len(buffer) else b""
        if len(self._buffer) > MAX_LINE:
            self._fail(ProtocolViolation(f"a reply line longer than {MAX_LINE} bytes"))
            return
        waiter = self._waiter
        if waiter is not None and len(self.replies) >= self._wanted and not waiter.done():
            waiter.set_result(None)

    def _line(self, line: bytes) -> bool:
        """One line of a reply (RFC 5321 4.2: code, then "-" on all lines but the last)."""
        separator = line[3:4]
        if not (line[:3].isdigit() and separator in (b" ", b"-", b"")):
            self._fail(ProtocolViolation(f"not an SMTP reply: {line[:80]!r}"))
            return False
        code = int(line[:3])
        if self._lines and code != self._code:
            self._fail(ProtocolViolation(f"reply code changed inside a reply: {line[:80]!r}"))
            return False
        if len(self._lines) >= MAX_REPLY_LINES:
            self._fail(ProtocolViolation(f"a reply of more than {MAX_REPLY_LINES} lines"))
            return False
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator != b"-":
            self.replies.append(Reply(code, "\n".join(self._lines)))
            self._lines = []
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = ConnectionLost(f"the server closed the connection{reason}")
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    # -- used by the client ---------------------------------------------------------------

    def _fail(self, error: SMTPClientError) -> None:
        """Stop reading for good: what follows bad input cannot be trusted."""
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        for waiter in (self._waiter, self._resumed):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    @property
    def pending_input(self) -> bool:
        """Something arrived that no command asked for (or half of it)."""
        return bool(self.replies or self._buffer or self._lines)

    async def wait(self, count: int, timeout: float) -> list[Reply]:
        """The next `count` replies, waiting at most `timeout` for all of them. Replies
        that arrived before the connection was lost are still handed over."""
        if len(self.replies) < count:
            waiter = self._loop.create_future()
            self._waiter, self._wanted = waiter, count
            try:
                if self.error is None:
                    await self._within(waiter, timeout)  # `count` replies in, or an error
            finally:
                self._waiter = None
            if len(self.replies) < count:
                raise self.error or ConnectionLost("the connection is closed")
        replies = self.replies
        return [replies.popleft() for _ in range(count)]

    async def drain(self, timeout: float) -> None:
        """Wait until the transport's buffer is below its low mark again."""
        if not self._paused:
            return
        self._resumed = waiter = self._loop.create_future()
        try:
            await self._within(waiter, timeout)
        finally:
            self._resumed = None
        if self.error is not None:
            raise self.error

    async def _within(self, waiter: asyncio.Future[None], timeout: float) -> None:
        """Await `waiter` for at most `timeout`; past it the connection fails for good (a
        late reply could no longer be told from the next one's)."""
        timer = self._loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        except ReplyTimeout as exc:
            self._fail(exc)
            raise
        finally:
            timer.cancel()


@dataclass(frozen=True, slots=True)
class EnvelopeReplies:
    """What the server said to MAIL, each RCPT and DATA. `data` is None when DATA was not
    sent (one command at a time, and nothing to send it for). `ready` means the server
    waits for the payload; otherwise the transaction has been ended (RSET or a lone ".")."""

    mail: Reply
    rcpts: list[Reply]
    data: Reply | None

    @property
    def ready(self) -> bool:
        return self.data is not None and self.data.code == 354 and self.accepted_any

    @property
    def accepted_any(self) -> bool:
        return self.mail.code == 250 and any(r.code in (250, 251) for r in self.rcpts)


class SMTPClient:
    """One session with a server. Use `connect`; then `begin` + `payload` per message."""

    def __init__(self, reader: _ReplyReader, timeout: float, *, lmtp: bool = False) -> None:
        self._reader = reader
        self.timeout = timeout
        self.lmtp = lmtp
        #: EHLO keywords (upper case) and their parameters; empty after HELO.
        self.extensions: dict[str, str] = {}
        self._busy = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        helo: str,
        tls: str = "none",
        tls_context: ssl.SSLContext | None = None,
        username: str = "",
        password: str = "",
        unix_socket: str = "",
        lmtp: bool = False,
    ) -> SMTPClient:
        """A session ready for MAIL: greeted, TLS as asked (`none`, `starttls`,
        `opportunistic`: STARTTLS when offered, `implicit`), authenticated when `username`
        is set (never in the clear after an opportunistic STARTTLS that was not offered).
        `unix_socket` instead of host and port; `lmtp` greets with LHLO. Closed again on
        any failure."""
        loop = asyncio.get_running_loop()
        implicit = tls == "implicit"
        if tls != "none" and tls_context is None:
            tls_context = ssl.create_default_context()
        async with asyncio.timeout(timeout):
            if unix_socket:
                _, reader = await loop.create_unix_connection(
                    lambda: _ReplyReader(loop), unix_socket
                )
            else:
                _, reader = await loop.create_connection(
                    lambda: _ReplyReader(loop),
                    host,
                    port,
                    ssl=tls_context if implicit else None,
                    server_hostname=host if implicit else None,
                    ssl_handshake_timeout=timeout if implicit else None,
                )
        client = cls(reader, timeout, lmtp=lmtp)
        try:
            (greeting,) = await reader.wait(1, timeout)
            if greeting.code != 220:
                raise ReplyError("the server refused the session at its greeting", greeting)
            await client._hello(helo)
            starttls = tls == "starttls" or (
                tls == "opportunistic" and "STARTTLS" in client.extensions
            )
            if starttls:
                assert tls_context is not None
                await client._starttls(loop, host, tls_context)
                await client._hello(helo)
            if username:
                if tls == "opportunistic" and not starttls:
                    # A STARTTLS stripped on the way would otherwise get the password.
                    raise NotOffered(
                        "the server does not offer STARTTLS and the password is not sent"
                        ' in the clear: enable STARTTLS there, or set tls = "none" to send'
                        " it anyway"
                    )
                await client._login(username, password)
        except BaseException:
            client.close()
            raise
        return client

    # -- session steps --------------------------------------------------------------------

    async def command(self, line: bytes) -> Reply:
        self._write(line + b"\r\n")
        (reply,) = await self._reader.wait(1, self.timeout)
        return reply

    async def _hello(self, name: str) -> None:
        verb = b"LHLO" if self.lmtp else b"EHLO"
        reply = await self.command(verb + b" " + name.encode("ascii", "replace"))
        if reply.code == 250:
            self.extensions = _extensions(reply.message)
            return
        if reply.code < 500 or self.lmtp:  # LMTP has no HELO to fall back to
            raise ReplyError(verb.decode(), reply)
        reply = await self.command(b"HELO " + name.encode("ascii", "replace"))
        if reply.code != 250:
            raise ReplyError("HELO", reply)
        self.extensions = {}

    async def _starttls(
        self, loop: asyncio.AbstractEventLoop, host: str, context: ssl.SSLContext
    ) -> None:
        if "STARTTLS" not in self.extensions:
            raise NotOffered('the server does not offer STARTTLS (set tls = "none" or fix it)')
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            raise ReplyError("STARTTLS", reply)
        reader = self._reader
        if reader.pending_input:  # written before TLS, read as if after: an injection
            raise ProtocolViolation("the server sent data after its STARTTLS reply")
        assert reader.transport is not None
        transport = await loop.start_tls(
            reader.transport,
            reader,
            context,
            server_hostname=host,
            ssl_handshake_timeout=self.timeout,
        )
        if transport is None:
            raise ConnectionLost("the connection closed during the TLS handshake")
        reader.transport = transport

    async def _login(self, username: str, password: str) -> None:
        offered = self.extensions.get("AUTH", "").upper().split()
        mechanisms = [m for m in ("PLAIN", "LOGIN") if m in offered]
        if not mechanisms:
            raise NotOffered(
                "the server offers no AUTH PLAIN or LOGIN"
                + ("" if offered else " (no AUTH at all: is TLS needed first?)")
            )
        refusal: Reply | None = None
        for mechanism in mechanisms:  # some servers advertise one they refuse: try the next
            refusal = await (self._auth_plain if mechanism == "PLAIN" else self._auth_login)(
                username.encode(), password.encode()
            )
            if refusal is None:
                return
        assert refusal is not None
        raise AuthRefused(f"AUTH {mechanisms[-1]}", refusal)

    async def _auth_plain(self, username: bytes, password: bytes) -> Reply | None:
        token = base64.b64encode(b"\0" + username + b"\0" + password)
        reply = await self.command(b"AUTH PLAIN " + token)
        return None if reply.code == 235 else reply

    async def _auth_login(self, username: bytes, password: bytes) -> Reply | None:
        reply = await self.command(b"AUTH LOGIN")
        for secret in (username, password):
            if reply.code != 334:
                return reply
            reply = await self.command(base64.b64encode(secret))
        return None if reply.code == 235 else reply

    # -- a transaction --------------------------------------------------------------------

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def begin(self, mail: bytes, rcpts: Sequence[bytes]) -> EnvelopeReplies:
        """MAIL, each RCPT and DATA (full command lines without CRLF); pipelined in one
        write when the server offers it (RFC 2920), otherwise one at a time stopping at
        the first refusal that makes DATA pointless. Unless the result is `ready`, the
        transaction is over when this returns and the session may take the next one."""
        self._busy = True
        if self.pipelining:
            self._write(b"\r\n".join([mail, *rcpts, b"DATA", b""]))
            replies = await self._reader.wait(len(rcpts) + 2, self.timeout)
            result = EnvelopeReplies(replies[0], replies[1:-1], replies[-1])
        else:
            result = await self._one_at_a_time(mail, rcpts)
        if result.ready:
            return result  # still busy: the payload must follow
        if result.data is not None and result.data.code == 354:
            # RFC 2920 3.1: DATA accepted though MAIL or every RCPT was refused: the
            # client sends a lone "." (an empty message with nobody to deliver it to).
            await self.command(b".")
        else:
            await self._reset(result)
        self._busy = False
        return result

    async def _one_at_a_time(self, mail: bytes, rcpts: Sequence[bytes]) -> EnvelopeReplies:
        mail_reply = await self.command(mail)
        if mail_reply.code != 250:
            return EnvelopeReplies(mail_reply, [], None)
        rcpt_replies = [await self.command(rcpt) for rcpt in rcpts]
        if not any(r.code in (250, 251) for r in rcpt_replies):
            return EnvelopeReplies(mail_reply, rcpt_replies, None)
        return EnvelopeReplies(mail_reply, rcpt_replies, await self.command(b"DATA"))

    async def _reset(self, result: EnvelopeReplies) -> None:
        """RSET after an aborted transaction, unless the server said it is closing. The
        transaction's outcome is known already (the refusals): a failed RSET only ends
        the session, it must not turn those refusals into an error of the upstream's."""
        replies = [result.mail, *result.rcpts, *([result.data] if result.data else [])]
        if any(r.code == 421 for r in replies):
            self.close()
            return
        try:
            reply = await self.command(b"RSET")
        except SMTPClientError:
            self.close()
            return
        if reply.code != 250:
            self.close()

    async def payload(self, payload: bytes) -> Reply:
        """The dot-stuffed message (ending in CRLF "." CRLF) after a `ready` begin, and
        the server's final reply to it."""
        (reply,) = await self.payload_replies(payload, 1)
        return reply

    async def payload_replies(self, payload: bytes, count: int) -> list[Reply]:
        """`payload`, for LMTP: the server answers once per accepted recipient, in the
        order of the RCPTs (RFC 2033 4.2); `count` is how many were accepted."""
        reader = self._reader
        try:
            if len(payload) <= WRITE_SLICE:
                self._write(payload)
            else:
                view = memoryview(payload)
                for start in range(0, len(payload), WRITE_SLICE):
                    if start:
                        await reader.drain(self.timeout)
                    self._write(view[start : start + WRITE_SLICE])
        except SMTPClientError as exc:
            if len(reader.replies) >= count:  # the server's verdict ("552 too big"), then a close
                return [reader.replies.popleft() for _ in range(count)]
            said = f" after the server said {reader.replies[0]}" if reader.replies else ""
            raise PayloadUnsent(f"the message's end was never sent{said}: {exc}") from exc
        replies = await reader.wait(count, self.timeout)
        self._busy = False
        return replies

    # -- the connection -------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        reader = self._reader
        if reader.error is not None:
            raise reader.error
        assert reader.transport is not None
        if reader.transport.is_closing():
            raise ConnectionLost("the connection is closed")
        reader.transport.write(data)

    @property
    def reusable(self) -> bool:
        """Between transactions, still open, and the server has said nothing unasked (an
        idle connection the server times out gets "421" and a close)."""
        reader = self._reader
        return (
            not self._busy
            and reader.error is None
            and reader.transport is not None
            and not reader.transport.is_closing()
            and not reader.pending_input
        )

    async def quit(self) -> None:
        """QUIT politely (errors ignored), then close."""
        try:
            if self.reusable:
                await self.command(b"QUIT")
        except SMTPClientError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        transport = self._reader.transport
        if transport is not None and not transport.is_closing():
            transport.close()


def client_tls_context(*, verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """The client side of TLS: the system's CAs (or `ca_file`), hostname checked unless
    `verify` is off (a smarthost with a self-signed certificate on a private network)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def mail_command(sender: str, *, utf8: bool, body_8bit: bool) -> bytes:
    """MAIL FROM:<sender> with SMTPUTF8 (RFC 6531) and BODY=8BITMIME (RFC 6152) as asked;
    ValueError when the address cannot be written in a command line."""
    line = b"MAIL FROM:<" + _path(sender, utf8=utf8) + b">"
    if utf8:
        line += b" SMTPUTF8"
    if body_8bit:
        line += b" BODY=8BITMIME"
    return line


def rcpt_command(recipient: str, *, utf8: bool) -> bytes:
    """RCPT TO:<recipient>; ValueError as for `mail_command`."""
    return b"RCPT TO:<" + _path(recipient, utf8=utf8) + b">"


def _path(address: str, *, utf8: bool) -> bytes:
    """An address for MAIL FROM:<...> or RCPT TO:<...>: UTF-8 only with SMTPUTF8 (RFC
    6531); ValueError when it cannot be written in a command line at all (a CRLF in it
    would be a second command)."""
    try:
        raw = address.encode("utf-8" if utf8 else "ascii")
    except UnicodeEncodeError:
        raise ValueError(f"address {address!r} is not ASCII and SMTPUTF8 is off") from None
    if any(c in raw for c in b"\r\n<> "):
        raise ValueError(f"address {address!r} cannot be written in an SMTP command")
    return raw


def _extensions(ehlo: str) -> dict[str, str]:
    """EHLO's lines after the first: a keyword and its parameters (RFC 5321 4.1.1.1);
    "AUTH=PLAIN LOGIN" is an old form of "AUTH PLAIN LOGIN"."""
    found: dict[str, str] = {}
    for line in ehlo.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):
            keyword, params = "AUTH", keyword[5:] + " " + params
        if keyword:
            found.setdefault(keyword.upper(), params.strip())
    return found
