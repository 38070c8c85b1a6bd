"""Inbound from Amazon SES, wired into one relay process.

`Relay.start()` creates an `InboundService` when the config has `[inbound]`, handing it the
queue and the settings it needs (not the relay). It owns:

- the S3 fetcher, the KMS decryptor and one destination object per route (plus the
  quarantine Maildirs), started once and closed at shutdown;
- a `Scheduler` for `Kind.INBOUND` work driving an `InboundWorker`, so inbound work gets
  the same leases, retries, dead letter and replay as outbound mail;
- the SQS consumer task, when `[inbound.sqs]` is configured;
- `enqueue()`, the one way notifications become work: the SNS endpoint and the SQS
  consumer both call it, and only answer 200 / delete the SQS message once it returned
  (the queue's group commit has fsynced the row). The queue's unique `dedupe` index makes
  a second notification for the same SES message a no-op, whichever path it came by.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.dispatch.retry import RetryPolicy
from relay.dispatch.scheduler import Scheduler
from relay.inbound.decrypt import Decryptor
from relay.inbound.destinations.base import Destination
from relay.inbound.destinations.maildir import MaildirDestination
from relay.inbound.destinations.registry import create_destination
from relay.inbound.fetch import S3Fetcher
from relay.inbound.notify import InboundWork
from relay.inbound.settings import InboundSettings, parse_inbound
from relay.inbound.sns import Fetcher, HTTPSFetcher
from relay.inbound.sqs import SQSConsumer
from relay.inbound.worker import UNUSABLE_KEY, InboundWorker
from relay.message import Envelope, Kind, NewMessage, new_message_id
from relay.queue.base import Queue

if TYPE_CHECKING:
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.inbound")


class InboundService:
    """Inbound work for one relay process: see the module docstring."""

    def __init__(
        self,
        *,
        config: Config,
        queue: Queue,
        clock: Callable[[], float] = time.time,
        on_finish: Callable[[], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.queue = queue
        self.clock = clock
        self.on_finish = on_finish
        self.settings: InboundSettings = parse_inbound(config.inbound, config)
        aws = self.settings.aws
        self.fetcher = S3Fetcher(
            region=aws.region or None,
            endpoint_url=aws.endpoint_url or None,
            max_size=self.settings.max_message_size,
        )
        self.decryptor = Decryptor(
            region=aws.region or None,
            endpoint_url=aws.endpoint_url or None,
            allow_plaintext=self.settings.allow_plaintext,
        )
        # How the SNS endpoint fetches signing certificates. Replaceable before the first
        # POST (tests point it at a local https server through a pinned resolver); the host
        # checks in relay.inbound.sns run before it is ever called, in tests as in production.
        self.cert_fetcher: Fetcher = HTTPSFetcher()
        self.destinations: dict[str, Destination] = {}
        self.quarantines: dict[str, Destination] = {}
        self.scheduler: Scheduler | None = None
        self.sqs: SQSConsumer | None = None
        self._started: list[Destination] = []
        self._run_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, dispatch: bool = True) -> None:
        """Start destinations and the worker loop (when `dispatch`), then the SQS consumer.

        The consumer runs even without dispatch: like the SMTP listener, it only records
        work durably; what it records waits in the queue for a dispatching process.
        """
        cfg = self.config
        for route in self.settings.routes:
            dest = create_destination(route.destination, name=route.name, base_dir=cfg.base_dir)
            self.destinations[route.name] = dest
            if route.quarantine and route.quarantine not in self.quarantines:
                self.quarantines[route.quarantine] = MaildirDestination(
                    "quarantine", cfg.resolve(route.quarantine)
                )
        for dest in [*self.destinations.values(), *self.quarantines.values()]:
            await dest.start()
            self._started.append(dest)
        worker = InboundWorker(
            queue=self.queue,
            settings=self.settings,
            fetcher=self.fetcher,
            decryptor=self.decryptor,
            destinations=self.destinations,
            quarantines=self.quarantines,
            policy=RetryPolicy(schedule=tuple(cfg.retry.schedule), max_age=cfg.retry.max_age),
            clock=self.clock,
            on_finish=self.on_finish,
            telemetry=self.telemetry,
        )
        self.scheduler = Scheduler(
            self.queue,
            worker,
            kind=Kind.INBOUND,
            concurrency=self.settings.concurrency,
            lease_time=cfg.server.lease_time,
            clock=self.clock,
        )
        if dispatch:
            self._run_task = asyncio.create_task(self.scheduler.run(), name="inbound-dispatch")
        if self.settings.sqs is not None:
            self.sqs = SQSConsumer(
                self, self.settings.sqs, aws=self.settings.aws, sns=self.settings.sns
            )
            self.sqs.start()
        log.info(
            "inbound ready: %d route(s)%s%s",
            len(self.settings.routes),
            ", SNS endpoint /inbound/sns" if self.settings.sns else "",
            f", SQS {self.settings.sqs.queue_url}" if self.settings.sqs else "",
        )

    async def stop(self) -> None:
        """Stop taking notifications first, then let in-flight work finish (or keep its
        lease for recovery), then close the destinations. (The certificate fetcher is
        closed with the web app that uses it: see relay.web.inbound.)"""
        if self.sqs is not None:
            await self.sqs.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
            self._run_task = None
        for dest in self._started:
            try:
                await dest.close()
            except Exception:
                log.exception("closing destination %s failed", dest.name)
        self._started.clear()

    async def replace_routes(self, settings: InboundSettings) -> None:
        """A reload's `[[inbound.route]]` list. Destinations of new or changed routes
        are started first (an error leaves the old routes in force); those no longer
        routed to stay open for work already on its way to them, and close at shutdown."""
        cfg = self.config
        old = {route.name: route for route in self.settings.routes}
        destinations = dict(self.destinations)
        quarantines = dict(self.quarantines)
        fresh: list[Destination] = []
        for route in settings.routes:
            before = old.get(route.name)
            if before is None or before.destination != route.destination:
                dest = create_destination(route.destination, name=route.name, base_dir=cfg.base_dir)
                destinations[route.name] = dest
                fresh.append(dest)
            if route.quarantine and route.quarantine not in quarantines:
                quarantine = MaildirDestination("quarantine", cfg.resolve(route.quarantine))
                quarantines[route.quarantine] = quarantine
                fresh.append(quarantine)
        started: list[Destination] = []
        try:
            for dest in fresh:
                await dest.start()
                started.append(dest)
        except BaseException:
            for dest in started:
                await dest.close()
            raise
        self._started.extend(started)
        self.settings = settings
        self.destinations, self.quarantines = destinations, quarantines
        if self.scheduler is not None and isinstance(self.scheduler.worker, InboundWorker):
            worker = self.scheduler.worker
            worker.settings = settings
            worker.destinations, worker.quarantines = dict(destinations), dict(quarantines)

    def wake(self) -> None:
        """New or flushed work is due: don't wait for the scheduler's next poll."""
        if self.scheduler is not None:
            self.scheduler.wake()

    # -- recording work ------------------------------------------------------------------

    async def enqueue(self, work: InboundWork, *, via: str, extra: dict[str, Any]) -> bool:
        """Record `work` durably and wake the worker. False: the same stored message was
        already recorded (an SNS retry, an SQS redelivery, or both paths configured).

        Raises relay.queue.base.StoreError (StoreFull) when the queue can't take it: the
        caller must then not acknowledge the notification, so AWS delivers it again.
        """
        now = self.clock()
        received: dict[str, Any] = {
            "via": via,
            "object": f"s3://{work.bucket}/{work.key}",
            "origin": work.origin,
            "dedupe": work.dedupe_key,
        }
        if work.message_id:
            received["ses_message_id"] = work.message_id
        verdicts = {
            name: value
            for name, value in (
                ("spam", work.spam_verdict),
                ("virus", work.virus_verdict),
                ("spf", work.spf_verdict),
                ("dkim", work.dkim_verdict),
                ("dmarc", work.dmarc_verdict),
            )
            if value
        }
        if verdicts:
            received["verdicts"] = verdicts
        received.update(extra)
        message = NewMessage(
            id=new_message_id(now),
            kind=Kind.INBOUND,
            envelope=Envelope(work.source or "", tuple(work.recipients)),
            data=json.dumps(work.to_dict(), separators=(",", ":")).encode(),
            received_at=now,
            received=received,
            dedupe=work.dedupe_key,
            meta={"via": via},
        )
        inserted = await self._insert(message)
        if self.telemetry is not None:
            self.telemetry.inbound("queued" if inserted else "duplicate")
        if inserted:
            log.info(
                "inbound %s queued via %s: s3://%s/%s for %s",
                message.id,
                via,
                work.bucket,
                work.key,
                ", ".join(work.recipients) or "(recipients from headers)",
            )
        else:
            log.info("inbound duplicate via %s ignored: %s", via, work.dedupe_key)
        return inserted

    async def enqueue_unusable(
        self, reason: str, payload: str, *, via: str, dedupe: str, extra: dict[str, Any]
    ) -> bool:
        """Record an authentic notification the relay can't act on as failed work, so the
        operator sees it in `relay queue list` (a dead letter with its reason) instead of
        it vanishing into a log line or being redelivered by AWS forever."""
        now = self.clock()
        message = NewMessage(
            id=new_message_id(now),
            kind=Kind.INBOUND,
            envelope=Envelope("", ()),
            data=json.dumps({UNUSABLE_KEY: reason, "payload": payload[:65536]}).encode(),
            received_at=now,
            received={"via": via, "unusable": reason, **extra},
            dedupe=dedupe,
            meta={"via": via},
        )
        inserted = await self._insert(message)
        if self.telemetry is not None:
            self.telemetry.inbound("unusable" if inserted else "duplicate")
        if inserted:
            log.warning("inbound %s via %s cannot be acted on: %s", message.id, via, reason)
        return inserted

    async def _insert(self, message: NewMessage) -> bool:
        self.queue.check_accepting()
        inserted = await self.queue.insert(message)
        if inserted:
            self.wake()
        return inserted
