"""Inbound from Amazon SES, wired into one relay process.

`Relay.start()` creates an `InboundService` when the config has `[inbound]`. It owns:

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
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay.dispatch.retry import RetryPolicy
from relay.dispatch.scheduler import Scheduler
from relay.inbound.decrypt import Decryptor
from relay.inbound.deliver import Destination, MaildirDestination, create_destination
from relay.inbound.fetch import S3Fetcher
from relay.inbound.notify import InboundWork
from relay.inbound.settings import InboundSettings, parse_inbound
from relay.inbound.sns import Fetcher, HTTPSFetcher
from relay.inbound.worker import UNUSABLE_KEY, InboundWorker
from relay.message import Envelope, Kind, new_message_id
from relay.spool import queries
from relay.spool.queries import NewMessage

if TYPE_CHECKING:
    from relay.app import Relay
    from relay.inbound.sqs import SQSConsumer

log = logging.getLogger("relay.inbound")

#: What SES publishes to a receipt rule's topic when the rule is created: not mail.
SES_SETUP_NOTIFICATION = "AMAZON_SES_SETUP_NOTIFICATION"


def is_ses_setup_notification(payload: str) -> bool:
    """Whether `payload` (raw, or wrapped in an SNS envelope) is SES's setup test, which
    is acknowledged and dropped rather than recorded as an unusable notification."""
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
            doc = json.loads(doc["Message"])
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("notificationType") == SES_SETUP_NOTIFICATION


class InboundService:
    """Inbound work for one relay process: see the module docstring."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.settings: InboundSettings = parse_inbound(relay.config.inbound, relay.config)
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
        relay, cfg = self.relay, self.relay.config
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
            spool=relay.spool,
            settings=self.settings,
            fetcher=self.fetcher,
            decryptor=self.decryptor,
            destinations=self.destinations,
            quarantines=self.quarantines,
            policy=RetryPolicy(schedule=tuple(cfg.retry.schedule), max_age=cfg.retry.max_age),
            owner=relay.owner,
            clock=relay.clock,
            on_finish=relay.notify_progress,
        )
        self.scheduler = Scheduler(
            relay.spool,
            worker,
            kind=Kind.INBOUND,
            owner=relay.owner,
            concurrency=self.settings.concurrency,
            lease_time=cfg.server.lease_time,
            clock=relay.clock,
        )
        if dispatch:
            self._run_task = asyncio.create_task(self.scheduler.run(), name="inbound-dispatch")
        if self.settings.sqs is not None:
            from relay.inbound.sqs import SQSConsumer

            self.sqs = SQSConsumer(self, self.settings.sqs, aws=self.settings.aws)
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

    def wake(self) -> None:
        """New or flushed work is due: don't wait for the scheduler's next poll."""
        if self.scheduler is not None:
            self.scheduler.wake()

    def add_routes(self, app: web.Application) -> None:
        """Register POST /inbound/sns (when [inbound.sns] is on) on the relay's web app."""
        if self.settings.sns is None:
            return
        from relay.web.inbound import setup

        setup(app, self, self.settings.sns)

    # -- recording work ------------------------------------------------------------------

    async def enqueue(self, work: InboundWork, *, via: str, extra: dict[str, Any]) -> bool:
        """Record `work` durably and wake the worker. False: the same stored message was
        already recorded (an SNS retry, an SQS redelivery, or both paths configured).

        Raises relay.spool.store.StoreError (StoreFull) when the queue can't take it: the
        caller must then not acknowledge the notification, so AWS delivers it again.
        """
        now = self.relay.clock()
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
        now = self.relay.clock()
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
        if inserted:
            log.warning("inbound %s via %s cannot be acted on: %s", message.id, via, reason)
        return inserted

    async def _insert(self, message: NewMessage) -> bool:
        spool = self.relay.spool
        spool.check_free_space()
        inserted: bool = await spool.write(lambda c: queries.insert(c, message))
        if inserted:
            self.wake()
        return inserted
