"""Reload without a restart: a new config is put in force while clients keep sending, an
invalid one changes nothing, and a renewed certificate is served without a signal."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import ssl
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from relay import certwatch, heap
from relay.app import Relay
from relay.config import Config
from relay.queue.base import NO_UPSTREAM
from relay.smtp.auth import hash_password
from tests.conftest import (
    PASSWORD,
    USER,
    SMTPSink,
    make_message,
    relay_config,
    smtp_upstream,
    wait_states,
)
from tests.fakes.relay_process import RelayProcess, free_port, relay_cli

NEW_USER, NEW_PASSWORD = "printer-2nd-floor", "n3w-pass-word"


# -- helpers ---------------------------------------------------------------------------------


def toml(data: dict[str, Any]) -> str:
    """The subset of TOML these configs need: tables, arrays of tables, scalars, lists."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def table(name: str, body: dict[str, Any], header: str) -> None:
        scalars = {k: v for k, v in body.items() if not _nested(v)}
        lines.append(header.format(name))
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for key, sub in body.items():
            if isinstance(sub, dict):
                table(f"{name}.{key}", sub, "[{}]")
            elif _nested(sub):
                for item in sub:
                    table(f"{name}.{key}", item, "[[{}]]")

    for key, body in data.items():
        if isinstance(body, dict):
            table(key, body, "[{}]")
        else:
            for item in body:
                table(key, item, "[[{}]]")
    return "\n".join(lines) + "\n"


def _nested(v: Any) -> bool:
    return isinstance(v, dict) or (
        isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], dict)
    )


