"""Wires the stages into one event loop: queue → SMTP listeners → dispatcher → web.

Start order matters for invariant 1: the queue opens and recovers abandoned leases before
any listener accepts a connection; at shutdown the listeners close first, then in-flight
attempts get a grace period, and the queue closes last.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.config import Config
from relay.dispatch.bounces import BounceSender
from relay.dispatch.outbound import OutboundWorker
from relay.dispatch.retry import RetryPolicy
from relay.dispatch.routing import BreakerSettings, Router
from relay.dispatch.scheduler import Scheduler
from relay.dkim import DKIMSigner
from relay.message import Kind
from relay.smtp.listener import start_listeners
from relay.spool import queries
from relay.spool.queries import NewMessage
from relay.spool.store import Spool, shard_of, shard_paths
from relay.upstreams.base import Upstream
from relay.upstreams.registry import create_upstream
from relay.web.app import create_app

if TYPE_CHECKING:
    from relay.inbound.service import InboundService

log = logging.getLogger("relay.app")

HISTORY_RETENTION = 7 * 86400.0


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a
    zombie. A pid alone is not an identity: pids are reused, and a killed worker whose
    parent died stays a zombie under an init that does not reap, which kill(pid, 0) still
    reports as alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid()) or 0}"


def process_alive(owner: str) -> bool:
    """Is the process named in a lease owner id still running? Other hosts: assume so,
    and let the lease's expiry decide."""
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    if not Path("/proc/self/stat").exists():  # no procfs: fall back to signal 0
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _proc_start(int(pid_text)) == started


