"""A relay as its own process (`python -m relay serve`), for tests that kill it, or run
several of them as the hosts of a cluster."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RelayProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._line = asyncio.Event()  # set at each new log line, and at the end

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "--config",
            str(self.config),
            "serve",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        await asyncio.wait_for(ready, 30)

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            self._line.set()
            if "relay ready" in line and not ready.done():
                ready.set_result(None)
        self._line.set()
        if not ready.done():
            ready.set_exception(RuntimeError("relay exited:\n" + "\n".join(self.log[-30:])))

    async def wait_line(self, text: str, timeout: float = 30) -> str:
        """The first log line containing `text` (since the first start), once written."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.log[seen:]:
                    if text in line:
                        return line
                seen = len(self.log)
                if self._reader is None or self._reader.done():
                    raise AssertionError(f"relay exited without logging {text!r}")
                self._line.clear()
                await self._line.wait()

    async def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` lines of the log contain `text`."""
        async with asyncio.timeout(timeout):
            while sum(text in line for line in self.log) < count:
                self._line.clear()
                await self._line.wait()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader:
            await self._reader

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader:
            await self._reader


async def relay_cli(
    *args: str, config: Path, stdin: bytes | None = None, timeout: float | None = None
) -> tuple[int, str, str]:
    """`python -m relay --config CONFIG ARGS...` to its end: (exit status, stdout, stderr).
    Killed after `timeout` seconds (a `serve` that should have exited)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
