"""Each destination end to end against real servers and directories on this machine.

SMTP and LMTP sinks are aiosmtpd protocol instances served from the test's own event loop
(no threads, nothing to wait for but the replies); the webhook receiver is a real aiohttp
server that fails on command and checks the signature the way a receiver should.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.config import ConfigError, Duration, Secret
from relay.inbound.destinations.base import PartialPermanent, PartialTransient
from relay.inbound.destinations.directory import DirectoryDestination, DirectoryDestinationConfig
from relay.inbound.destinations.maildir import MaildirDestination
from relay.inbound.destinations.registry import build_destination_config, create_destination
from relay.inbound.destinations.smtp import (
    LMTPDestination,
    SMTPDestination,
    SMTPDestinationConfig,
)
from relay.inbound.destinations.webhook import (
    WebhookDestination,
    WebhookDestinationConfig,
    sign_webhook,
)
from relay.inbound.parse import ParsedMessage, parse_message
from relay.outcomes import PermanentError, TransientError
from relay.wire import dot_stuff
from tests.fakes.ses_inbound import SIMPLE_MESSAGE

RAW = SIMPLE_MESSAGE
PARSED = parse_message(RAW)
NO_ATTACHMENTS = parse_message(b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n")


# -- maildir -----------------------------------------------------------------------------------


async def test_maildir_single_folder(tmp_path: Path) -> None:
    dest = MaildirDestination("box", tmp_path / "Maildir")
    await dest.start()
    result = await dest.deliver(RAW, PARSED, ["docs@example.com", "ops@example.com"])
    [name] = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes() == RAW
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert name in result


async def test_maildir_per_recipient(tmp_path: Path) -> None:
    dest = MaildirDestination("box", tmp_path, per_recipient=True)
    await dest.start()
    await dest.deliver(RAW, PARSED, ["Docs@Example.com", "../../ops@example.com"])
    assert sorted(os.listdir(tmp_path)) == ["docs@example.com", "ops@example.com"]
    for folder in os.listdir(tmp_path):
        [name] = os.listdir(tmp_path / folder / "new")
        assert (tmp_path / folder / "new" / name).read_bytes() == RAW


async def test_maildir_unwritable_is_transient(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    dest = MaildirDestination("box", blocker / "Maildir")
    with pytest.raises(TransientError) as info:
        await dest.deliver(RAW, PARSED, ["docs@example.com"])
    assert info.value.upstream_wide


# -- directory ---------------------------------------------------------------------------------


async def test_directory_writes_attachments_only(tmp_path: Path) -> None:
    dest = DirectoryDestination("docs", tmp_path / "scans")
    await dest.start()
    result = await dest.deliver(RAW, PARSED, ["docs@example.com"])
    assert os.listdir(tmp_path / "scans") == ["scan 42.pdf"]
    assert (tmp_path / "scans" / "scan 42.pdf").read_bytes() == b"%PDF-1.4 fake scan\n"
    assert "scan 42.pdf" in result


async def test_directory_never_overwrites(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "scan 42.pdf").write_bytes(b"someone else's file")
    dest = DirectoryDestination("docs", scans)
    await dest.deliver(RAW, PARSED, ["docs@example.com"])
    await dest.deliver(RAW, PARSED, ["docs@example.com"])
    assert sorted(os.listdir(scans)) == ["scan 42-1.pdf", "scan 42-2.pdf", "scan 42.pdf"]
    assert (scans / "scan 42.pdf").read_bytes() == b"someone else's file"
    assert (scans / "scan 42-2.pdf").read_bytes() == b"%PDF-1.4 fake scan\n"


async def test_directory_traversal_stays_inside(tmp_path: Path) -> None:
    raw = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n--B\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="../../etc/passwd"\r\n\r\n'
        b"pwned\r\n--B--\r\n"
    )
    inside = tmp_path / "inside"
    dest = DirectoryDestination("docs", inside)
    await dest.start()
    await dest.deliver(raw, parse_message(raw), ["docs@example.com"])
    assert os.listdir(inside) == ["passwd"]
    assert sorted(os.listdir(tmp_path)) == ["inside"]


async def test_directory_per_recipient_and_no_attachments(tmp_path: Path) -> None:
    dest = DirectoryDestination("docs", tmp_path, per_recipient=True)
    await dest.start()
    await dest.deliver(RAW, PARSED, ["a@example.com", "b@example.com"])
    assert os.listdir(tmp_path / "a@example.com") == ["scan 42.pdf"]
    assert os.listdir(tmp_path / "b@example.com") == ["scan 42.pdf"]
    result = await dest.deliver(RAW, NO_ATTACHMENTS, ["a@example.com"])
    assert "no attachments" in result


# -- SMTP and LMTP sinks -------------------------------------------------------------------------


@dataclass
class Sink:
    """An aiosmtpd handler: records deliveries; answers as told."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 queued as SINK1"
    lmtp_replies: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.rcpt_replies.get(address, "250 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, LMTP):  # RFC 2033: one reply per accepted recipient
            replies = [self.lmtp_replies.get(r, "250 2.0.0 delivered") for r in envelope.rcpt_tos]
            for r, reply in zip(envelope.rcpt_tos, replies, strict=True):
                if reply.startswith("250"):
                    self.messages.append(
                        (str(envelope.mail_from), [r], bytes(envelope.original_content or b""))
                    )
            return "\r\n".join(replies)
        if self.data_reply.startswith("250"):
            self.messages.append(
                (
                    str(envelope.mail_from),
                    list(envelope.rcpt_tos),
                    bytes(envelope.original_content or b""),
                )
            )
        return self.data_reply


async def serve(
    factory: Callable[[], asyncio.Protocol], *, port: int = 0, path: str | None = None
) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    if path is not None:
        server = await loop.create_unix_server(factory, path)
        return server, 0
    server = await loop.create_server(factory, "127.0.0.1", port)
    return server, server.sockets[0].getsockname()[1]


def smtp_factory(sink: Sink) -> Callable[[], asyncio.Protocol]:
    return lambda: SMTP(sink, hostname="sink.test", enable_SMTPUTF8=True)


def lmtp_factory(sink: Sink) -> Callable[[], asyncio.Protocol]:
    return lambda: LMTP(sink, hostname="lmtp.test", enable_SMTPUTF8=True)


@pytest.fixture
async def smtp_sink() -> AsyncIterator[tuple[Sink, int]]:
    sink = Sink()
    server, port = await serve(smtp_factory(sink))
    yield sink, port
    server.close()
    await server.wait_closed()


def smtp_dest(port: int, **kw: Any) -> SMTPDestination:
    dest = create_destination(
        build_destination_config(
            {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": port,
                "tls": "none",
                "timeout": "5s",
                **kw,
            }
        )
    )
    assert isinstance(dest, SMTPDestination)
    return dest


async def test_smtp_forward(smtp_sink: tuple[Sink, int]) -> None:
    sink, port = smtp_sink
    result = await smtp_dest(port).deliver(
        RAW, PARSED, ["docs@example.com"], sender="scanner@partner.example"
    )
    assert "queued as SINK1" in result
    [(mail_from, rcpts, data)] = sink.messages
    assert (mail_from, rcpts) == ("scanner@partner.example", ["docs@example.com"])
    assert data.replace(b"\r\n", b"\n") == RAW.replace(b"\r\n", b"\n")


async def test_smtp_mail_from_override(smtp_sink: tuple[Sink, int]) -> None:
    sink, port = smtp_sink
    await smtp_dest(port, mail_from="relay@example.com").deliver(
        RAW, PARSED, ["docs@example.com"], sender="scanner@partner.example"
    )
    assert sink.messages[0][0] == "relay@example.com"


async def test_smtp_4xx_is_transient_and_5xx_permanent(smtp_sink: tuple[Sink, int]) -> None:
    sink, port = smtp_sink
    sink.data_reply = "451 4.3.0 try again later"
    with pytest.raises(TransientError, match="451"):
        await smtp_dest(port).deliver(RAW, PARSED, ["docs@example.com"])
    sink.data_reply = "554 5.6.0 rejected content"
    with pytest.raises(PermanentError, match="554"):
        await smtp_dest(port).deliver(RAW, PARSED, ["docs@example.com"])
    assert sink.messages == []


async def test_smtp_partial_refusal_reports_who_got_it(smtp_sink: tuple[Sink, int]) -> None:
    sink, port = smtp_sink
    sink.rcpt_replies = {
        "gone@example.com": "550 5.1.1 no such user",
        "full@example.com": "452 4.2.2 mailbox full",
    }
    with pytest.raises(PartialTransient) as info:
        await smtp_dest(port).deliver(
            RAW, PARSED, ["docs@example.com", "gone@example.com", "full@example.com"]
        )
    assert info.value.delivered == ("docs@example.com",)
    assert info.value.refused["gone@example.com"].permanent
    assert not info.value.refused["full@example.com"].permanent
    assert sink.messages[0][1] == ["docs@example.com"]

    sink.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
    with pytest.raises(PartialPermanent):
        await smtp_dest(port).deliver(RAW, PARSED, ["docs@example.com", "gone@example.com"])
    with pytest.raises(PermanentError, match="every recipient refused"):
        await smtp_dest(port).deliver(RAW, PARSED, ["gone@example.com"])


async def test_smtp_server_down_then_up() -> None:
    sink = Sink()
    server, port = await serve(smtp_factory(sink))
    server.close()
    await server.wait_closed()
    dest = smtp_dest(port)
    with pytest.raises(TransientError) as info:
        await dest.deliver(RAW, PARSED, ["docs@example.com"])
    assert info.value.upstream_wide and not info.value.ambiguous
    server, _ = await serve(smtp_factory(sink), port=port)
    try:
        await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        server.close()
        await server.wait_closed()
    assert len(sink.messages) == 1


def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a certificate for 127.0.0.1 from a throwaway CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_smtp_opportunistic_starttls_then_login() -> None:
    server_tls, client_tls = tls_pair()
    sink = Sink()

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (data.login, data.password) == (b"scanner", b"s3cret")
        return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535

    server, port = await serve(
        lambda: SMTP(
            sink,
            hostname="sink.test",
            tls_context=server_tls,
            require_starttls=True,  # MAIL before STARTTLS gets 530: a delivery proves TLS
            authenticator=authenticator,
            auth_require_tls=True,
        )
    )
    try:

        def dest(password: str) -> SMTPDestination:
            settings = SMTPDestinationConfig(
                host="127.0.0.1",
                port=port,
                tls="opportunistic",
                username="scanner",
                password=Secret(password),
                timeout=Duration(5.0),
            )
            return SMTPDestination("office", settings, tls_context=client_tls)

        result = await dest("s3cret").deliver(RAW, PARSED, ["docs@example.com"])
        assert "queued as SINK1" in result and len(sink.messages) == 1
        with pytest.raises(TransientError, match="authentication failed") as info:
            await dest("wrong").deliver(RAW, PARSED, ["docs@example.com"])
        assert info.value.upstream_wide and len(sink.messages) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_smtp_opportunistic_without_starttls_keeps_the_password() -> None:
    """A server (or someone between) that does not offer STARTTLS is not sent the
    password in the clear; the destination says why and what to set."""
    sink = Sink()
    tried: list[bytes] = []

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        tried.append(data.password)
        return AuthResult(success=True)

    server, port = await serve(
        lambda: SMTP(
            sink, hostname="sink.test", authenticator=authenticator, auth_require_tls=False
        )
    )
    try:
        settings = SMTPDestinationConfig(
            host="127.0.0.1",
            port=port,
            tls="opportunistic",
            username="scanner",
            password=Secret("s3cret"),
            timeout=Duration(5.0),
        )
        dest = SMTPDestination("office", settings)
        with pytest.raises(TransientError, match="not sent in the clear") as info:
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
        assert 'set tls = "none"' in str(info.value) and info.value.upstream_wide
        assert tried == [] and sink.messages == []
        plain = SMTPDestination("office", dataclasses.replace(settings, tls="none"))
        await plain.deliver(RAW, PARSED, ["docs@example.com"])  # the operator's choice
        assert tried == [b"s3cret"] and len(sink.messages) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_smtp_connection_lost_after_the_data_is_ambiguous() -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"DATA"):
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                break  # the message in full, and no answer to it
            writer.write(b"250 ok\r\n")
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        dest = smtp_dest(server.sockets[0].getsockname()[1])
        with pytest.raises(TransientError, match="may have been delivered") as info:
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
        assert info.value.ambiguous
    finally:
        server.close()
        await server.wait_closed()


