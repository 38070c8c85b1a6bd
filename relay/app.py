"""Wires the stages into one event loop: queue → SMTP listeners → dispatcher → web.

Start order matters for invariant 1: the queue opens and recovers abandoned leases before
any listener accepts a connection; at shutdown the listeners close first, then in-flight
attempts get a grace period, and the queue closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay import heap, sdnotify, wire
from relay.certwatch import CertWatcher
from relay.checks import check
from relay.config import Config
from relay.dispatch.bounces import BounceSender
from relay.dispatch.outbound import OutboundWorker, wake_after_recoveries
from relay.dispatch.retry import RetryPolicy
from relay.dispatch.routing import BreakerSettings, Router
from relay.dispatch.scheduler import Scheduler
from relay.dkim import DKIMSigner
from relay.message import Kind, NewMessage, Status
from relay.queue import open_queue
from relay.queue.base import StoreError
from relay.queue.owner import owner_id, process_alive
from relay.reload import (
    ReloadResult,
    install_sighup,
    reload_relay,
    remove_pid_file,
    write_pid_file,
)
from relay.smtp.drain import Sessions
from relay.smtp.listener import ListenerError, start_listeners
from relay.smtp.live import LiveSMTP
from relay.smtp.tls import server_tls_context
from relay.telemetry.core import Telemetry
from relay.telemetry.rollup import KEEP as KEEP_STATS
from relay.upstreams.base import Upstream
from relay.upstreams.registry import create_upstream
from relay.web.app import create_app
from relay.web.auth import ACCESS_KEY, Access
from relay.web.context import WebContext

if TYPE_CHECKING:
    from relay.events.outbox import WebhookSender
    from relay.events.registry import ProviderHooks
    from relay.events.service import EventService
    from relay.inbound.service import InboundService
    from relay.suppression import SuppressionList

log = logging.getLogger("relay.app")


class Relay:
    """One relay process. `start()` and `stop()` are what `relay serve` and tests call."""

    def __init__(
        self, config: Config, *, clock: Any = time.time, shard: int = 0, workers: int = 1
    ) -> None:
        # The sections relay.config leaves to their packages (upstreams, DKIM, inbound):
        # a config made by config.parse() in-process fails here, with the key, not later.
        check(config)
        self.config = config
        self.clock = clock
        self.owner = owner_id(config.server.node)
        # With several workers (`shard` = this worker's number), worker 0 also runs the web
        # server and inbound. The queue decides what a worker's number means for storage.
        self.shard = shard
        self.workers = workers
        self.queue = open_queue(config, owner=self.owner, shard=shard, workers=workers)
        # What this process counts: Prometheus values and the shared per-minute stats.
        self.telemetry = Telemetry(self.queue.stats, clock=clock)
        r = config.routing
        self.router = Router(
            settings=BreakerSettings(
                failures_to_open=r.failures_to_open,
                cooldown=r.cooldown,
                cooldown_max=r.cooldown_max,
                health_half_life=r.health_half_life,
            ),
            store=self.queue.routing,
        )
        self.upstreams: list[Upstream] = []
        self.smtp_servers: list[asyncio.Server] = []
        self.web_runner: web.AppRunner | None = None
        self.web_port: int | None = None
        self.outbound: Scheduler | None = None
        # Inbound from SES (relay.inbound.service), present when config has [inbound].
        self.inbound: InboundService | None = None
        # Provider events (POST /webhooks/<upstream>) and the apps' webhooks out.
        self.events: EventService | None = None
        self.webhook_sender: WebhookSender | None = None
        # The upstreams' event endpoints (worker 0, with the web server).
        self.provider_hooks: ProviderHooks | None = None
        # This process's copy of the suppression list (relay.suppression).
        self.suppression: SuppressionList | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()
        # What a reload changes in place (relay.reload): the listeners' users, networks
        # and TLS context, the web tokens and TLS context, and their certificate watcher.
        self.live_smtp = LiveSMTP()
        # The SMTP listeners and sessions, closed and drained at shutdown.
        self.smtp_sessions = Sessions()
        self._stopped = False
        self.web_access: Access | None = None
        self.web_tls: ssl.SSLContext | None = None
        self.cert_watcher: CertWatcher | None = None
        self.reload_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self, *, smtp: bool = True, web_server: bool = True, dispatch: bool = True
    ) -> None:
        cfg = self.config
        await self.queue.start()
        self.telemetry.start()
        recovered = await self._recover()
        if recovered:
            log.warning(
                "%s: recovered %d message(s) left in flight by a stopped process",
                self.queue.describe,
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
        await self._start_suppression()
        if self.shard == 0 and dispatch:
            # Also without [[webhook]]s: a reload may add some, and events a removed hook
            # left in the outbox are given up (and counted) rather than kept waiting.
            from relay.events.outbox import WebhookSender

            self.webhook_sender = WebhookSender(
                self.queue.outbox, cfg.webhook, owner=self.owner, clock=self.clock
            )
            self._tasks.append(asyncio.create_task(self.webhook_sender.run(), name="webhooks"))
        self.events = self._event_service()
        self.outbound = self._outbound_scheduler()
        if dispatch:
            with contextlib.suppress(StoreError):
                await self.router.sync()  # start from what the other processes know
            self._tasks.append(asyncio.create_task(self.outbound.run(), name="dispatch"))
            self._tasks.append(asyncio.create_task(self.router.sync_forever(), name="routing"))
            self._tasks.append(
                asyncio.create_task(
                    wake_after_recoveries(self.router, self.queue, self.clock), name="recoveries"
                )
            )
            self._tasks.append(asyncio.create_task(self._maintenance(), name="maintenance"))
        if cfg.inbound and self.shard == 0:
            from relay.inbound.service import InboundService

            self.inbound = InboundService(
                config=cfg,
                queue=self.queue,
                clock=self.clock,
                on_finish=self.notify_progress,
                telemetry=self.telemetry,
            )
            await self.inbound.start(dispatch=dispatch)
        if web_server and self.shard == 0:
            await self._start_web()
        if smtp:
            self.smtp_servers = await start_listeners(
                cfg,
                self.submit,
                reuse_port=self.workers > 1,
                telemetry=self.telemetry,
                suppressions=self.suppression,
                live=self.live_smtp,
                sessions=self.smtp_sessions,
            )
        self._watch_certificates()

    def _watch_certificates(self) -> None:
        """certbot renews by rewriting the files: new handshakes get the new pair."""
        watcher = CertWatcher()
        live = self.live_smtp
        if live.tls is not None and live.tls_files is not None:
            cert, key = live.tls_files
            watcher.watch("smtp", live.tls, cert, key, min_version=self.config.smtp.tls_min_version)
        web_cfg = self.config.web
        if self.web_tls is not None:
            cert, key = self.config.resolve(web_cfg.tls_cert), self.config.resolve(web_cfg.tls_key)
            watcher.watch("web", self.web_tls, cert, key, min_version="TLSv1.2")
        self.cert_watcher = watcher
        if watcher.pairs:
            self.track(watcher.run(), name="certificates")

    def track(self, work: Coroutine[Any, Any, object], *, name: str) -> asyncio.Task[object]:
        """Run `work` beside the relay; cancelled (and awaited) by `stop()`."""
        task = asyncio.create_task(work, name=name)
        self._tasks.append(task)  # type: ignore[arg-type]
        return task

    async def reload(self, config: Config | None = None) -> ReloadResult:
        """Put a new config in force without a restart (relay.reload): `config`, or the
        file this one came from, read again."""
        return await reload_relay(self, config)

    async def _start_suppression(self) -> None:
        """Loaded before any listener opens: no mail is taken that the list would refuse."""
        from relay.suppression import SuppressionList

        self.suppression = SuppressionList(
            self.queue.suppressions, self.config.suppression, clock=self.clock
        )
        await self.suppression.start()
        self._tasks.append(asyncio.create_task(self.suppression.run(), name="suppression"))

    def _bouncer(self) -> BounceSender | None:
        if not self.config.retry.bounces:
            return None
        return BounceSender(
            queue=self.queue, hostname=self.config.server.hostname, clock=self.clock
        )

    def _event_service(self) -> EventService:
        from relay.events.service import EventService

        sender = self.webhook_sender
        return EventService(
            config=self.config,
            queue=self.queue,
            clock=self.clock,
            telemetry=self.telemetry,
            bouncer=self._bouncer(),
            suppression=self.suppression,
            outbox_wake=sender.wake if sender is not None else None,
        )

    def _outbound_scheduler(self) -> Scheduler:
        cfg = self.config
        policy = RetryPolicy(schedule=tuple(cfg.retry.schedule), max_age=cfg.retry.max_age)
        signer = DKIMSigner.from_config(cfg) if cfg.dkim else None
        suppression = self.suppression
        worker = OutboundWorker(
            queue=self.queue,
            router=self.router,
            policy=policy,
            clock=self.clock,
            on_finish=self.notify_progress,
            signer=signer,
            bouncer=self._bouncer(),
            telemetry=self.telemetry,
            keep_body_for=(
                [u.name for u in cfg.upstream if u.events] if cfg.events.requeue else ()
            ),
            suppressed=(
                suppression.suppressed
                if suppression is not None and cfg.suppression.action == "bounce"
                else None
            ),
            on_round=self.events.after_round if self.events and cfg.webhook else None,
        )
        return Scheduler(
            self.queue,
            worker,
            kind=Kind.OUTBOUND,
            concurrency=cfg.retry.concurrency,
            lease_time=cfg.server.lease_time,
            clock=self.clock,
        )

    def _provider_hooks(self) -> ProviderHooks:
        from relay.events.base import WebhookContext
        from relay.events.registry import ProviderHooks

        assert self.events is not None
        hooks = ProviderHooks(
            WebhookContext(
                clock=self.clock,
                first_use=self.queue.first_use,
                forget_use=self.queue.forget_use,
                fetch=self.events.fetch,
            )
        )
        hooks.swap(hooks.build(self.config))
        self.provider_hooks = hooks
        return hooks

    async def _start_web(self) -> None:
        web_cfg = self.config.web
        listen = web_cfg.listen
        if not web_cfg.tokens and not web_cfg.loopback_only and not web_cfg.allow_no_tokens:
            log.error(
                "web: %s is not a loopback address and no [[web.tokens]] are configured;"
                " add a token (relay token new), listen on 127.0.0.1, or set"
                " [web] allow_no_tokens = true to serve health, metrics and webhooks only",
                listen,
            )
            raise ListenerError
        context = WebContext(
            config=self.config,
            queue=self.queue,
            submit=self.submit,
            readiness=self.readiness_problems,
            inbound=self.inbound,
            clock=self.clock,
            telemetry=self.telemetry,
            routing_changed=self.router.refresh,
            events=self.events,
            provider_hooks=self._provider_hooks(),
            suppressions=self.suppression,
        )
        app = create_app(context)
        self.web_access = app[ACCESS_KEY]
        self.web_runner = web.AppRunner(app, access_log=None)
        await self.web_runner.setup()
        tls = None
        if web_cfg.tls_cert:
            tls = server_tls_context(
                cert=self.config.resolve(web_cfg.tls_cert),
                key=self.config.resolve(web_cfg.tls_key),
                min_version="TLSv1.2",
            )
        self.web_tls = tls
        site = web.TCPSite(self.web_runner, listen.host, listen.port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            log.error("web: cannot listen on %s: %s", listen, exc.strerror or exc)
            raise ListenerError from None
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.web_port = server.sockets[0].getsockname()[1]
        log.info(
            "web listening on %s:%s%s",
            listen.host,
            self.web_port,
            " (TLS)" if tls else "",
            extra={"event": "listening", "listener": f"{listen.host}:{self.web_port}"},
        )

    async def stop(self) -> None:
        """The graceful stop (SIGTERM): the SMTP listeners close at once; sessions finish
        their transaction and deliveries in flight their attempt, both within
        `server.shutdown_grace` (relay.smtp.drain); what is still running then is cut and
        its leases are given back; the queue closes last."""
        if self._stopped:
            return  # stopped already (a test, then its fixture)
        self._stopped = True
        grace = self.config.server.shutdown_grace
        self._begin_smtp_drain(grace)
        await asyncio.gather(self._drain_smtp(grace), self._stop_dispatch(grace))
        for server in self.smtp_servers:
            await server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.web_runner is not None:
            await self.web_runner.cleanup()
        if self.webhook_sender is not None:
            await self.webhook_sender.stop()
        if self.provider_hooks is not None:
            await self.provider_hooks.close()
        if self.events is not None:
            await self.events.close()
        for upstream in self.upstreams:
            await upstream.close()
        await self.telemetry.stop()
        await self.queue.close()

    def _begin_smtp_drain(self, grace: float) -> None:
        """At once, before the first await: no connection is accepted after stop()."""
        sessions = self.smtp_sessions
        if not sessions.listeners:
            return
        sessions.begin()
        log.info(
            "SMTP listeners closed; %d open session(s) may finish their transaction for up to %gs",
            sessions.report.open_at_start,
            grace,
        )

    async def _drain_smtp(self, grace: float) -> None:
        sessions = self.smtp_sessions
        if not sessions.listeners:
            return
        report = await sessions.drain(grace)
        if report.over_grace or report.backlog:
            log.warning(
                "SMTP drain: %d session(s) still open when the grace ended got 421 4.3.2"
                " (%d cut while storing), %d queued connection(s) got 421 4.3.2",
                report.over_grace,
                report.aborted,
                report.backlog,
            )

    async def _stop_dispatch(self, grace: float) -> None:
        """No new claims; attempts in flight get the grace; leases of those cut are given
        back, so that the next process (or another host) takes them at once."""
        cancelled = 0
        if self.outbound is not None:
            cancelled += await self.outbound.stop(grace)
        if self.inbound is not None:
            await self.inbound.stop()
        # The claiming loop ends before the leases are looked at: a claim it had under
        # way is then given back below instead of kept until the lease expires.
        loops = [task for task in self._tasks if task.get_name() == "dispatch"]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if not loops and self.inbound is None:
            return
        node = self.config.server.node
        try:
            released = await self.queue.recover(
                now=self.clock(),
                alive=lambda owner: owner != self.owner and process_alive(owner, node=node),
            )
        except StoreError as exc:
            log.warning("leases not given back at shutdown (recovered at the next start): %s", exc)
            return
        if released or cancelled:
            log.info(
                "%d attempt(s) still running after %gs were cut; %d lease(s) given back",
                cancelled,
                grace,
                len(released),
            )

    def hurry(self) -> None:
        """A second SIGTERM or Ctrl-C: end the grace now."""
        self.smtp_sessions.hurry()
        if self.outbound is not None:
            self.outbound.hurry()

    async def _maintenance(self) -> None:
        """Recover leases of processes that died while we run; forget old history."""
        cfg = self.config
        interval = max(min(cfg.server.lease_time / 2, 60.0), 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                recovered = await self._recover()
                server = self.config.server
                for state, keep in (
                    (Status.SENT, server.keep_sent),
                    (Status.FAILED, server.keep_failed),
                ):
                    await self.queue.purge_history(state=state, older_than=self.clock() - keep)
                await self.queue.stats.purge(older_than=self.clock() - KEEP_STATS)
                await self.queue.drop_bodies(sent_before=self.clock() - cfg.events.keep_body)
                await self.queue.suppressions.purge(now=self.clock())
                await self.queue.outbox.purge(older_than=self.clock() - server.keep_failed)
            except StoreError as exc:
                log.warning("queue maintenance skipped: %s", exc)
                continue
            if recovered:
                log.warning("recovered %d message(s) from expired leases", len(recovered))
                if self.outbound is not None:
                    self.outbound.wake()
                if self.inbound is not None:
                    self.inbound.wake()

    def _alive(self, owner: str) -> bool:
        return owner == self.owner or process_alive(owner, node=self.config.server.node)

    async def _recover(self) -> list[str]:
        return await self.queue.recover(now=self.clock(), alive=self._alive)

    # -- the SMTP layer's entry point ---------------------------------------------------

    async def submit(self, message: NewMessage) -> None:
        """Make the message durable (raises StoreFull / StoreError); the queue wakes
        dispatch."""
        self.queue.check_accepting()
        await self.queue.insert(message)

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

    async def readiness_problems(self) -> list[str]:
        problems = await self.queue.problems()
        if not self.smtp_servers:
            problems.append("no SMTP listener is running")
        if self.smtp_sessions.draining:
            problems.append("shutting down: SMTP listeners closed, sessions draining")
        return problems


async def serve(config: Config, *, shard: int = 0, workers: int = 1, on_ready: Any = None) -> None:
    """Run one relay process until SIGTERM or SIGINT."""
    relay = Relay(config, shard=shard, workers=workers)
    await relay.start()
    heap.freeze()  # what starting made lives as long as the process
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    install_sighup(relay)
    # `relay reload` finds a lone process here (a supervisor writes its own).
    pid_path = write_pid_file(config) if on_ready is None else None
    if on_ready is not None:
        on_ready()
    else:
        log.info(
            "relay ready: SMTP %s; DATA scanner: %s",
            ", ".join(str(p) for p in relay.smtp_ports()),
            wire.SCANNER,
            extra={"event": "ready", "scanner": wire.SCANNER},
        )
        sdnotify.ready("serving SMTP on " + ", ".join(str(p) for p in relay.smtp_ports()))
    await stop.wait()
    sdnotify.stopping("shutting down")  # a no-op in a worker: the supervisor says it
    log.info("shutting down", extra={"event": "stopping"})
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second one ends the grace at once
        loop.add_signal_handler(sig, relay.hurry)
    await relay.stop()
    remove_pid_file(pid_path)