def issue_pair(ca: trustme.CA, directory: Path, tag: str) -> tuple[Path, Path, bytes]:
    """A certificate for 127.0.0.1 written as chain.pem/key.pem under `directory`
    (replacing what is there), and its DER bytes to compare with what a client saw."""
    cert = ca.issue_cert("127.0.0.1", "localhost", organization_unit_name=tag)
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / "chain.pem", directory / "key.pem"
    for path, blob in ((key, cert.private_key_pem), (chain, cert.private_key_and_cert_chain_pem)):
        tmp = path.with_suffix(".tmp")
        blob.write_to_path(str(tmp))
        tmp.replace(path)  # as certbot does: the whole file at once
    return chain, key, ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def served_certificate(port: int, client_tls: ssl.SSLContext) -> bytes:
    """The certificate a new session's STARTTLS gets (DER)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.starttls(tls_context=client_tls)
        assert client.transport is not None
        der = client.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der
    finally:
        client.close()


async def can_auth(port: int, user: str, password: str, client_tls: ssl.SSLContext) -> bool:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.starttls(tls_context=client_tls)
        try:
            await client.login(user, password)
        except aiosmtplib.SMTPAuthenticationError:
            return False
        return True
    finally:
        client.close()


def users(password_hash: str, *extra: tuple[str, str]) -> list[dict[str, Any]]:
    entries = [{"name": USER, "password_hash": password_hash, "allowed_senders": ["*@example.com"]}]
    entries += [{"name": n, "password_hash": h, "allowed_senders": ["*"]} for n, h in extra]
    return entries


def smarthost_at(tmp_path: Path, tls_files: tuple[str, str], port: int, **sections: Any) -> Config:
    """The test config with one smtp upstream named "smarthost", at `port` (a reload that
    gives the same name another port replaces it)."""
    return relay_config(
        tmp_path,
        tls_files=tls_files,
        upstream=[smtp_upstream(port, name="smarthost")],
        **sections,
    )


@pytest.fixture(scope="module")
def new_user_hash() -> str:
    return hash_password(NEW_PASSWORD)


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[SMTPSink, SMTPSink]]:
    old, new = SMTPSink(), SMTPSink()
    await old.start()
    await new.start()
    yield old, new
    await old.stop()
    await new.stop()


@pytest.fixture
async def running() -> AsyncIterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for r in started:
        await r.stop()


# -- in process: Relay.reload() --------------------------------------------------------------


async def test_reload_under_load_keeps_sessions_and_applies_users_upstreams_and_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    client_tls: ssl.SSLContext,
    password_hash: str,
    new_user_hash: str,
    sinks: tuple[SMTPSink, SMTPSink],
    running: list[Relay],
) -> None:
    old_sink, new_sink = sinks
    chain, key, first_der = issue_pair(ca, tmp_path / "tls", "first")
    before = relay_config(
        tmp_path,
        tls_files=(str(chain), str(key)),
        password_hash=password_hash,
        upstream=[smtp_upstream(old_sink.port, name="old")],
    )
    relay = Relay(before)
    await relay.start()
    running.append(relay)
    port = relay.smtp_ports()[0]
    assert await served_certificate(port, client_tls) == first_der
    assert not await can_auth(port, NEW_USER, NEW_PASSWORD, client_tls)

    replies: list[str] = []
    reloaded = asyncio.Event()
    per_client = 40

    async def persistent(tag: str) -> None:
        """One session for every message, across the reload (STARTTLS and AUTH once)."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        await client.starttls(tls_context=client_tls)
        await client.login(USER, PASSWORD)
        for i in range(per_client):
            errors, reply = await client.sendmail(
                "app@example.com", ["rcpt@example.org"], make_message(subject=f"{tag} {i}")
            )
            assert not errors
            replies.append(reply)
            if i == per_client // 2:
                await reloaded.wait()  # half the messages go out after the reload
        await client.quit()

    async def fresh_sessions() -> None:
        """A new session (trusted network, no AUTH) for every message."""
        for i in range(per_client):
            errors, reply = await aiosmtplib.send(
                make_message(subject=f"fresh {i}"),
                sender="app@example.com",
                recipients=["rcpt@example.org"],
                hostname="127.0.0.1",
                port=port,
                start_tls=False,
            )
            assert not errors
            replies.append(reply)
            if i == per_client // 2:
                await reloaded.wait()

    clients = [asyncio.create_task(persistent(f"p{n}")) for n in range(2)]
    clients.append(asyncio.create_task(fresh_sessions()))
    await old_sink.wait_count(5)  # mail is flowing to the upstream about to be removed

    _, _, second_der = issue_pair(ca, tmp_path / "tls", "second")  # same paths, new pair
    after = relay_config(
        tmp_path,
        tls_files=(str(chain), str(key)),
        upstream=[smtp_upstream(new_sink.port, name="new")],
        smtp={"users": users(password_hash, (NEW_USER, new_user_hash))},
    )
    old_state = relay.router.state("old")
    result = await relay.reload(after)
    # Nothing runs between the swap and here: what "old" has, and what it still has in
    # flight, is all it may ever get.
    old_limit = len(old_sink.messages) + old_state.in_flight
    assert old_state.retired
    reloaded.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)

    assert result.ok, result.error
    assert "smtp.users[printer-2nd-floor].password_hash" in result.applied
    assert "upstream[old].type" in result.applied and "upstream[new].type" in result.applied
    assert result.needs_restart == ()
    total = 3 * per_client
    assert len(replies) == total
    assert all("queued as" in r for r in replies), replies
    await wait_states(relay, sent=total)
    # Attempts started before the reload may finish on "old"; none starts after it.
    assert len(old_sink.messages) <= old_limit
    assert len(old_sink.messages) + len(new_sink.messages) == total
    assert [s.name for s in relay.router.states] == ["new"]
    late = {m.parsed["Subject"] for m in new_sink.messages}
    assert {f"p0 {per_client - 1}", f"p1 {per_client - 1}", f"fresh {per_client - 1}"} <= late
    assert await can_auth(port, NEW_USER, NEW_PASSWORD, client_tls)
    assert await can_auth(port, USER, PASSWORD, client_tls)
    assert await served_certificate(port, client_tls) == second_der