async def test_an_address_that_cannot_be_written_in_a_command_is_refused_unsent(
    smtp_sink: tuple[Sink, int],
) -> None:
    sink, port = smtp_sink
    with pytest.raises(PermanentError, match="cannot be written in an SMTP command"):
        await smtp_dest(port).deliver(
            RAW, PARSED, ["docs@example.com>\r\nRCPT TO:<someone@elsewhere.example"]
        )
    assert sink.messages == []


async def test_an_international_address_waits_for_a_server_that_offers_smtputf8() -> None:
    sink = Sink()
    server, port = await serve(lambda: SMTP(sink, hostname="sink.test", enable_SMTPUTF8=False))
    try:
        with pytest.raises(TransientError, match="does not offer SMTPUTF8") as info:
            await smtp_dest(port).deliver(RAW, PARSED, ["jürgen@example.com"])
        assert not info.value.upstream_wide  # the address's need, not a broken server
    finally:
        server.close()
        await server.wait_closed()
    assert sink.messages == []


async def test_lmtp_per_recipient_replies() -> None:
    sink = Sink(
        lmtp_replies={"full@example.com": "452 4.2.2 mailbox full"},
        rcpt_replies={"gone@example.com": "550 5.1.1 unknown"},
    )
    server, port = await serve(lmtp_factory(sink))
    try:
        dest = create_destination(
            build_destination_config({"type": "lmtp", "host": "127.0.0.1", "port": port})
        )
        assert isinstance(dest, LMTPDestination)
        with pytest.raises(PartialTransient) as info:
            await dest.deliver(
                RAW,
                PARSED,
                ["a@example.com", "full@example.com", "gone@example.com", "b@example.com"],
                sender="scanner@partner.example",
            )
        assert info.value.delivered == ("a@example.com", "b@example.com")
        assert set(info.value.refused) == {"full@example.com", "gone@example.com"}
        assert [m[1] for m in sink.messages] == [["a@example.com"], ["b@example.com"]]
        assert sink.messages[0][2].replace(b"\r\n", b"\n") == RAW.replace(b"\r\n", b"\n")

        sink.messages.clear()
        result = await dest.deliver(RAW, PARSED, ["a@example.com"])
        assert "250" in result and len(sink.messages) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_lmtp_over_unix_socket(tmp_path: Path) -> None:
    sink = Sink()
    path = str(tmp_path / "lmtp.sock")
    server, _ = await serve(lmtp_factory(sink), path=path)
    try:
        dest = create_destination(build_destination_config({"type": "lmtp", "socket": path}))
        await dest.deliver(RAW, PARSED, ["a@example.com"])
    finally:
        server.close()
        await server.wait_closed()
    assert sink.messages[0][1] == ["a@example.com"]


