"""`relay serve` under systemd's Type=notify: READY=1 once the SMTP port answers (with
workers, once every worker does), STOPPING=1 when SIGTERM starts the shutdown, and only
from the main process (the unit's NotifyAccess=main drops anything a worker would send)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.fakes.relay_process import free_port
from tests.packaging.notify_socket import Notification, NotifySocket


def write_config(directory: Path, *, workers: int, smtp_port: int) -> Path:
    config = directory / "config.toml"
    config.write_text(f"""
[server]
hostname = "relay.test"
queue = "{directory / "queue"}"
min_free_disk = 0
workers = {workers}
[[smtp.listen]]
address = "127.0.0.1:{smtp_port}"
tls = "none"
[[upstream]]
name = "outbox"
type = "maildir"
path = "{directory / "outbox"}"
[web]
listen = "127.0.0.1:0"
""")
    return config


async def smtp_banner(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_after_listening_and_stopping_on_sigterm(tmp_path: Path, workers: int) -> None:
    notify = NotifySocket(f"@relay-notify-test-{os.getpid()}-{workers}")
    smtp_port = free_port()
    config = write_config(tmp_path, workers=workers, smtp_port=smtp_port)
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relay", "--config", str(config), "serve"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": notify.address},
        )
    try:
        ready = await notify.next()
        # At the moment systemd would call the service started, mail is taken.
        assert (await smtp_banner(smtp_port)).startswith(b"220 ")
        assert ready.get("READY") == "1"
        assert ready.pid == proc.pid, "READY=1 must come from the main process"
        status = ready.get("STATUS") or ""
        if workers > 1:
            # Sent after the supervisor saw every worker ready (and said so in its log).
            assert status.startswith(f"{workers} workers serving SMTP on 127.0.0.1:{smtp_port}")
            assert f"relay ready: {workers} workers" in stderr.read_text()
        else:
            assert status == f"serving SMTP on {smtp_port}"

        proc.send_signal(signal.SIGTERM)
        stopping = await notify.next()
        assert stopping.get("STOPPING") == "1"
        assert stopping.pid == proc.pid
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # Nothing else was said, by the supervisor or by any worker.
        notify.read_pending()
        extra: list[Notification] = []
        while not notify.received.empty():
            extra.append(notify.received.get_nowait())
        assert extra == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()