async def test_invalid_config_file_is_refused_whole_and_names_the_key(
    tmp_path: Path,
    tls_files: tuple[str, str],
    client_tls: ssl.SSLContext,
    password_hash: str,
    new_user_hash: str,
    sinks: tuple[SMTPSink, SMTPSink],
    running: list[Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    old_sink, new_sink = sinks
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "queue": str(tmp_path / "queue"), "min_free_disk": 0},
        "smtp": {
            "listen": [{"address": "127.0.0.1:0", "tls": "starttls"}],
            "tls_cert": tls_files[0],
            "tls_key": tls_files[1],
            "users": users(password_hash),
        },
        "retry": {"schedule": ["30s"], "max_age": "1h", "bounces": False},
        "web": {"listen": "127.0.0.1:0"},
        "upstream": [smtp_upstream(old_sink.port, name="old")],
    }
    path = tmp_path / "config.toml"
    path.write_text(toml(data))
    relay = Relay(_load(path))
    await relay.start()
    running.append(relay)
    port = relay.smtp_ports()[0]
    in_force = relay.config

    # A new user and a new upstream, and one misspelt key: none of it may take effect.
    data["smtp"]["users"] = users(password_hash, (NEW_USER, new_user_hash))
    data["smtp"]["trusted_netwroks"] = ["0.0.0.0/0"]
    data["upstream"] = [smtp_upstream(new_sink.port, name="new")]
    path.write_text(toml(data))
    with caplog.at_level(logging.ERROR, logger="relay.reload"):
        result = await relay.reload()
    assert not result.ok
    assert result.error is not None and "smtp.trusted_netwroks" in result.error
    assert any("smtp.trusted_netwroks" in r.getMessage() for r in caplog.records)
    assert relay.config is in_force
    assert [s.name for s in relay.router.states] == ["old"]
    assert not await can_auth(port, NEW_USER, NEW_PASSWORD, client_tls)
    await aiosmtplib.send(
        make_message(subject="after refusal"),
        sender="app@example.com",
        recipients=["rcpt@example.org"],
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
    )
    await old_sink.wait_count(1)
    assert new_sink.messages == []

    # Corrected, the same file reloads; a changed listener address is named, not applied.
    del data["smtp"]["trusted_netwroks"]
    data["smtp"]["listen"] = [{"address": "127.0.0.1:1", "tls": "starttls"}]
    path.write_text(toml(data))
    with caplog.at_level(logging.WARNING, logger="relay.reload"):
        result = await relay.reload()
    assert result.ok, result.error
    assert result.needs_restart == ("smtp.listen[0].address",)
    assert any(
        "need a restart" in r.getMessage() and "smtp.listen[0].address" in r.getMessage()
        for r in caplog.records
    )
    assert relay.smtp_ports() == [port]
    assert await can_auth(port, NEW_USER, NEW_PASSWORD, client_tls)
    assert [s.name for s in relay.router.states] == ["new"]


def _load(path: Path) -> Any:
    from relay.checks import load_checked

    return load_checked(path)


