"""The relay's memory under large DATA (issue 10 A): N sessions x M MB in flight at once.

Run from the repository root with the project's virtualenv:

    .venv/bin/python -m bench.memory                    # 200 sessions x 5 MB, a minute after
    .venv/bin/python -m bench.memory --sessions 50 --size 2 --after 10   # a quick look
    .venv/bin/python -m bench.memory --source /path/to/other/checkout    # compare a version
    .venv/bin/python -m bench.memory --source /path/to/a935ad4 --old    # before issue 10

It starts one relay process (`relay serve`, one worker, a Maildir upstream, everything
under a temporary directory, listening only on 127.0.0.1), opens the sessions from this
process, sends each message's content without the end marker (all in flight together),
then ends every message and waits for every `250`. The relay's resident memory is read
from /proc: before, with everything in flight, its peak (VmHWM) over the whole run, and
`--after` seconds after the last session closed. Every session is closed and the relay
is stopped (SIGTERM, then SIGKILL after 10 s) whatever happens; the run is bounded by
`--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
LINE = b"x" * 76 + b"\r\n"
BLOCK = LINE * 840  # ~65 KB
CONFIG = """
[server]
hostname = "bench.test"
queue = "{root}/queue"
workers = 1
min_free_disk = 0

[smtp]
max_message_size = "{limit}"
{limits}
[[smtp.listen]]
address = "{host}:{port}"
tls = "none"

[retry]
bounces = false

[[upstream]]
name = "outbox"
type = "maildir"
path = "{root}/outbox"

[web]
listen = "{host}:0"
"""


@dataclass
class Figures:
    baseline_mb: float = 0.0
    in_flight_mb: float = 0.0
    peak_mb: float = 0.0
    after_mb: float = 0.0
    accepted: int = 0
    seconds_to_send: float = 0.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory field, in MB (1000**2 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1000**2
    raise RuntimeError(f"no {field} for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def relay_process(
    root: Path, source: Path, args: argparse.Namespace
) -> AsyncIterator[tuple[int, int]]:
    """A relay serving on a free loopback port: yields (pid, port); always stopped."""
    port = free_port()
    config = root / "config.toml"
    config.write_text(
        CONFIG.format(
            root=root,
            host=HOST,
            port=port,
            limit=f"{args.size * 2 + 1}MB",
            limits=""
            if args.old
            else f"max_connections = {args.sessions + 10}\n"
            f"max_connections_per_ip = {args.sessions + 10}\n",
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "--config",
        str(config),
        "serve",
        cwd=source,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"relay ready" not in (line := await proc.stderr.readline()):
                if not line:
                    raise RuntimeError("the relay exited before it was ready")
        drain = asyncio.create_task(proc.stderr.read())  # keep its log pipe flowing
        yield proc.pid, port
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code.decode()}, got {line!r}")
        if line[3:4] != b"-":
            return


class Session:
    """One client: opened and brought to DATA, then fed, then finished."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, n: int) -> Session:
        reader, writer = await asyncio.open_connection(HOST, port)
        session = cls(reader, writer)
        await expect(reader, b"220")
        for command, code in (
            (b"EHLO bench.test", b"250"),
            (b"MAIL FROM:<bench@example.com>", b"250"),
            (f"RCPT TO:<rcpt{n}@example.org>".encode(), b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await expect(reader, code)
        return session

    async def send_content(self, size: int) -> None:
        self.writer.write(b"Subject: memory bench\r\n\r\n")
        sent = 0
        while sent < size:
            self.writer.write(BLOCK)
            sent += len(BLOCK)
            await self.writer.drain()

    async def finish(self) -> bool:
        self.writer.write(b".\r\nQUIT\r\n")
        line = await self.reader.readline()
        return line.startswith(b"250")

    def close(self) -> None:
        self.writer.close()


async def settled_in_flight(pid: int) -> None:
    """Wait until the relay has read what was sent: its input queues are empty.

    drain() returning means the kernel took the bytes, not that the relay read them; the
    figure "in flight" is meant to be taken once the relay holds all of it.
    """
    for _ in range(600):
        if _unread_bytes(pid) == 0:
            return
        await asyncio.sleep(0.1)


def _unread_bytes(pid: int) -> int:
    """Bytes waiting in the receive queues of the relay's TCP sockets (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if cols[9] in inodes:
                    total += int(cols[4].split(":")[1], 16)
    return total


async def run(args: argparse.Namespace) -> Figures:
    figures = Figures()
    size = args.size * 1000**2
    with tempfile.TemporaryDirectory(prefix="relay-memory-") as tmp:
        async with relay_process(Path(tmp), args.source, args) as (pid, port):
            figures.baseline_mb = rss_mb(pid)
            sessions: list[Session] = []
            try:
                for start in range(0, args.sessions, 50):
                    opened = await asyncio.gather(
                        *(
                            Session.open(port, n)
                            for n in range(start, min(start + 50, args.sessions))
                        )
                    )
                    sessions.extend(opened)
                began = time.monotonic()
                await asyncio.gather(*(s.send_content(size) for s in sessions))
                await settled_in_flight(pid)
                figures.seconds_to_send = time.monotonic() - began
                figures.in_flight_mb = rss_mb(pid)
                results = await asyncio.gather(*(s.finish() for s in sessions))
                figures.accepted = sum(results)
            finally:
                for s in sessions:
                    s.close()
            figures.peak_mb = rss_mb(pid, "VmHWM")
            print(f"waiting {args.after:.0f} s after the sessions closed ...", flush=True)
            await asyncio.sleep(args.after)
            figures.after_mb = rss_mb(pid)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--size", type=int, default=5, help="MB of content per session")
    parser.add_argument("--after", type=float, default=60.0, help="seconds to wait after")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run")
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="the relay to run")
    parser.add_argument(
        "--old", action="store_true", help="--source predates max_connections: leave it out"
    )
    args = parser.parse_args()

    async def bounded() -> Figures:
        async with asyncio.timeout(args.timeout):
            return await run(args)

    f = asyncio.run(bounded())
    print(f"relay at {args.source}: {args.sessions} sessions x {args.size} MB in flight")
    print(f"  RSS before:                 {f.baseline_mb:8.1f} MB")
    print(f"  RSS with all in flight:     {f.in_flight_mb:8.1f} MB")
    print(f"  time to send the content:   {f.seconds_to_send:8.1f} s")
    print(f"  peak RSS (VmHWM), whole run:{f.peak_mb:8.1f} MB")
    print(f"  RSS {args.after:.0f} s after:            {f.after_mb:8.1f} MB")
    print(f"  messages accepted (250):    {f.accepted:8d} of {args.sessions}")
    return 0 if f.accepted == args.sessions else 1


if __name__ == "__main__":
    raise SystemExit(main())
