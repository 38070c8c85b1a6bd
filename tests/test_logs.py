"""The relay's log: `[log]` settings, the JSON line shape, each message's story told by
its id, and no secret or message text in it at INFO or DEBUG.

The end-to-end tests run `relay serve` as its own process (the way it is deployed, with
forked workers) and read its stderr line by line, as journald or `docker logs` would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from relay import logs
from relay.cli import build_parser
from relay.config import ConfigError, LogConfig, parse
from relay.smtp.auth import hash_password
from tests.conftest import RelayFactory, SMTPSink, make_message
from tests.fakes.relay_process import free_port

# Distinctive strings: if any of them shows up in a log line, something leaked.
PASSWORD = "pw-CANARY-0d41c7e2"
TOKEN = "tok-CANARY-8b1f55a09e3c"
WRONG_TOKEN = "bad-CANARY-55e7c0d1a2b4"
HOOK_SECRET = "hook-CANARY-c3e9a7f01d"
BODY = "BODY-CANARY-91ab7e this is what the message says"
SECRETS = {
    "password": PASSWORD,
    "password (base64, AUTH LOGIN)": base64.b64encode(PASSWORD.encode()).decode(),
    "password (base64, AUTH PLAIN)": base64.b64encode(f"\0scanner\0{PASSWORD}".encode()).decode(),
    "token": TOKEN,
    "wrong token": WRONG_TOKEN,
    "webhook secret": HOOK_SECRET,
    "body": "BODY-CANARY",
}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# -- [log] in the config and on the command line -----------------------------------------------


def test_log_section_defaults_to_text_at_info(tmp_path: Path) -> None:
    cfg = parse({}, tmp_path / "config.toml")
    assert cfg.log == LogConfig(format="text", level="info")


def test_log_section_reads_format_and_level(tmp_path: Path) -> None:
    cfg = parse({"log": {"format": "json", "level": "debug"}}, tmp_path / "config.toml")
    assert (cfg.log.format, cfg.log.level) == ("json", "debug")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"format": "yaml"}, "log.format: must be one of 'text', 'json', got 'yaml'"),
        ({"level": "verbose"}, "log.level: must be one of 'debug', 'info', 'warning', 'error'"),
        ({"formt": "json"}, "log.formt"),
    ],
)
def test_log_section_names_a_wrong_key(
    tmp_path: Path, section: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse({"log": section}, tmp_path / "config.toml")


def test_command_line_level_is_optional_and_case_blind() -> None:
    assert build_parser().parse_args(["serve"]).log_level is None
    assert build_parser().parse_args(["serve", "--log-level", "DEBUG"]).log_level == "debug"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])


# -- the handler and the JSON shape, in this process -------------------------------------------


@pytest.fixture
def logging_state() -> Iterator[None]:
    """configure() changes the root logger: put back what pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("mail.log", *logs.GUARDED_LIBRARIES)
    levels = {name: logging.getLogger(name).level for name in names}
    switches = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in switches}
    yield
    for name, value in saved.items():
        setattr(logging, name, value)
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def test_json_lines_carry_the_fields_given_and_a_traceback_on_one_line(
    logging_state: None,
) -> None:
    out = io.StringIO()
    logs.configure(LogConfig(format="json"), stream=out)
    log = logging.getLogger("relay.dispatch")
    log.info(
        "%s sent via %s",
        "ABC123",
        "ses",
        extra={"event": "sent", "msg_id": "ABC123", "upstream": "ses", "provider_id": None},
    )
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError:
        log.exception("delivery crashed", extra={"msg_id": "ABC123"})
    log.debug("not at this level", extra={"event": "nope"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    sent, crash = (json.loads(line) for line in lines)
    assert list(sent)[:5] == ["ts", "level", "logger", "event", "msg"]
    assert TS.fullmatch(sent["ts"])
    assert sent["level"] == "INFO" and sent["logger"] == "relay.dispatch"
    assert sent["msg"] == "ABC123 sent via ses"
    assert (sent["msg_id"], sent["upstream"]) == ("ABC123", "ses")
    assert "provider_id" not in sent  # absent, not null
    assert "event" not in crash
    assert (
        crash["exc"].startswith("Traceback")
        and "RuntimeError: first line\nsecond line" in (crash["exc"])
    )


def test_a_field_json_cannot_hold_still_gives_one_json_line(logging_state: None) -> None:
    out = io.StringIO()
    logs.configure(LogConfig(format="json"), stream=out)
    cycle: list[Any] = []
    cycle.append(cycle)
    logging.getLogger("relay.app").warning("odd", extra={"event": "x", "looped": cycle})
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert (record["event"], record["msg"]) == ("x", "odd")
    assert "looped" not in record and "fields left out" in record["log_error"]


def test_text_lines_stay_as_they_were(logging_state: None) -> None:
    out = io.StringIO()
    logs.configure(LogConfig(), stream=out)
    logging.getLogger("relay.smtp").info("ABC queued", extra={"event": "received"})
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO relay\.smtp ABC queued\n", out.getvalue()
    )


def test_timestamps_are_utc_with_milliseconds() -> None:
    formatter = logs.JSONFormatter()
    assert formatter.timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert formatter.timestamp(1_700_000_000.4567) == "2023-11-14T22:13:20.456Z"
    assert formatter.timestamp(1_700_000_001.0) == "2023-11-14T22:13:21.000Z"


def test_configure_again_replaces_the_handler_and_level(logging_state: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure(LogConfig(format="json", level="warning"), stream=first)
    logs.configure(LogConfig(format="json"), level="debug", stream=second)
    logging.getLogger("relay.app").debug("hello")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "hello"
    # Libraries that log headers and bodies at DEBUG stay at INFO.
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.INFO


def test_mail_log_keeps_commands_and_drops_what_is_not_one(logging_state: None) -> None:
    out = io.StringIO()
    logs.configure(LogConfig(format="json"), level="debug", stream=out)
    mail_log = logging.getLogger("mail.log")
    peer = ("127.0.0.1", 40000)
    mail_log.debug("%r >> %r", peer, b"MAIL FROM:<app@example.com>")
    mail_log.debug("%r >> %r", peer, b"AUTH PLAIN AHNjYW5uZXIAcHc=")
    mail_log.debug("%r >> %r", peer, base64.b64encode(PASSWORD.encode()))
    mail_log.debug("_handle_client readline: %r", BODY.encode())
    mail_log.debug("%r can't decode base64: %s", peer, PASSWORD.encode())
    text = out.getvalue()
    assert "MAIL FROM:<app@example.com>" in text
    assert "AUTH PLAIN [rest not logged]" in text
    assert "AHNjYW5uZXIAcHc=" not in text
    assert text.count("not logged: not a command") == 2
    assert "CANARY" not in text


async def test_a_message_the_queue_cannot_take_logs_the_cause_and_the_refusal(
    make_relay: RelayFactory, logging_state: None
) -> None:
    out = io.StringIO()
    logs.configure(LogConfig(format="json"), stream=out)
    relay = await make_relay(server={"min_free_disk": "1000000GB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_ports()[0])
    await reader.readline()
    for line in (b"EHLO app.lan", b"MAIL FROM:<app@example.com>", b"RCPT TO:<a@example.org>"):
        writer.write(line + b"\r\n")
    writer.write(b"DATA\r\n" + make_message(body=BODY + "\r\n") + b".\r\nQUIT\r\n")
    await writer.drain()
    replies = await reader.read()  # to the server's close after QUIT
    writer.close()
    await writer.wait_closed()
    assert b"\r\n452 4.3.1 " in replies, replies
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    [cause] = [r for r in records if r.get("event") == "queue_error"]
    assert cause["level"] == "ERROR" and "free" in cause["reason"]
    assert (cause["client"], cause["sender"], cause["recipients"]) == (
        "127.0.0.1",
        "app@example.com",
        ["a@example.org"],
    )
    [refusal] = [r for r in records if r.get("event") == "refused"]
    assert refusal["command"] == "DATA" and refusal["reply"].startswith("452 4.3.1")
    assert "CANARY" not in out.getvalue()


# -- a relay process, its log read line by line -----------------------------------------------


class ServedRelay:
    """`relay serve` as its own process; each stderr line kept and awaitable."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config, self.args = config, args
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.ended = False
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(self.config),
            "serve",
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda lines: any("relay ready" in line for line in lines))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def wait_for(self, done: Callable[[list[str]], bool], timeout: float = 30) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: done(self.lines) or self.ended)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until(), timeout)
        if not done(self.lines):
            raise AssertionError("the log never showed it:\n" + "\n".join(self.lines[-40:]))

    def records(self) -> list[dict[str, Any]]:
        """Every line as JSON: a line that is not fails the test."""
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line: {line!r}") from None
        return out

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader


def events_of(records: list[dict[str, Any]], msg_id: str) -> list[str]:
    return [r["event"] for r in records if r.get("msg_id") == msg_id]


def has_events(msg_id: str, *events: str) -> Callable[[list[str]], bool]:
    """Whether the log shows these events of one message, in this order (others between)."""

    def check(lines: list[str]) -> bool:
        story = iter(
            r.get("event") for r in map(_maybe_json, lines) if r and r.get("msg_id") == msg_id
        )
        return all(any(e == wanted for e in story) for wanted in events)

    return check


def a_line_with(text: str) -> Callable[[list[str]], bool]:
    return lambda lines: any(text in line for line in lines)


def _maybe_json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FlakySink(SMTPSink):
    """A smarthost that answers the next DATA with a 4xx once, when told to."""

    fail_next: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_next is not None:
            reply, self.fail_next = self.fail_next, None
            return reply
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
async def flaky_sink() -> AsyncIterator[FlakySink]:
    sink = FlakySink()
    await sink.start()
    yield sink
    await sink.stop()


def write_config(
    tmp_path: Path, *, sink_port: int, tls_files: tuple[str, str], log: str, workers: int
) -> tuple[Path, int, int]:
    smtp_port, web_port, closed_port = free_port(), free_port(), free_port()
    cert, key = tls_files
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[server]
hostname = "relay.test"
queue = "{tmp_path / "queue"}"
min_free_disk = 0
workers = {workers}

[smtp]
tls_cert = "{cert}"
tls_key = "{key}"

[[smtp.listen]]
address = "127.0.0.1:{smtp_port}"
tls = "starttls"

[[smtp.users]]
name = "scanner"
password_hash = "{hash_password(PASSWORD)}"
allowed_senders = ["*@example.com"]

[retry]
schedule = ["1s"]
max_age = "1h"
bounces = true

[[upstream]]
name = "sink"
type = "smtp"
host = "127.0.0.1"
port = {sink_port}
tls = "none"

[web]
listen = "127.0.0.1:{web_port}"

[[web.tokens]]
name = "ops"
token = "env:RELAY_TEST_LOG_TOKEN"
role = "admin"

[[webhook]]
url = "http://127.0.0.1:{closed_port}/events"
secret = "env:RELAY_TEST_LOG_HOOK"

[log]
{log}
"""
    )
    return config, smtp_port, web_port


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay process reads its token and webhook secret from the environment."""
    monkeypatch.setenv("RELAY_TEST_LOG_TOKEN", TOKEN)
    monkeypatch.setenv("RELAY_TEST_LOG_HOOK", HOOK_SECRET)


async def send(
    port: int, tls: ssl.SSLContext, to: str, subject: str, *, method: str = "PLAIN"
) -> str:
    """One authenticated message over STARTTLS; the relay's id from its 250 reply."""
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls
    ) as client:
        login = client.auth_plain if method == "PLAIN" else client.auth_login
        await login("scanner", PASSWORD)
        _, reply = await client.sendmail(
            "app@example.com", [to], make_message(subject, body=BODY + "\r\n", to=to)
        )
    match = re.search(r"queued as (\S+)", reply)
    assert match, reply
    return match.group(1)


async def misbehave(port: int) -> None:
    """A client that sends a password and message text where commands belong: after an
    AUTH refused before TLS, and after a DATA refused for want of recipients."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def say(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        await writer.drain()
        reply = b""
        while reply[3:4] != b" ":
            reply = await reader.readline()
        return reply

    await reader.readline()  # greeting
    await say(b"EHLO scanner.lan")
    assert (await say(b"AUTH LOGIN")).startswith(b"538")
    assert (await say(base64.b64encode(PASSWORD.encode()))).startswith(b"500")
    assert (await say(b"MAIL FROM:<app@example.com>")).startswith(b"250")
    assert (await say(b"DATA")).startswith(b"503")
    assert (await say(BODY.encode())).startswith(b"500")
    await say(b"QUIT")
    writer.close()
    await writer.wait_closed()


async def use_the_api(web_port: int, msg_id: str) -> None:
    """The token crosses the wire: once right, once wrong (which the relay logs)."""
    url = f"http://127.0.0.1:{web_port}/api/v1/messages/{msg_id}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(url, headers={"Authorization": f"Bearer {WRONG_TOKEN}"}) as resp:
            assert resp.status == 401


def assert_no_secret(lines: list[str]) -> None:
    text = "\n".join(lines)
    leaked = [what for what, value in SECRETS.items() if value in text]
    assert not leaked, f"{leaked} in the log:\n" + "\n".join(
        line for line in lines if any(SECRETS[w] in line for w in leaked)
    )


async def test_each_message_story_is_found_by_its_id_in_json_lines(
    tmp_path: Path,
    flaky_sink: FlakySink,
    tls_files: tuple[str, str],
    client_tls: ssl.SSLContext,
    secret_env: None,
) -> None:
    config, smtp_port, web_port = write_config(
        tmp_path, sink_port=flaky_sink.port, tls_files=tls_files, log='format = "json"', workers=2
    )
    relay = ServedRelay(config)
    await relay.start()
    try:
        sent_id = await send(smtp_port, client_tls, "first@example.org", "straight through")
        await relay.wait_for(has_events(sent_id, "received", "attempt", "sent"))

        flaky_sink.fail_next = "451 4.3.0 sink busy, try again"
        retried_id = await send(
            smtp_port, client_tls, "second@example.org", "retried", method="LOGIN"
        )
        await relay.wait_for(has_events(retried_id, "deferred", "attempt", "sent"))

        flaky_sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user here"
        failed_id = await send(smtp_port, client_tls, "nobody@example.org", "bounced")
        await relay.wait_for(has_events(failed_id, "failed", "dsn"))
        dsn_line = next(r for r in relay.records() if r.get("event") == "dsn")
        await relay.wait_for(has_events(dsn_line["dsn_id"], "attempt", "sent"))

        await misbehave(smtp_port)
        await use_the_api(web_port, sent_id)
    finally:
        await relay.stop()

    records = relay.records()
    assert events_of(records, sent_id) == ["received", "attempt", "sent"]
    assert events_of(records, retried_id) == ["received", "attempt", "deferred", "attempt", "sent"]
    assert events_of(records, failed_id) == ["received", "attempt", "failed", "dsn"]
    assert events_of(records, dsn_line["dsn_id"]) == ["attempt", "sent"]

    def the(msg_id: str, event: str, nth: int = 0) -> dict[str, Any]:
        return [r for r in records if r.get("msg_id") == msg_id and r["event"] == event][nth]

    received = the(sent_id, "received")
    assert received["client"] == "127.0.0.1" and received["user"] == "scanner"
    assert received["sender"] == "app@example.com"
    assert received["recipients"] == ["first@example.org"]
    assert received["size"] > len(BODY) and received["tls"].startswith("TLSv1")
    attempt = the(sent_id, "attempt")
    assert (attempt["upstream"], attempt["outcome"]) == ("sink", "accepted")
    assert isinstance(attempt["duration_ms"], float) and attempt["provider_id"]
    sent = the(sent_id, "sent")
    assert (sent["upstream"], sent["provider_id"]) == ("sink", attempt["provider_id"])
    assert sent["recipients"] == ["first@example.org"]

    first_try = the(retried_id, "attempt")
    assert first_try["outcome"] == "transient" and "451" in first_try["reason"]
    deferred = the(retried_id, "deferred")
    assert "451" in deferred["reason"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", deferred["next_attempt"])
    assert the(retried_id, "attempt", 1)["outcome"] == "accepted"

    failed = the(failed_id, "failed")
    assert failed["level"] == "WARNING" and "550" in failed["reason"]
    assert failed["recipients"] == ["nobody@example.org"]
    assert dsn_line["msg_id"] == failed_id and dsn_line["sender"] == "app@example.com"

    # Every line is JSON, the forked workers' lines too, and each has the common keys.
    assert all({"ts", "level", "logger", "msg", "pid"} <= r.keys() for r in records)
    assert len({r["pid"] for r in records}) == 3  # the supervisor and two workers
    # Lines about the relay itself name their event too.
    assert {"listening", "worker_ready", "ready", "stopping"} <= {r.get("event") for r in records}
    refusals = [r for r in records if r.get("event") == "refused"]
    assert {r["command"] for r in refusals} >= {"AUTH", "DATA"}
    assert all(r["client"] == "127.0.0.1" for r in refusals)
    assert_no_secret(relay.lines)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_no_password_token_secret_or_body_in_the_log(
    tmp_path: Path,
    flaky_sink: FlakySink,
    tls_files: tuple[str, str],
    client_tls: ssl.SSLContext,
    secret_env: None,
    level: str,
) -> None:
    # The file says info; the command line's --log-level decides.
    config, smtp_port, web_port = write_config(
        tmp_path, sink_port=flaky_sink.port, tls_files=tls_files, log='level = "info"', workers=1
    )
    relay = ServedRelay(config, "--log-level", level)
    await relay.start()
    try:
        plain_id = await send(smtp_port, client_tls, "a@example.org", "plain")
        login_id = await send(smtp_port, client_tls, "b@example.org", "login", method="LOGIN")
        flaky_sink.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user here"
        bounced_id = await send(smtp_port, client_tls, "gone@example.org", "bounce")
        await misbehave(smtp_port)
        await use_the_api(web_port, plain_id)
        for msg_id in (plain_id, login_id):
            await relay.wait_for(a_line_with(f"{msg_id} sent via"))
        await relay.wait_for(a_line_with(f"{bounced_id}: bounce "))
    finally:
        await relay.stop()

    assert flaky_sink.messages and all(BODY.encode() in m.data for m in flaky_sink.messages[:2])
    assert_no_secret(relay.lines)
    if level == "debug":
        # The protocol trace was on (so the test could have caught a leak in it)...
        assert any(" mail.log " in line and "AUTH LOGIN" in line for line in relay.lines)
        assert any("not logged: not a command" in line for line in relay.lines)
    else:
        assert not any(" mail.log " in line for line in relay.lines)