class Relay:
    """One relay process. `start()` and `stop()` are what `relay serve` and tests call."""

    def __init__(
        self, config: Config, *, clock: Any = time.time, shard: int = 0, workers: int = 1
    ) -> None:
        self.config = config
        self.clock = clock
        self.owner = owner_id()
        # With several workers, worker `shard` owns one queue shard; worker 0 also runs
        # the web server and inbound, and drains shards no worker owns any more.
        self.shard = shard
        self.workers = workers
        self.spool = Spool(config.queue_dir, shard=shard, min_free_disk=config.server.min_free_disk)
        self.spools = [self.spool]
        r = config.routing
        self.router = Router(
            settings=BreakerSettings(
                failures_to_open=r.failures_to_open,
                cooldown=r.cooldown,
                cooldown_max=r.cooldown_max,
                health_half_life=r.health_half_life,
            )
        )
        self.upstreams: list[Upstream] = []
        self.smtp_servers: list[asyncio.Server] = []
        self.web_runner: web.AppRunner | None = None
        self.web_port: int | None = None
        self.outbound: Scheduler | None = None  # the primary shard's dispatcher
        self.schedulers: list[Scheduler] = []
        # Inbound from SES (relay.inbound.service), present when config has [inbound].
        self.inbound: InboundService | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self, *, smtp: bool = True, web_server: bool = True, dispatch: bool = True
    ) -> None:
        cfg = self.config
        if self.shard == 0:
            self.spools += [
                Spool(cfg.queue_dir, shard=shard_of(path))
                for path in shard_paths(cfg.queue_dir)
                if shard_of(path) >= self.workers
            ]
        for spool in self.spools:
            spool.start()
            recovered = await spool.write(self._recover)
            if recovered:
                log.warning(
                    "%s: recovered %d message(s) left in flight by a stopped process",
                    spool.path.name,
                    len(recovered),
                )
        for i, up_cfg in enumerate(cfg.upstream):
            upstream = create_upstream(up_cfg, f"upstream[{i}]", cfg)
            await upstream.start()
            self.upstreams.append(upstream)
            self.router.add(
                upstream,
                priority=up_cfg.priority,
                weight=up_cfg.weight,
                max_rate=up_cfg.max_rate,
                max_concurrency=up_cfg.max_concurrency,
            )
        self.schedulers = [self._outbound_scheduler(spool) for spool in self.spools]
        self.outbound = self.schedulers[0]
        if dispatch:
            for scheduler in self.schedulers:
                self._tasks.append(asyncio.create_task(scheduler.run(), name="dispatch"))
            self._tasks.append(asyncio.create_task(self._maintenance(), name="maintenance"))
        if cfg.inbound and self.shard == 0:
            from relay.inbound.service import InboundService

            self.inbound = InboundService(self)
            await self.inbound.start(dispatch=dispatch)
        if web_server and self.shard == 0:
            await self._start_web()
        if smtp:
            self.smtp_servers = await start_listeners(cfg, self.submit, reuse_port=self.workers > 1)

    def _outbound_scheduler(self, spool: Spool) -> Scheduler:
        cfg = self.config
        policy = RetryPolicy(schedule=tuple(cfg.retry.schedule), max_age=cfg.retry.max_age)
        signer = DKIMSigner.from_config(cfg) if cfg.dkim else None
        bouncer = (
            BounceSender(
                spool=spool, submit=self.submit, hostname=cfg.server.hostname, clock=self.clock
            )
            if cfg.retry.bounces
            else None
        )
        worker = OutboundWorker(
            spool=spool,
            router=self.router,
            policy=policy,
            owner=self.owner,
            clock=self.clock,
            on_finish=self.notify_progress,
            signer=signer,
            bouncer=bouncer,
        )
        return Scheduler(
            spool,
            worker,
            kind=Kind.OUTBOUND,
            owner=self.owner,
            concurrency=cfg.retry.concurrency,
            lease_time=cfg.server.lease_time,
            clock=self.clock,
        )

    async def _start_web(self) -> None:
        listen = self.config.web.listen
        self.web_runner = web.AppRunner(create_app(self), access_log=None)
        await self.web_runner.setup()
        site = web.TCPSite(self.web_runner, listen.host, listen.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.web_port = server.sockets[0].getsockname()[1]
        log.info("web listening on %s:%s", listen.host, self.web_port)

    async def stop(self) -> None:
        for server in self.smtp_servers:
            server.close()
        for server in self.smtp_servers:
            await server.wait_closed()
        for scheduler in self.schedulers:
            await scheduler.stop()
        if self.inbound is not None:
            await self.inbound.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.web_runner is not None:
            await self.web_runner.cleanup()
        for upstream in self.upstreams:
            await upstream.close()
        for spool in self.spools:
            await spool.close()

    async def _maintenance(self) -> None:
        """Recover leases of processes that died while we run; forget old history."""
        interval = max(min(self.config.server.lease_time / 2, 60.0), 1.0)
        while True:
            await asyncio.sleep(interval)
            for spool, scheduler in zip(self.spools, self.schedulers, strict=True):
                if await spool.write(self._recover):
                    scheduler.wake()
                    if self.inbound is not None and spool is self.spool:
                        self.inbound.wake()
                await spool.write(
                    functools.partial(
                        queries.purge_history, older_than=self.clock() - HISTORY_RETENTION
                    )
                )

    def _alive(self, owner: str) -> bool:
        return owner == self.owner or process_alive(owner)

    def _recover(self, conn: sqlite3.Connection) -> list[str]:
        return queries.recover(conn, now=self.clock(), alive=self._alive)

    # -- the SMTP layer's entry point ---------------------------------------------------

    async def submit(self, message: NewMessage) -> None:
        """Make the message durable (raises StoreFull / StoreError), then wake dispatch."""
        self.spool.check_free_space()
        await self.spool.write(lambda c: queries.insert(c, message))
        if self.outbound is not None:
            self.outbound.wake()

    def notify_progress(self) -> None:
        """A unit of work finished a round: wake whoever waits in `wait_for`."""
        self._progress.set()

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        """Wait until `await predicate()` is true, re-checking after every delivery round."""
        async with asyncio.timeout(timeout):
            while True:
                self._progress.clear()
                if await predicate():
                    return
                await self._progress.wait()

    def smtp_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self.smtp_servers]

    def readiness_problems(self) -> list[str]:
        problems = []
        try:
            self.spool.check_free_space()
        except Exception as exc:
            problems.append(str(exc))
        if not self.smtp_servers:
            problems.append("no SMTP listener is running")
        return problems


async def serve(config: Config, *, shard: int = 0, workers: int = 1, on_ready: Any = None) -> None:
    """Run one relay process until SIGTERM or SIGINT."""
    relay = Relay(config, shard=shard, workers=workers)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    else:
        log.info("relay ready: SMTP %s", ", ".join(str(p) for p in relay.smtp_ports()))
    await stop.wait()
    log.info("shutting down")
    await relay.stop()
