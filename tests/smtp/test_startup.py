"""Starting `relay serve` for real (subprocesses): a listener that cannot be served is
one clear line and a non-zero exit (issue 10 H), and workers starting together on a fresh
`var/` share one self-signed certificate instead of racing to create it (issue 10 R)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import smtplib
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.smtp.tls import ensure_self_signed
from tests.fakes.relay_process import free_port, relay_cli

EX_CONFIG = 78


def write_config(tmp_path: Path, address: str, *, workers: int, tls: str = "none") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"
queue = "var/queue"
workers = {workers}
min_free_disk = 0

[[smtp.listen]]
address = "{address}"
tls = "{tls}"

[[upstream]]
name = "outbox"
type = "maildir"
path = "var/outbox"

[web]
listen = "127.0.0.1:0"
"""
    )
    return path


async def serve(config: Path, timeout: float = 30.0) -> tuple[int, str]:
    code, _, err = await relay_cli("serve", config=config, timeout=timeout)
    return code, err


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
async def test_address_in_use_is_one_line_and_exit_status_78(tmp_path: Path, workers: int) -> None:
    with occupied_port() as port:
        code, err = await serve(write_config(tmp_path, f"127.0.0.1:{port}", workers=workers))
    assert code == EX_CONFIG, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR relay.smtp " in line]
    assert 1 <= len(errors) <= workers, err  # each worker that tried says it once
    assert f"cannot listen on 127.0.0.1:{port} (smtp.listen[0])" in errors[0]
    assert "in use" in errors[0]


async def test_unresolvable_listener_address_is_one_line(tmp_path: Path) -> None:
    code, err = await serve(write_config(tmp_path, "no-such-host.invalid:2525", workers=1))
    assert code == EX_CONFIG, err
    assert "Traceback" not in err and "gaierror" not in err
    assert "cannot listen on no-such-host.invalid:2525 (smtp.listen[0])" in err


def _make_pair(directory: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    ensure_self_signed(Path(directory), "relay.test")


def test_self_signed_pair_is_made_once_by_racing_workers(tmp_path: Path) -> None:
    fork = multiprocessing.get_context("fork")
    for round_ in range(5):
        directory = tmp_path / f"tls{round_}"
        barrier = fork.Barrier(4)
        procs = [fork.Process(target=_make_pair, args=(str(directory), barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(directory / "selfsigned.crt", directory / "selfsigned.key")
        assert sorted(p.name for p in directory.iterdir()) == [
            ".lock",
            "selfsigned.crt",
            "selfsigned.key",
        ]


def _starttls_ehlo(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        assert client.ehlo("client.test")[0] == 250


async def test_first_start_with_four_workers_shares_one_certificate(tmp_path: Path) -> None:
    for round_ in range(3):
        root = tmp_path / f"run{round_}"
        root.mkdir()
        port = free_port()
        config = write_config(root, f"127.0.0.1:{port}", workers=4, tls="starttls")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(config),
            "serve",
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(60):
                while b"relay ready: 4 workers" not in (line := await proc.stderr.readline()):
                    assert line, "the relay exited before it was ready"
                    assert b"Traceback" not in line and b"KEY_VALUES_MISMATCH" not in line
            for _ in range(8):  # SO_REUSEPORT spreads these over the workers
                await asyncio.to_thread(_starttls_ehlo, port)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.communicate()
        assert proc.returncode == 0