async def test_renewed_certificate_is_served_without_a_signal_and_a_bad_pair_is_ignored(
    tmp_path: Path,
    ca: trustme.CA,
    client_tls: ssl.SSLContext,
    password_hash: str,
    running: list[Relay],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(certwatch, "WATCH_INTERVAL", 0.05)
    chain, key, first_der = issue_pair(ca, tmp_path / "live", "first")
    relay = Relay(relay_config(tmp_path, tls_files=(str(chain), str(key))))
    await relay.start()
    running.append(relay)
    port = relay.smtp_ports()[0]
    watcher = relay.cert_watcher
    assert watcher is not None
    open_session = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await open_session.connect()
    await open_session.starttls(tls_context=client_tls)
    assert await served_certificate(port, client_tls) == first_der

    watcher.changed.clear()
    _, _, second_der = issue_pair(ca, tmp_path / "live", "second")
    await asyncio.wait_for(watcher.changed.wait(), 10)
    assert await served_certificate(port, client_tls) == second_der
    # The session that negotiated before the renewal goes on.
    errors, _ = await open_session.sendmail(
        "app@example.com", ["rcpt@example.org"], make_message(subject="renewal")
    )
    assert not errors
    open_session.close()

    # A key that is not the certificate's (a half-finished copy): the old pair stays.
    other = ca.issue_cert("127.0.0.1", organization_unit_name="stray")
    watcher.changed.clear()
    with caplog.at_level(logging.ERROR, logger="relay.tls"):
        other.private_key_pem.write_to_path(str(key))
        await asyncio.wait_for(watcher.changed.wait(), 10)
    assert any("was not loaded" in r.getMessage() for r in caplog.records)
    assert await served_certificate(port, client_tls) == second_der


# -- a real `relay serve` with two workers: SIGHUP and `relay reload` ------------------------


async def auth_everywhere(port: int, user: str, password: str, tls: ssl.SSLContext) -> bool:
    """AUTH on enough new sessions that both workers (SO_REUSEPORT) answer some."""
    results = await asyncio.gather(*(can_auth(port, user, password, tls) for _ in range(8)))
    return all(results)


async def test_sighup_and_relay_reload_reach_every_worker(
    tmp_path: Path,
    tls_files: tuple[str, str],
    client_tls: ssl.SSLContext,
    password_hash: str,
    new_user_hash: str,
    sink: SMTPSink,
) -> None:
    port = free_port()
    data: dict[str, Any] = {
        "server": {
            "hostname": "relay.test",
            "queue": str(tmp_path / "queue"),
            "min_free_disk": 0,
            "workers": 2,
        },
        "smtp": {
            "listen": [{"address": f"127.0.0.1:{port}", "tls": "starttls"}],
            "tls_cert": tls_files[0],
            "tls_key": tls_files[1],
            "users": users(password_hash),
        },
        "retry": {"schedule": ["30s"], "max_age": "1h", "bounces": False},
        "web": {"listen": f"127.0.0.1:{free_port()}"},
        "upstream": [smtp_upstream(sink.port, name="sink")],
    }
    path = tmp_path / "config.toml"
    path.write_text(toml(data))
    server = RelayProcess(path)
    await server.start()
    try:
        assert server.proc is not None
        pid_file = tmp_path / "queue" / "relay.pid"
        assert int(pid_file.read_text()) == server.proc.pid  # the supervisor's
        assert not await can_auth(port, NEW_USER, NEW_PASSWORD, client_tls)

        data["smtp"]["users"] = users(password_hash, (NEW_USER, new_user_hash))
        path.write_text(toml(data))
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_log("config reloaded from", count=2)  # one line per worker
        assert await auth_everywhere(port, NEW_USER, NEW_PASSWORD, client_tls)

        # `relay reload` checks the file first: a wrong key is refused, nothing is sent.
        data["smtp"]["users"] = users(
            password_hash, (NEW_USER, new_user_hash), ("third", password_hash)
        )
        data["smtp"]["max_recipeints"] = 5
        path.write_text(toml(data))
        status, out, err = await relay_cli("reload", config=path, timeout=60)
        assert status == 1, (out, err)
        assert "smtp.max_recipeints" in err and "not reloaded" in err

        del data["smtp"]["max_recipeints"]
        path.write_text(toml(data))
        status, out, err = await relay_cli("reload", config=path, timeout=60)
        assert status == 0, err
        assert str(server.proc.pid) in out
        await server.wait_log("config reloaded from", count=4)
        assert not any("reload refused" in line for line in server.log)
        assert await auth_everywhere(port, "third", PASSWORD, client_tls)
        assert await auth_everywhere(port, NEW_USER, NEW_PASSWORD, client_tls)
        # Mail still flows through both workers after two reloads.
        for i in range(4):
            await aiosmtplib.send(
                make_message(subject=f"after {i}"),
                sender="app@example.com",
                recipients=["rcpt@example.org"],
                hostname="127.0.0.1",
                port=port,
                start_tls=False,
            )
        await sink.wait_count(4)
    finally:
        await server.stop()
    assert not (tmp_path / "queue" / "relay.pid").exists()


async def test_reload_changes_web_tokens_and_replaces_a_changed_upstream_keeping_its_health(
    tmp_path: Path,
    tls_files: tuple[str, str],
    sinks: tuple[SMTPSink, SMTPSink],
    running: list[Relay],
) -> None:
    import aiohttp

    from tests.web.conftest import bearer, token_entries

    first, second = sinks
    tokens = token_entries(tmp_path)
    relay = Relay(
        smarthost_at(
            tmp_path, tls_files, first.port, web={"listen": "127.0.0.1:0", "tokens": tokens}
        )
    )
    await relay.start()
    running.append(relay)
    port = relay.smtp_ports()[0]

    async def send(subject: str) -> None:
        await aiosmtplib.send(
            make_message(subject=subject),
            sender="app@example.com",
            recipients=["rcpt@example.org"],
            hostname="127.0.0.1",
            port=port,
            start_tls=False,
        )

    await send("before")
    await first.wait_count(1)
    await wait_states(relay, sent=1)
    before = relay.router.state("smarthost")
    before.health = 0.5  # as if it had failed lately: its replacement inherits that

    new_token = tmp_path / "ci.token"
    new_token.write_text("ci-token-0123456789abcdef\n")
    kept = [t for t in tokens if t["name"] != "viewer"]
    result = await relay.reload(
        smarthost_at(
            tmp_path,
            tls_files,
            second.port,  # the same name, moved
            web={
                "listen": "127.0.0.1:0",
                "tokens": [*kept, {"name": "ci", "token": f"file:{new_token}", "role": "read"}],
            },
        )
    )
    assert result.ok, result.error
    assert "upstream[smarthost].options.port" in result.applied
    assert "web.tokens[ci].token" in result.applied
    after = relay.router.state("smarthost")
    assert after is not before and before.retired
    assert after.health <= 0.5 and after.attempts == before.attempts

    url = f"http://127.0.0.1:{relay.web_port}/api/v1/messages"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=bearer("viewer")) as response:
            assert response.status == 401  # removed
        async with http.get(url, headers=bearer("ops")) as response:
            assert response.status == 200  # kept
        ci = {"Authorization": "Bearer ci-token-0123456789abcdef"}
        async with http.get(url, headers=ci) as response:
            assert response.status == 200  # added

    await send("after")
    await second.wait_count(1)
    assert len(first.messages) == 1


