"""The `smtp` upstream and its client (`relay.smtpclient`) against real servers
on loopback: the relay's own listener as the smarthost, a scripted server that misbehaves
on demand (replies one by one, all at once, split mid-line; refusals; silence; TLS; AUTH),
and Postfix's smtp-sink."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config import Secret
from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, TransientError, UpstreamError
from relay.smtpclient import ProtocolViolation, Reply, _ReplyReader
from relay.upstreams.smtp import SMTPSettings, SMTPUpstream
from tests.conftest import PASSWORD, USER, RelayFactory, outbox, strip_received, wait_states

MESSAGE = b"From: <app@example.com>\r\nTo: <rcpt@example.org>\r\nSubject: hi\r\n\r\nHello.\r\n"
ENVELOPE = Envelope("app@example.com", ("rcpt@example.org",), crlf_only=True)


@asynccontextmanager
async def upstream(port: int, timeout: float = 5.0, **settings: Any) -> AsyncIterator[SMTPUpstream]:
    up = SMTPUpstream(
        "smarthost",
        SMTPSettings(host="127.0.0.1", port=port, **{"tls": "none", **settings}),
        timeout=timeout,
        pool_size=4,
        helo="client.test",
    )
    await up.start()
    try:
        yield up
    finally:
        await up.close()


# -- the reply parser, fed every way a reply can be cut ----------------------------------


def _parse(chunks: list[bytes]) -> tuple[list[Reply], _ReplyReader]:
    reader = _ReplyReader(asyncio.new_event_loop())
    for chunk in chunks:
        reader.data_received(chunk)
    return list(reader.replies), reader


def test_replies_parse_the_same_however_the_bytes_are_cut() -> None:
    wire = b"250-fake.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n250 2.1.0 Ok\r\n354 go\r\n"
    expected = [
        Reply(250, "fake.test\nPIPELINING\nSIZE 1000"),
        Reply(250, "2.1.0 Ok"),
        Reply(354, "go"),
    ]
    assert _parse([wire])[0] == expected
    assert _parse([bytes([b]) for b in wire])[0] == expected
    for cut in range(1, len(wire)):
        assert _parse([wire[:cut], wire[cut:]])[0] == expected, cut


def test_a_bare_code_and_lf_only_line_ends_are_replies_too() -> None:
    assert _parse([b"250\n250 \r\n"])[0] == [Reply(250, ""), Reply(250, "")]


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"hello there\r\n", "not an SMTP reply"),
        (b"250-a\r\n251 b\r\n", "reply code changed"),
        (b"250 " + b"x" * 9000 + b"\r\n", "longer than"),
        (b"250 " + b"x" * 9000, "longer than"),
    ],
)
def test_garbage_is_a_protocol_error(wire: bytes, problem: str) -> None:
    replies, reader = _parse([wire])
    assert replies == []
    assert isinstance(reader.error, ProtocolViolation)
    assert problem in str(reader.error)


# -- the relay's own listener as the smarthost ---------------------------------------------


BODY = (
    b".leading dot\r\n..two dots\r\n.\r\nnot the end\r\n"
    + "8-bit: Grüße, ünïcödé\r\n".encode()
    + b"x" * 3000
    + b"\r\n.\r\n"
)


async def test_messages_arrive_byte_identical_through_the_relay_listener(
    make_relay: RelayFactory,
) -> None:
    smarthost = await make_relay(smtp={"max_recipients": 40})
    port = smarthost.smtp_ports()[0]
    rcpts = tuple(f"r{i}@example.org" for i in range(45))
    utf8_message = "From: <jörg@example.com>\r\nSubject: ü\r\n\r\n".encode() + BODY
    async with upstream(port) as up:
        plain = await up.send(
            Envelope("app@example.com", (*rcpts, "nodomain"), body_8bit=True, crlf_only=True),
            b"From: <app@example.com>\r\nSubject: dots\r\n\r\n" + BODY,
        )
        utf8 = await up.send(
            Envelope("jörg@example.com", ("zoë@example.org",), smtputf8=True, body_8bit=True),
            utf8_message,
        )
    # 40 taken, 5 over the listener's limit (452: try later), one without a domain (553).
    assert sorted(plain.refused) == sorted((*rcpts[40:], "nodomain"))
    assert [plain.refused[r].permanent for r in rcpts[40:]] == [False] * 5
    assert plain.refused["nodomain"].permanent
    assert not utf8.refused and utf8.provider_id
    await wait_states(smarthost, sent=2)
    # Delivered by the smarthost's dispatcher side by side: in either order.
    stored = sorted(strip_received(m) for m in outbox(smarthost))
    sent = [b"From: <app@example.com>\r\nSubject: dots\r\n\r\n" + BODY, utf8_message]
    assert stored == sorted(sent)


async def test_starttls_and_auth_with_the_relay_listener(
    make_relay: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    smarthost = await make_relay(smtp={"trusted_networks": []})
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls: dict[str, Any] = {"tls": "starttls", "ca_file": str(ca_file), "username": USER}
    async with upstream(smarthost.smtp_ports()[0], password=Secret(PASSWORD), **tls) as up:
        result = await up.send(ENVELOPE, MESSAGE)
    assert result.provider_id and not result.refused
    async with upstream(smarthost.smtp_ports()[0], password=Secret("wrong"), **tls) as up:
        with pytest.raises(PermanentError, match="refused our credentials") as refused:
            await up.send(ENVELOPE, MESSAGE)
    assert refused.value.upstream_wide
    await wait_states(smarthost, sent=1)


# -- a scripted server ---------------------------------------------------------------------


@dataclass
class Script:
    """How the fake server behaves; what it saw is recorded on it."""

    greeting: str = "220 fake.test ESMTP"
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 10000000")
    ehlo_refused: bool = False
    #: together: one write per group of replies; one_by_one: a write each, small pauses;
    #: split: the group's bytes in 5-byte writes.
    mode: str = "together"
    #: Answer nothing until DATA arrives: only a pipelining client gets through.
    hold_until_data: bool = False
    mail_reply: str = "250 2.1.0 Ok"
    rset_reply: str = "250 2.0.0 Ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_anyway: bool = False  # 354 to DATA even with no recipient accepted
    final_reply: str = "250 2.0.0 Ok: queued as FAKE1"
    after_payload: str = "reply"  # reply | close | silent
    #: After its 354, the server reads none of the payload: "close" (a reset), or a reply
    #: it writes before it stops sending and reads the rest away.
    in_payload: str = ""
    silent_at: str = ""  # a command the server never answers
    #: After this many messages, the next MAIL of a session gets no reply: the connection
    #: is closed (a server timing out an idle connection, seen late by the client).
    drop_after: int | None = None
    tls: ssl.SSLContext | None = None  # offers STARTTLS with it
    credentials: tuple[str, str] | None = None  # offers AUTH and wants these
    mechanisms: str = "PLAIN LOGIN"
    refuse_mechanisms: frozenset[str] = frozenset()
    # recorded
    commands: list[str] = field(default_factory=list)
    command_reads: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    sessions: int = 0


class FakeServer:
    def __init__(self, script: Script, implicit_tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.implicit_tls = implicit_tls
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(
            self._session, "127.0.0.1", 0, ssl=self.implicit_tls
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    async def _flush(self, writer: asyncio.StreamWriter, replies: list[str]) -> None:
        wire = [r.replace("\n", "\r\n").encode() + b"\r\n" for r in replies]
        if self.script.mode == "one_by_one":
            for reply in wire:
                writer.write(reply)
                await writer.drain()
                await asyncio.sleep(0.002)
        elif self.script.mode == "split":
            data = b"".join(wire)
            for i in range(0, len(data), 5):
                writer.write(data[i : i + 5])
                await writer.drain()
                await asyncio.sleep(0.001)
        elif wire:
            writer.write(b"".join(wire))
            await writer.drain()
        replies.clear()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.script
        s.sessions += 1
        self._writers.append(writer)
        try:
            await self._converse(s, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _converse(
        self, s: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        replies: list[str] = [s.greeting]
        if not s.greeting.startswith("220"):
            await self._flush(writer, replies)
            return
        buffer, tls_on, mail_ok, rcpts_ok, login = b"", False, False, 0, ""
        while True:
            line, sep, rest = buffer.partition(b"\r\n")
            if not sep:
                holding = (
                    s.hold_until_data and s.commands and s.commands[-1][:4] in ("MAIL", "RCPT")
                )
                if not holding:
                    await self._flush(writer, replies)
                chunk = await reader.read(65536)
                if not chunk:
                    return
                s.command_reads.append(chunk)
                buffer += chunk
                continue
            buffer = rest
            command = line.decode("utf-8", "replace")
            s.commands.append(command)
            verb = command[:4].upper()
            if login:
                user = base64.b64decode(command).decode()
                if login == "user":
                    login, login_user = "pass", user
                    replies.append("334 UGFzc3dvcmQ6")
                else:
                    login = ""
                    ok = s.credentials == (login_user, user)
                    replies.append("235 2.7.0 ok" if ok else "535 5.7.8 bad credentials")
                continue
            if s.silent_at and verb == s.silent_at:
                await self._flush(writer, replies)
                await reader.read()  # until the client gives up
                return
            if verb == "EHLO":
                if s.ehlo_refused:
                    replies.append("502 5.5.2 EHLO not here")
                    continue
                offers = list(s.extensions)
                if s.tls is not None and not tls_on:
                    offers.append("STARTTLS")
                if s.credentials is not None:
                    offers.append("AUTH " + s.mechanisms)
                replies.append(
                    "\n".join(
                        ["250-fake.test"]
                        + [f"250-{o}" for o in offers[:-1]]
                        + [f"250 {offers[-1]}"]
                    )
                )
            elif verb == "HELO":
                replies.append("250 fake.test")
            elif verb == "STAR":
                assert s.tls is not None
                replies.append("220 2.0.0 go ahead")
                await self._flush(writer, replies)
                await writer.start_tls(s.tls)
                tls_on = True
            elif verb == "AUTH":
                mechanism, _, token = command[5:].partition(" ")
                if mechanism.upper() in s.refuse_mechanisms:
                    replies.append("504 5.5.4 not that one")
                elif mechanism.upper() == "PLAIN":
                    _, user, password = base64.b64decode(token).decode().split("\0")
                    ok = s.credentials == (user, password)
                    replies.append("235 2.7.0 ok" if ok else "535 5.7.8 bad credentials")
                else:
                    login = "user"
                    replies.append("334 VXNlcm5hbWU6")
            elif verb == "MAIL":
                if s.drop_after is not None and len(s.messages) >= s.drop_after:
                    s.drop_after = None
                    return
                mail_ok, rcpts_ok = s.mail_reply.startswith("250"), 0
                replies.append(s.mail_reply)
            elif verb == "RCPT":
                address = command[command.index("<") + 1 : command.rindex(">")]
                reply = (
                    s.rcpt_replies.get(address, "250 2.1.5 Ok")
                    if mail_ok
                    else "503 5.5.1 MAIL first"
                )
                rcpts_ok += reply.startswith("25")
                replies.append(reply)
            elif verb == "DATA":
                if not mail_ok:
                    replies.append("503 5.5.1 MAIL first")
                elif not rcpts_ok and not s.data_anyway:
                    replies.append("554 5.5.1 no valid recipients")
                else:
                    replies.append("354 go ahead")
                    await self._flush(writer, replies)
                    if s.in_payload == "close":
                        return
                    if s.in_payload:
                        replies.append(s.in_payload)
                        await self._flush(writer, replies)
                        writer.write_eof()
                        while await reader.read(1 << 20):
                            pass
                        return
                    while not (buffer.startswith(b".\r\n") or b"\r\n.\r\n" in buffer):
                        chunk = await reader.read(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    if buffer.startswith(b".\r\n"):
                        message, buffer = b"", buffer[3:]
                    else:
                        end = buffer.index(b"\r\n.\r\n")
                        message, buffer = buffer[: end + 2], buffer[end + 5 :]
                    s.messages.append(message)
                    mail_ok = False
                    if s.after_payload == "close":
                        return
                    if s.after_payload == "silent":
                        await reader.read()
                        return
                    replies.append(s.final_reply)
            elif verb == "RSET":
                mail_ok = False
                replies.append(s.rset_reply)
            elif verb == "QUIT":
                replies.append("221 2.0.0 Bye")
                await self._flush(writer, replies)
                return
            else:
                replies.append("502 5.5.2 unknown command")


async def _send(script: Script, *messages: bytes, **settings: Any) -> list[Accepted]:
    async with FakeServer(script) as fake, upstream(fake.port, **settings) as up:
        return [await up.send(ENVELOPE, m) for m in messages]


def _stuffed(message: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", message)


@pytest.mark.parametrize("mode", ["together", "one_by_one", "split"])
async def test_pipelined_replies_arrive_in_any_shape(mode: str) -> None:
    script = Script(mode=mode, hold_until_data=True)
    envelope = Envelope(
        "app@example.com", tuple(f"r{i}@example.org" for i in range(5)), crlf_only=True
    )
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        results = [await up.send(envelope, MESSAGE + b".x\r\n" * i) for i in range(3)]
    assert [r.provider_id for r in results] == ["FAKE1"] * 3
    assert script.messages == [_stuffed(MESSAGE + b".x\r\n" * i) for i in range(3)]
    assert script.sessions == 1  # one pooled connection: the next MAIL follows the "."
    assert "RSET" not in script.commands


async def test_without_pipelining_one_command_at_a_time() -> None:
    script = Script(extensions=("8BITMIME",))
    envelope = Envelope("app@example.com", ("a@example.org", "b@example.org"), crlf_only=True)
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        await up.send(envelope, MESSAGE)
    after_greeting = script.command_reads[1:-1]  # the last read is the payload
    assert all(read.count(b"\r\n") == 1 for read in after_greeting), after_greeting
    assert script.messages == [MESSAGE]


async def test_ehlo_refused_falls_back_to_helo() -> None:
    script = Script(ehlo_refused=True)
    assert (await _send(script, MESSAGE))[0].provider_id == "FAKE1"
    assert script.commands[:2] == ["EHLO client.test", "HELO client.test"]


async def test_multi_line_replies_and_the_queue_id_in_them() -> None:
    script = Script(
        greeting="220-fake.test ESMTP\n220-more about us\n220 welcome",
        final_reply="250-2.0.0 Ok\n250 2.0.0 queued as ABC123",
    )
    (result,) = await _send(script, MESSAGE)
    assert result.provider_id == "ABC123"
    assert result.detail == "250 2.0.0 Ok\n2.0.0 queued as ABC123"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_sender_refused_is_the_message_fault_and_the_session_goes_on(
    pipelining: bool,
) -> None:
    extensions = ("PIPELINING",) if pipelining else ("8BITMIME",)
    script = Script(extensions=extensions, mail_reply="550 5.7.1 not you")
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        with pytest.raises(PermanentError, match=r"refused sender <app@example\.com>: 550") as err:
            await up.send(ENVELOPE, MESSAGE)
        assert not err.value.upstream_wide
        script.mail_reply = "451 4.3.0 later"
        with pytest.raises(TransientError, match="451") as later:
            await up.send(ENVELOPE, MESSAGE)
        assert not later.value.upstream_wide
        script.mail_reply = "250 2.1.0 Ok"
        await up.send(ENVELOPE, MESSAGE)
    assert script.commands.count("RSET") == 2
    assert script.sessions == 1 and len(script.messages) == 1
    if pipelining:  # DATA went with MAIL and was refused (503), not answered 354
        assert script.commands.count("DATA") == 3


async def test_a_failed_rset_ends_the_session_but_keeps_the_refusal() -> None:
    """The sender's refusal is the outcome; the RSET after it failing only costs the
    connection (it was once turned into an error of the whole upstream)."""
    script = Script(extensions=("PIPELINING",), mail_reply="550 5.7.1 not you", rset_reply="500 no")
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        with pytest.raises(PermanentError, match="550") as err:
            await up.send(ENVELOPE, MESSAGE)
        assert not err.value.upstream_wide
        script.mail_reply = "250 2.1.0 Ok"
        await up.send(ENVELOPE, MESSAGE)
    assert script.sessions == 2 and len(script.messages) == 1


async def test_some_recipients_refused() -> None:
    script = Script(
        rcpt_replies={"b@example.org": "550 5.1.1 no such user", "c@example.org": "450 4.2.1 busy"}
    )
    envelope = Envelope(
        "app@example.com", ("a@example.org", "b@example.org", "c@example.org"), crlf_only=True
    )
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        result = await up.send(envelope, MESSAGE)
    assert {r: v.permanent for r, v in result.refused.items()} == {
        "b@example.org": True,
        "c@example.org": False,
    }
    assert "550 5.1.1 no such user" in result.refused["b@example.org"].reason
    assert script.messages == [MESSAGE]


@pytest.mark.parametrize("data_anyway", [False, True])
async def test_every_recipient_refused(data_anyway: bool) -> None:
    script = Script(
        rcpt_replies={"rcpt@example.org": "550 5.1.1 no such user"}, data_anyway=data_anyway
    )
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        result = await up.send(ENVELOPE, MESSAGE)
        script.rcpt_replies = {}
        await up.send(ENVELOPE, MESSAGE)  # the same session takes the next one
    assert result.detail == "every recipient refused"
    assert result.refused["rcpt@example.org"].permanent
    assert script.sessions == 1
    if data_anyway:  # RFC 2920 3.1: a 354 anyway is ended with a lone "."
        assert script.messages == [b"", MESSAGE]
        assert "RSET" not in script.commands
    else:
        assert script.messages == [MESSAGE]
        assert script.commands.count("RSET") == 1


@pytest.mark.parametrize(
    ("reply", "error"), [("554 5.6.0 spam", PermanentError), ("452 4.3.1 full", TransientError)]
)
async def test_the_message_refused_after_the_payload(
    reply: str, error: type[UpstreamError]
) -> None:
    with pytest.raises(error, match="refused the message: " + reply[:3]) as refused:
        await _send(Script(final_reply=reply), MESSAGE)
    assert not refused.value.upstream_wide and not refused.value.ambiguous


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.7.1 go away"])
async def test_refused_at_the_greeting_is_the_upstream_fault(greeting: str) -> None:
    with pytest.raises(TransientError, match="greeting: " + greeting[:3]) as refused:
        await _send(Script(greeting=greeting), MESSAGE)
    assert refused.value.upstream_wide


@pytest.mark.parametrize("after_payload", ["close", "silent"])
async def test_no_answer_after_the_payload_is_ambiguous(after_payload: str) -> None:
    script = Script(after_payload=after_payload)
    with pytest.raises(TransientError, match="may have been accepted") as lost:
        await _send(script, MESSAGE, timeout=0.5)
    assert lost.value.ambiguous
    assert script.messages == [MESSAGE]


#: Larger than loopback's socket buffers: the client is still writing when the server stops.
HUGE = b"Subject: scan\r\n\r\n" + (b"y" * 78 + b"\r\n") * 300_000


async def test_a_connection_lost_before_the_payload_ended_is_not_ambiguous() -> None:
    script = Script(in_payload="close")
    with pytest.raises(TransientError, match="the message's end was never sent") as lost:
        await _send(script, HUGE)
    assert not lost.value.ambiguous and script.messages == []


async def test_a_refusal_in_the_payload_then_a_close_is_the_servers_verdict() -> None:
    with pytest.raises(
        PermanentError, match=r"refused the message: 552 5\.3\.4 too big"
    ) as refused:
        await _send(Script(in_payload="552 5.3.4 too big"), HUGE)
    assert not refused.value.ambiguous


async def test_no_answer_to_mail_times_out_and_is_not_ambiguous() -> None:
    with pytest.raises(TransientError, match=r"did not answer: no reply within 0\.3 s") as silent:
        await _send(Script(silent_at="MAIL"), MESSAGE, timeout=0.3)
    assert silent.value.upstream_wide and not silent.value.ambiguous


async def test_garbage_from_the_server_is_a_clear_error() -> None:
    with pytest.raises(TransientError, match="not an SMTP reply") as garbage:
        await _send(Script(greeting="hello, I am not SMTP"), MESSAGE)
    assert garbage.value.upstream_wide


async def test_an_idle_connection_the_server_dropped_gets_one_fresh_try() -> None:
    script = Script(drop_after=1)
    results = await _send(script, MESSAGE, MESSAGE)
    assert [r.provider_id for r in results] == ["FAKE1", "FAKE1"]
    assert script.sessions == 2 and len(script.messages) == 2


async def test_a_fresh_connection_dropped_is_the_upstream_fault() -> None:
    with pytest.raises(TransientError, match="closed the connection") as dropped:
        await _send(Script(drop_after=0), MESSAGE)
    assert dropped.value.upstream_wide and not dropped.value.ambiguous


async def test_an_unasked_421_on_an_idle_connection_is_not_used() -> None:
    script = Script()
    async with FakeServer(script) as fake, upstream(fake.port) as up:
        await up.send(ENVELOPE, MESSAGE)
        (idle,) = up._idle
        # What a server that times the session out writes first (then it closes).
        idle._reader.data_received(b"421 4.4.2 fake.test timeout\r\n")
        assert not idle.reusable
        await up.send(ENVELOPE, MESSAGE)
    assert script.sessions == 2 and len(script.messages) == 2


# -- TLS and AUTH --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_tls(ca_module: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca_module.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def ca_module() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca_module: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("smtp-ca") / "ca.pem"
    ca_module.cert_pem.write_to_path(str(path))
    return str(path)


async def test_starttls_then_ehlo_again(server_tls: ssl.SSLContext, ca_file: str) -> None:
    script = Script(tls=server_tls)
    (result,) = await _send(script, MESSAGE, tls="starttls", ca_file=ca_file)
    assert result.provider_id == "FAKE1"
    assert script.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]


async def test_starttls_not_offered_is_the_upstream_fault(ca_file: str) -> None:
    with pytest.raises(TransientError, match="does not offer STARTTLS") as refused:
        await _send(Script(), MESSAGE, tls="starttls", ca_file=ca_file)
    assert refused.value.upstream_wide


async def test_a_certificate_we_do_not_trust_is_refused(server_tls: ssl.SSLContext) -> None:
    with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED") as untrusted:
        await _send(Script(tls=server_tls), MESSAGE, tls="starttls")
    assert untrusted.value.upstream_wide


async def test_implicit_tls(server_tls: ssl.SSLContext, ca_file: str) -> None:
    script = Script()
    async with (
        FakeServer(script, implicit_tls=server_tls) as fake,
        upstream(fake.port, tls="implicit", ca_file=ca_file) as up,
    ):
        result = await up.send(ENVELOPE, MESSAGE)
    assert result.provider_id == "FAKE1" and script.messages == [MESSAGE]


@pytest.mark.parametrize(
    ("mechanisms", "refuse", "expected"),
    [
        ("PLAIN LOGIN", frozenset(), ["AUTH PLAIN"]),
        ("LOGIN", frozenset(), ["AUTH LOGIN"]),
        ("PLAIN LOGIN", frozenset({"PLAIN"}), ["AUTH PLAIN", "AUTH LOGIN"]),
    ],
)
async def test_auth_plain_and_login(
    mechanisms: str, refuse: frozenset[str], expected: list[str]
) -> None:
    script = Script(credentials=("user", "pa ss"), mechanisms=mechanisms, refuse_mechanisms=refuse)
    (result,) = await _send(script, MESSAGE, username="user", password=Secret("pa ss"))
    assert result.provider_id == "FAKE1"
    assert [
        c.split(" ")[0] + " " + c.split(" ")[1] for c in script.commands if c.startswith("AUTH")
    ] == expected


@pytest.mark.parametrize("mechanisms", ["PLAIN", "LOGIN"])
async def test_wrong_credentials_are_a_permanent_upstream_fault(mechanisms: str) -> None:
    script = Script(credentials=("user", "right"), mechanisms=mechanisms)
    with pytest.raises(PermanentError, match="refused our credentials: 535") as refused:
        await _send(script, MESSAGE, username="user", password=Secret("wrong"))
    assert refused.value.upstream_wide
    assert script.messages == []


async def test_auth_not_offered_is_the_upstream_fault() -> None:
    with pytest.raises(TransientError, match="no AUTH at all") as missing:
        await _send(Script(), MESSAGE, username="user", password=Secret("pw"))
    assert missing.value.upstream_wide


# -- Postfix's smtp-sink -------------------------------------------------------------------


@pytest.fixture
def smtp_sink(unused_tcp_port: int) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{unused_tcp_port}", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    yield unused_tcp_port, sink
    sink.kill()
    sink.wait()


@pytest.mark.skipif(not shutil.which("smtp-sink"), reason="needs Postfix's smtp-sink")
async def test_a_thousand_messages_into_smtp_sink(
    smtp_sink: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, sink = smtp_sink
    async with asyncio.timeout(10):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # smtp-sink is still starting: nothing to await
                continue
            w.close()
            break
    message = MESSAGE + b"line\r\n" * 1000
    async with upstream(port) as up:

        async def worker(n: int) -> list[Accepted]:
            return [await up.send(ENVELOPE, message) for _ in range(n)]

        results = await asyncio.gather(*(worker(100) for _ in range(10)))
    assert sum(len(r) for r in results) == 1000
    assert all(not a.refused for r in results for a in r)
    sink.terminate()
    out, _ = sink.communicate(timeout=10)
    counters = re.findall(rb"mesg=(\d+)", out)
    assert counters and int(counters[-1]) == 1000, out[-200:]


def test_the_client_runs_under_uvloop() -> None:
    """uvloop's transports are not asyncio.Transport subclasses; `relay serve` uses it."""
    uvloop = pytest.importorskip("uvloop")

    async def relay_one() -> Accepted:
        async with FakeServer(Script()) as fake, upstream(fake.port) as up:
            return await up.send(ENVELOPE, MESSAGE)

    assert uvloop.run(relay_one()).provider_id == "FAKE1"


async def test_an_smtputf8_message_is_not_offered_to_a_server_without_it() -> None:
    """RFC 6531: SMTPUTF8 only where EHLO offers it; the refusal is transient and the
    message's own (another upstream may take it), and the session stays usable."""
    script = Script()  # PIPELINING, 8BITMIME, SIZE: no SMTPUTF8
    async with FakeServer(script) as server, upstream(server.port) as up:
        with pytest.raises(TransientError, match="does not offer SMTPUTF8") as info:
            await up.send(Envelope("jörg@example.com", ("a@example.org",), smtputf8=True), MESSAGE)
        assert not info.value.upstream_wide
        accepted = await up.send(Envelope("app@example.com", ("a@example.org",)), MESSAGE)
    assert accepted.provider_id == "FAKE1"
    assert not [c for c in script.commands if "SMTPUTF8" in c or "jörg" in c]
    assert script.sessions == 1
