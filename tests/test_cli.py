"""The `relay` command line, run as a real subprocess against a running relay's queue."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from relay.queue.postgres.schema import LATEST
from relay.smtp.auth import verify_password
from tests.conftest import RelayFactory, SMTPSink, make_message, smtp_upstream, wait_states
from tests.fakes.relay_process import free_port, relay_cli


def cli_config(relay: Relay, tmp_path: Path) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(f'[server]\nqueue = "{relay.config.queue_dir}"\n')
    return path


async def send(relay: Relay, subject: str) -> None:
    await aiosmtplib.send(
        make_message(subject=subject),
        sender="app@example.com",
        recipients=["r@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )


async def test_queue_commands_on_a_running_server(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path
) -> None:
    port = sink.port
    await sink.stop()
    relay = await make_relay(
        upstream=[smtp_upstream(port)],
        retry={"schedule": ["1h"], "bounces": False},
        routing={"cooldown": "1h"},  # the flush asks for the probe itself
    )
    for subject in ("one", "two", "three"):
        await send(relay, subject)
    await wait_states(relay, deferred=3)
    cfg = cli_config(relay, tmp_path)

    code, out, _ = await relay_cli("queue", "list", "--state", "deferred", "--json", config=cfg)
    assert code == 0
    rows = json.loads(out)
    assert [r["state"] for r in rows] == ["deferred"] * 3
    one, two, _three = (r["id"] for r in rows)

    code, out, _ = await relay_cli("queue", "hold", one, config=cfg)
    assert (code, out.strip()) == (0, f"{one}: held")
    code, out, _ = await relay_cli("queue", "show", one, config=cfg)
    assert code == 0 and "state:     held" in out
    assert "cannot connect to 127.0.0.1" in out  # the deferral's reason is on the timeline
    code, _, err = await relay_cli("queue", "hold", one, config=cfg)
    assert code == 1 and "is held; only queued or deferred messages can be held" in err

    code, out, _ = await relay_cli("queue", "delete", two, config=cfg)
    assert code == 0
    code, _, err = await relay_cli("queue", "show", two, config=cfg)
    assert code == 1 and f"no message {two}" in err

    await sink.start(port)
    code, out, _ = await relay_cli("queue", "flush", config=cfg)
    assert code == 0 and out.startswith("1 deferred message(s) due now\n")
    assert "breaker open on smarthost: probing now" in out  # the flush reaches it at once
    await wait_states(relay, sent=1, held=1)  # picked up by the server's own poll
    code, out, _ = await relay_cli("queue", "release", one, config=cfg)
    assert code == 0
    await wait_states(relay, sent=2)
    assert sorted(m.parsed["Subject"] for m in sink.messages) == ["one", "three"]

    code, out, _ = await relay_cli("queue", "show", one, "--json", config=cfg)
    types = [e["type"] for e in json.loads(out)["timeline"]]
    assert types == ["received", "attempt", "deferred", "held", "released", "attempt", "sent"]


async def test_retry_failed_messages(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path
) -> None:
    sink.data_reply = "554 5.7.1 Rejected for now"
    relay = await make_relay(upstream=[smtp_upstream(sink.port)], retry={"bounces": False})
    await send(relay, "bounced")
    await wait_states(relay, failed=1)
    sink.data_reply = None
    cfg = cli_config(relay, tmp_path)
    code, out, _ = await relay_cli("queue", "retry", "--failed", config=cfg)
    assert (code, out.strip()) == (0, "1 failed message(s) queued again")
    await wait_states(relay, sent=1)
    await sink.wait_count(1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[server]\nqueue_dir = 'x'\n", "server.queue_dir: unknown key"),
        ("[smtp]\nmax_recipients = 'ten'\n", "smtp.max_recipients: expected int, got str"),
        ("[[smtp.listen]]\naddress = 'localhost'\n", "smtp.listen[0].address: expected host:port"),
        ("[smtp]\ntls_cert = '/nope.pem'\ntls_key = '/nope.key'\n", "TLS file /nope.pem"),
        (
            "[[upstream]]\nname = 'x'\ntype = 'carrier-pigeon'\n",
            "upstream[0].type: unknown upstream type 'carrier-pigeon'",
        ),
        (
            "[[upstream]]\nname = 'x'\ntype = 'smtp'\nport = 25\n",
            "upstream[0].host: required key is missing",
        ),
        ("[retry]\nmax_age = 'forever'\n", "retry.max_age: expected a duration"),
        ("[server\n", "not valid TOML"),
    ],
)
async def test_check_config_names_the_offending_key(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code, out, err = await relay_cli("check-config", config=path)
    assert code == 1, out
    assert message in err, err


async def test_check_config_accepts_the_shipped_config() -> None:
    shipped = Path(__file__).parent.parent / "config.toml"
    code, out, err = await relay_cli("check-config", config=shipped)
    assert code == 0, err
    assert "ok" in out


async def test_check_config_missing_file(tmp_path: Path) -> None:
    code, _, err = await relay_cli("check-config", config=tmp_path / "none.toml")
    assert code == 1 and "cannot read the config file" in err


async def test_user_add_prints_a_verifiable_hash(tmp_path: Path) -> None:
    code, out, _ = await relay_cli(
        "user", "add", "scanner-2", config=tmp_path / "x.toml", stdin=b"correct horse\n"
    )
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("password_hash"))
    stored = line.split('"')[1]
    assert verify_password(b"correct horse", stored)
    assert not verify_password(b"wrong", stored)
    assert 'name = "scanner-2"' in out


# -- PostgreSQL: schema, checks, and moving a queue between engines ------------------------


async def test_postgres_schema_check_migrate_and_the_queue_commands(
    pg_dsn: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[server]\nqueue = "env:RELAY_TEST_DSN"\nauto_migrate = false\n')
    env_cfg = tmp_path / "pg-env.toml"
    env_cfg.write_text(f'[server]\nqueue = "{pg_dsn}"\nauto_migrate = false\n')
    code, _, err = await relay_cli("check-config", config=env_cfg)
    assert code == 1 and "run `relay queue migrate`" in err, err
    code, out, _ = await relay_cli("queue", "migrate", config=env_cfg)
    assert code == 0 and f"migrated to version {LATEST}" in out
    code, out, _ = await relay_cli("queue", "migrate", config=env_cfg)
    assert code == 0 and f"current (version {LATEST})" in out
    code, out, _ = await relay_cli("check-config", config=env_cfg)
    assert (
        code == 0 and f"schema version {LATEST}" in out and "@" not in out.split("postgresql://")[0]
    )
    # The DSN may come from the environment, like every secret.
    code, _, err = await relay_cli("check-config", config=cfg)
    assert code == 1 and "RELAY_TEST_DSN" in err
    down = tmp_path / "down.toml"
    down.write_text(f'[server]\nqueue = "postgresql://postgres@127.0.0.1:{free_port()}/x"\n')
    code, _, err = await relay_cli("queue", "list", config=down)
    assert code == 1 and "the queue is unavailable: cannot reach PostgreSQL" in err


async def test_a_queue_moves_from_sqlite_to_postgres_with_the_cli(
    make_relay: RelayFactory, sink: SMTPSink, pg_dsn: str, tmp_path: Path
) -> None:
    port = sink.port
    await sink.stop()
    relay = await make_relay(
        upstream=[smtp_upstream(port)], retry={"schedule": ["1h"], "bounces": False}
    )
    for subject in ("one", "two"):
        await send(relay, subject)
    await wait_states(relay, deferred=2)
    [held, _] = await relay.queue.search()
    await relay.queue.hold(held.id, now=0.0, actor="test")
    await relay.stop()
    source = cli_config(relay, tmp_path)
    target = tmp_path / "pg.toml"
    target.write_text(f'[server]\nqueue = "{pg_dsn}"\n')
    await relay_cli("queue", "migrate", config=target)

    dump = tmp_path / "queue.jsonl"
    code, _, err = await relay_cli("queue", "export", str(dump), config=source)
    assert code == 0 and "2 message(s) exported" in err
    code, out, _ = await relay_cli("queue", "import", str(dump), config=target)
    assert (code, out.strip()) == (0, "2 message(s) imported, 0 already present")
    code, out, _ = await relay_cli("queue", "import", str(dump), config=target)
    assert out.strip() == "0 message(s) imported, 2 already present"
    code, out, _ = await relay_cli("queue", "list", "--json", config=target)
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows[held.id]["state"] == "held" and len(rows) == 2
    code, out, _ = await relay_cli("queue", "show", held.id, config=target)
    assert "held" in out and "cannot connect to 127.0.0.1" in out  # the timeline came along
    code, out, _ = await relay_cli("queue", "release", held.id, config=target)
    assert (code, out.strip()) == (0, f"{held.id}: released")


async def test_upstream_list_pause_and_resume(make_relay: RelayFactory, tmp_path: Path) -> None:
    relay = await make_relay()
    cfg = tmp_path / "cli-upstreams.toml"
    cfg.write_text(
        f'[server]\nqueue = "{relay.config.queue_dir}"\n'
        f'[[upstream]]\nname = "outbox"\ntype = "maildir"\npath = "{tmp_path / "outbox"}"\n'
    )
    code, out, _ = await relay_cli("upstream", "pause", "outbox", config=cfg)
    assert (code, out.split(":")[0]) == (0, "outbox")
    await relay.router.sync()  # what every running process does four times a second
    assert relay.router.state("outbox").paused
    await send(relay, "while paused")
    await wait_states(relay, deferred=1)
    [row] = await relay.queue.search()
    assert row.last_error is not None and "outbox: paused by an operator" in row.last_error
    code, out, _ = await relay_cli("upstream", "list", "--json", config=cfg)
    [listed] = json.loads(out)
    assert listed["name"] == "outbox" and listed["paused"] is True
    code, out, _ = await relay_cli("upstream", "list", config=cfg)
    assert "paused" in out.splitlines()[1]
    code, _, err = await relay_cli("upstream", "pause", "nosuch", config=cfg)
    assert code == 1 and "no upstream 'nosuch'" in err and "known: outbox" in err

    code, _, _ = await relay_cli("upstream", "resume", "outbox", config=cfg)
    assert code == 0
    # What waited for it is due at once, not in 30 s: no flush needed. The round looks
    # again before giving up, so the relay need not have synced the resume yet.
    await wait_states(relay, sent=1)
    flushed = [e for e in await relay.queue.timeline(row.id) if e["type"] == "flushed"]
    assert len(flushed) == 1 and flushed[0]["by"].startswith("cli")


async def fill_queue(queue_dir: Path, n: int) -> list[str]:
    """n queued messages, every third to example.net, straight into a SQLite queue."""
    from relay.message import Envelope, Kind, NewMessage, new_message_id
    from relay.queue.sqlite.engine import SQLiteQueue

    queue = SQLiteQueue(queue_dir, owner="test:1:1")
    await queue.start()
    ids = []
    for i in range(n):
        domain = "example.net" if i % 3 == 0 else "example.org"
        msg = NewMessage(
            id=new_message_id(),
            kind=Kind.OUTBOUND,
            envelope=Envelope(f"app{i}@example.com", (f"user{i}@{domain}",)),
            data=b"Subject: x\r\n\r\nbody\r\n",
            received_at=1_700_000_000.0 + i,
            received={"client": "127.0.0.1"},
        )
        await queue.insert(msg)
        ids.append(msg.id)
    await queue.close()
    return ids


async def test_operator_papercuts_version_pipes_json_times_case_and_bulk(tmp_path: Path) -> None:
    ids = await fill_queue(tmp_path / "queue", 300)
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[server]\nqueue = "{tmp_path / "queue"}"\n')

    code, out, _ = await relay_cli("--version", config=cfg)
    assert code == 0 and out.startswith("relay ")

    # A reader that leaves early (`| head`) gets no traceback.
    err_file = tmp_path / "stderr.txt"
    pipeline = (
        f"set -o pipefail; {shlex.quote(sys.executable)} -m relay --config {shlex.quote(str(cfg))}"
        f" queue list --json 2>{shlex.quote(str(err_file))} | head -c 100 >/dev/null"
    )
    proc = await asyncio.create_subprocess_exec("bash", "-c", pipeline)
    assert await proc.wait() == 141  # 128 + SIGPIPE, as `head` leaves any Unix tool
    assert "Traceback" not in err_file.read_text(), err_file.read_text()

    code, out, _ = await relay_cli("queue", "show", ids[0].lower(), "--json", config=cfg)
    shown = json.loads(out)["message"]
    assert shown["id"] == ids[0] and shown["created"] == "2023-11-14T22:13:20.000Z"
    assert shown["created_epoch"] == 1_700_000_000.0
    assert shown["recipients"] == ["user0@example.net"] and shown["pending"] == [
        "user0@example.net"
    ]

    code, out, _ = await relay_cli("queue", "hold", "ALL", "--to", "@example.net", config=cfg)
    assert (code, out.strip()) == (0, "100 message(s) held")
    code, out, _ = await relay_cli("queue", "list", "--state", "held", "--json", config=cfg)
    held = [r["id"] for r in json.loads(out)]
    assert len(held) == 100 and all(
        r["recipients"][0].endswith("example.net") for r in json.loads(out)
    )
    code, out, _ = await relay_cli(
        "queue", "release", "-", config=cfg, stdin="\n".join(held[:10]).encode()
    )
    assert (code, out.strip()) == (0, "10 message(s) released")
    code, out, err = await relay_cli("queue", "delete", held[10], "NOSUCH", config=cfg)
    assert code == 0 and "1 message(s) deleted, 1 refused" in out and "no message NOSUCH" in err
    code, out, _ = await relay_cli(
        "queue",
        "delete",
        "ALL",
        "--state",
        "held",
        "--from",
        "app3",
        "--older-than",
        "1d",
        config=cfg,
    )
    # app3, app30-app39, app300...: held ones only (those to example.net)
    assert code == 0 and out.strip().endswith("deleted")

    code, out, _ = await relay_cli("queue", "shape", config=cfg)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DOMAIN", "TOTAL", "0-5m"]
    assert lines[1].split()[0] == "TOTAL"
    assert {lines[2].split()[0], lines[3].split()[0]} == {"example.org", "example.net"}