async def test_lmtp_down_is_transient(tmp_path: Path) -> None:
    dest = create_destination(
        build_destination_config({"type": "lmtp", "socket": str(tmp_path / "nobody-listens.sock")})
    )
    with pytest.raises(TransientError) as info:
        await dest.deliver(RAW, PARSED, ["a@example.com"])
    assert not info.value.ambiguous


def test_dot_stuffing() -> None:
    assert dot_stuff(b".hidden\n..two\nend") == b"..hidden\r\n...two\r\nend\r\n.\r\n"
    # A body the listener already checked is not rescanned, and comes out the same.
    crlf = b".hidden\r\n..two\r\nend\r\n"
    assert (
        dot_stuff(crlf, crlf_checked=True) == dot_stuff(crlf) == dot_stuff(b".hidden\n..two\nend")
    )


# -- webhook -------------------------------------------------------------------------------------

SECRET = "s3cret-shared"


@dataclass
class Receiver:
    """A webhook receiver: fails with `fail_with` `failures` times, then accepts."""

    failures: int = 0
    fail_with: int = 503
    retry_after: str | None = None
    hang: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    never: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.hang:
            await self.never.wait()  # released at teardown; the client times out first
        expected = sign_webhook(SECRET, request.headers["X-Relay-Timestamp"], body)
        if not hmac.compare_digest(expected, request.headers.get("X-Relay-Signature", "")):
            return web.Response(status=401, text="bad signature")
        if self.failures > 0:
            self.failures -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.fail_with, text="not now", headers=headers)
        entry: dict[str, Any] = {
            "headers": dict(request.headers),
            "body": body,
            "content_type": request.content_type,
        }
        if request.content_type == "multipart/form-data":
            # Parsed with the stdlib, independently of how the relay built it.
            head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
            form = BytesParser(policy=email_policy.default).parsebytes(head + body)
            assert isinstance(form, EmailMessage)
            entry["parts"] = [
                (
                    part.get_param("name", header="content-disposition"),
                    part.get_filename(),
                    part.get_content_type(),
                    part.get_payload(decode=True),
                )
                for part in form.iter_parts()
            ]
        self.received.append(entry)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/inbound", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rec, f"http://127.0.0.1:{port}/inbound"
    rec.never.set()
    await runner.cleanup()