async def test_a_reload_that_mends_an_upstream_sends_the_mail_waiting_for_it(
    tmp_path: Path,
    tls_files: tuple[str, str],
    sinks: tuple[SMTPSink, SMTPSink],
    running: list[Relay],
) -> None:
    """The smarthost moved; the operator fixes its port and reloads: the waiting mail goes
    now, not when the breaker's hour or the message's retry step is over."""
    gone, moved = sinks
    await gone.stop()
    hours: dict[str, Any] = {
        "retry": {"schedule": ["1h"], "max_age": "1d", "bounces": False},
        "routing": {"cooldown": "1h"},
    }
    relay = Relay(smarthost_at(tmp_path, tls_files, gone.port, **hours))
    await relay.start()
    running.append(relay)
    await aiosmtplib.send(
        make_message(subject="stuck"),
        sender="app@example.com",
        recipients=["rcpt@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )
    await wait_states(relay, deferred=1)
    [row] = await relay.queue.search()
    assert row.last_error is not None and row.last_error.startswith(NO_UPSTREAM)
    assert relay.router.state("smarthost").breaker.value == "open"
    result = await relay.reload(smarthost_at(tmp_path, tls_files, moved.port, **hours))
    assert result.ok, result.error
    await wait_states(relay, timeout=10.0, sent=1)
    await moved.wait_count(1)
    assert relay.router.state("smarthost").breaker.value == "closed"
    timeline = await relay.queue.timeline(row.id)
    assert [e["by"] for e in timeline if e["type"] == "flushed"] == ["reload"]


async def test_what_a_reload_replaced_is_collected_from_the_heap_frozen_at_start(
    tmp_path: Path,
    tls_files: tuple[str, str],
    sinks: tuple[SMTPSink, SMTPSink],
    running: list[Relay],
) -> None:
    first, second = sinks
    relay = Relay(smarthost_at(tmp_path, tls_files, first.port))
    await relay.start()
    running.append(relay)
    upstream = relay.router.state("smarthost").upstream
    upstream.cycle = upstream  # type: ignore[attr-defined]  # as clients and pools make them
    replaced = weakref.ref(upstream)
    del upstream
    heap.freeze()  # as `serve` does once started
    try:
        result = await relay.reload(smarthost_at(tmp_path, tls_files, second.port))
        assert result.ok, result.error
        [refreeze] = [t for t in asyncio.all_tasks() if t.get_name() == "refreeze-heap"]
        await refreeze  # after the replaced upstream was closed
        assert replaced() is None
    finally:
        gc.unfreeze()