def webhook(url: str, **kw: Any) -> WebhookDestination:
    dest = create_destination(
        build_destination_config({"type": "webhook", "url": url, "secret": SECRET, **kw})
    )
    assert isinstance(dest, WebhookDestination)
    return dest


async def test_webhook_multipart_fails_then_recovers(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.failures = 2
    dest = webhook(url)
    await dest.start()
    try:
        for _ in range(2):
            with pytest.raises(TransientError, match="503"):
                await dest.deliver(
                    RAW,
                    PARSED,
                    ["docs@example.com"],
                    sender="scanner@partner.example",
                    delivery_id="ses:m1",
                )
        result = await dest.deliver(
            RAW,
            PARSED,
            ["docs@example.com"],
            sender="scanner@partner.example",
            delivery_id="ses:m1",
        )
    finally:
        await dest.close()
    assert "204" in result
    assert rec.attempts == 3
    [entry] = rec.received
    assert entry["headers"]["X-Relay-Delivery-Id"] == "ses:m1"
    (name, filename, ctype, data), (aname, afilename, actype, adata) = entry["parts"]
    assert (name, filename, ctype) == ("message", None, "application/json")
    fields = json.loads(data)
    assert fields["subject"] == "Scan 42"
    assert fields["recipients"] == ["docs@example.com"]
    assert fields["sender"] == "scanner@partner.example"
    assert fields["attachments"][0]["filename"] == "scan 42.pdf"
    assert (aname, afilename, actype, adata) == (
        "attachment",
        "scan 42.pdf",
        "application/pdf",
        b"%PDF-1.4 fake scan\n",
    )


async def test_webhook_raw_mode(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    dest = webhook(url, mode="raw")
    try:
        await dest.deliver(RAW, PARSED, ["a@example.com", "b@example.com"])
    finally:
        await dest.close()
    [entry] = rec.received
    assert entry["content_type"] == "message/rfc822"
    assert entry["body"] == RAW
    assert entry["headers"]["X-Relay-Recipients"] == "a@example.com, b@example.com"


async def test_webhook_signature_covers_timestamp_and_body() -> None:
    dest = WebhookDestination(
        "w",
        WebhookDestinationConfig(url="http://x/", secret=Secret(SECRET)),
        clock=lambda: 1_700_000_000,
    )
    body, headers = dest.build_request(RAW, PARSED, ["a@example.com"])
    assert headers["X-Relay-Timestamp"] == "1700000000"
    mac = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert headers["X-Relay-Signature"] == f"sha256={mac}"


async def test_webhook_4xx_is_permanent(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.failures, rec.fail_with = 1, 422
    dest = webhook(url)
    try:
        with pytest.raises(PermanentError, match="422"):
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        await dest.close()


async def test_webhook_bad_secret_is_permanent(receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    dest = create_destination(
        build_destination_config({"type": "webhook", "url": url, "secret": "wrong"})
    )
    try:
        with pytest.raises(PermanentError, match="401"):
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        await dest.close()


async def test_webhook_429_retries_after(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.failures, rec.fail_with, rec.retry_after = 1, 429, "120"
    dest = webhook(url)
    try:
        with pytest.raises(TransientError) as info:
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        await dest.close()
    assert info.value.retry_after == 120


async def test_webhook_timeout_is_transient_and_ambiguous(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.hang = True
    dest = webhook(url, timeout="200ms")
    try:
        with pytest.raises(TransientError) as info:
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        await dest.close()
    assert info.value.ambiguous


async def test_webhook_connection_refused_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = webhook(f"http://127.0.0.1:{port}/inbound")
    try:
        with pytest.raises(TransientError) as info:
            await dest.deliver(RAW, PARSED, ["docs@example.com"])
    finally:
        await dest.close()
    assert not info.value.ambiguous


# -- config --------------------------------------------------------------------------------------


def test_config_builds_each_type(tmp_path: Path) -> None:
    md = build_destination_config({"type": "maildir", "path": "mail", "per_recipient": True})
    dest = create_destination(md, base_dir=tmp_path)
    assert isinstance(dest, MaildirDestination) and dest.path == tmp_path / "mail"
    d = build_destination_config({"type": "directory", "path": "/srv/scans"})
    assert isinstance(d, DirectoryDestinationConfig)
    s = build_destination_config(
        {"type": "smtp", "host": "mx.internal", "port": 2525, "timeout": "30s"}
    )
    assert isinstance(s, SMTPDestinationConfig) and s.timeout == 30.0
    w = build_destination_config(
        {
            "type": "webhook",
            "url": "https://app/hook",
            "secret": "literal",
            "headers": {"X-App": "1"},
        }
    )
    assert isinstance(w, WebhookDestinationConfig) and w.headers == {"X-App": "1"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"type": "ftp"}, "unknown destination type"),
        ({"path": "x"}, "unknown destination type"),
        ({"type": "maildir"}, "path: required"),
        ({"type": "maildir", "path": "x", "colour": "red"}, "colour: unknown key"),
        ({"type": "smtp"}, "exactly one of host or socket"),
        ({"type": "smtp", "host": "h", "socket": "/s"}, "exactly one"),
        ({"type": "lmtp", "host": "h", "tls": "starttls"}, "LMTP runs without TLS"),
        ({"type": "smtp", "host": "h", "username": "u"}, "together"),
        ({"type": "smtp", "host": "h", "tls": "sometimes"}, "must be one of"),
        ({"type": "webhook", "url": "ftp://x/"}, "http"),
        ({"type": "webhook", "url": "https://x/", "mode": "xml"}, "must be one of"),
        ({"type": "webhook", "url": "https://x/", "timeout": "soon"}, "duration"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_destination_config(data, "inbound.route[0].destination")


def test_parsed_message_type_is_what_destinations_take() -> None:
    assert isinstance(PARSED, ParsedMessage)
