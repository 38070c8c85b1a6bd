"""The SQS consumer: the alternative to the SNS endpoint when the relay can't be reached
from the internet (the relay polls out; nothing polls in).

Each message's body is one of the shapes `relay.inbound.notify` understands: an SNS
envelope (SNS → SQS without raw delivery), a raw SES notification (raw delivery), or an S3
event notification (including the `s3:TestEvent`). For each message:

1. every unit of work in it is written to the local queue (fsynced group commit);
2. only then is the SQS message deleted. A crash between the two makes SQS redeliver it
   after the visibility timeout, and the queue's dedupe index drops the second copy.

While a batch is being recorded its visibility is extended, so a slow disk never lets
SQS hand the same messages to another consumer meanwhile.

Malformed bodies (not JSON, not a notification, an SES rule without an S3 action) are
recorded as failed inbound work with the reason and the body, then deleted: the operator
finds them with `relay queue list --state failed` (the relay's own dead letter, with the
same timeline as everything else), instead of SQS redelivering them until a redrive policy
gives up or, without one, forever. If the local queue can't record them either, they are
left in SQS.

boto3 blocks, so each long poll runs in its own daemon thread: shutdown does not wait up to
`wait_time` for an idle poll. A poll abandoned that way hands back anything it received
(visibility 0), so nothing waits out a visibility timeout needlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from relay.aws import aws_client
from relay.inbound import jsonlimits
from relay.inbound.notify import (
    NotificationError,
    WorkRecorder,
    is_ses_setup_notification,
    parse_notification,
)
from relay.queue.base import StoreError

if TYPE_CHECKING:
    from relay.inbound.settings import AWSSettings, SNSSettings, SQSSettings

log = logging.getLogger("relay.inbound")

T = TypeVar("T")

#: After a failed ReceiveMessage, wait this long (doubling up to the cap) before the next.
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0


class SQSConsumer:
    """Long-polls one SQS queue and feeds `recorder.enqueue()` (the InboundService's).

    `sns`, when configured, is the SNS endpoint's settings: an SNS envelope from a topic
    not in its allowlist is recorded as unusable, as the endpoint would refuse it.
    """

    def __init__(
        self,
        recorder: WorkRecorder,
        settings: SQSSettings,
        *,
        aws: AWSSettings,
        sns: SNSSettings | None,
        client: Any = None,
    ) -> None:
        self.recorder = recorder
        self.settings = settings
        self.aws = aws
        self.sns = sns
        self._client = client
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._abandoned = threading.Event()
        # Counters for tests and the status page.
        self.received = 0
        self.deleted = 0
        self.polls = 0
        self.batch_done = asyncio.Event()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = aws_client(
                "sqs",
                region=self.aws.region,
                endpoint_url=self.aws.endpoint_url,
                # A long poll holds the connection for wait_time: read past it.
                read_timeout=float(self.settings.wait_time) + 30,
                total_attempts=4,  # three retries
            )
        return self._client

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inbound-sqs")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop polling now; a batch being recorded gets `grace` seconds to finish (what it
        doesn't record stays in SQS and comes back)."""
        self._stop.set()
        self._abandoned.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_START
        log.info("sqs: polling %s", self.settings.queue_url)
        while not self._stop.is_set():
            poll = _in_daemon_thread(self._receive)
            stopper = asyncio.ensure_future(self._stop.wait())
            waiting: set[asyncio.Future[Any]] = {poll, stopper}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not poll.done():
                return  # stopping: the thread hands back what it receives (see _receive)
            try:
                messages = poll.result()
            except Exception as exc:
                log.warning(
                    "sqs: receive from %s failed: %s; retrying in %.0fs",
                    self.settings.queue_url,
                    exc,
                    backoff,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            self.polls += 1
            if messages:
                await self._handle_batch(messages)

    def _receive(self) -> list[dict[str, Any]]:
        """One long poll (in a thread). If the relay stopped waiting meanwhile, make what
        arrived visible again at once for the next consumer or the next start."""
        resp = self.client.receive_message(
            QueueUrl=self.settings.queue_url,
            MaxNumberOfMessages=self.settings.max_messages,
            WaitTimeSeconds=int(self.settings.wait_time),
            VisibilityTimeout=int(self.settings.visibility_timeout),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        messages: list[dict[str, Any]] = list(resp.get("Messages") or [])
        if messages and self._abandoned.is_set():
            self._change_visibility([m["ReceiptHandle"] for m in messages], 0)
            return []
        return messages

    async def _handle_batch(self, messages: list[dict[str, Any]]) -> None:
        self.received += len(messages)
        outstanding = {m["MessageId"]: m["ReceiptHandle"] for m in messages}
        keepalive = asyncio.create_task(self._keep_invisible(outstanding))
        try:
            for msg in messages:
                if await self._record(msg):
                    await self._delete(msg)
                outstanding.pop(msg["MessageId"], None)
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
            self.batch_done.set()

    async def _keep_invisible(self, outstanding: dict[str, str]) -> None:
        """Extend the visibility of messages not yet recorded, every half timeout."""
        timeout = int(self.settings.visibility_timeout)
        while True:
            await asyncio.sleep(max(timeout / 2, 0.5))
            handles = list(outstanding.values())
            if not handles:
                return
            log.info("sqs: recording is slow; extending visibility of %d message(s)", len(handles))
            try:
                await asyncio.to_thread(self._change_visibility, handles, timeout)
            except Exception as exc:
                log.warning("sqs: could not extend visibility: %s", exc)

    def _change_visibility(self, handles: list[str], timeout: int) -> None:
        for start in range(0, len(handles), 10):  # the batch API takes ten at a time
            entries = [
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": timeout}
                for i, h in enumerate(handles[start : start + 10])
            ]
            self.client.change_message_visibility_batch(
                QueueUrl=self.settings.queue_url, Entries=entries
            )

    async def _record(self, msg: dict[str, Any]) -> bool:
        """Record the message's work durably; True when the SQS message may be deleted."""
        sqs_id = str(msg.get("MessageId", ""))
        body = str(msg.get("Body", ""))
        extra: dict[str, Any] = {"sqs_message_id": sqs_id}
        count = (msg.get("Attributes") or {}).get("ApproximateReceiveCount")
        if count is not None:
            extra["sqs_receive_count"] = int(count)
        try:
            try:
                works = parse_notification(body)
            except NotificationError as exc:
                if is_ses_setup_notification(body):
                    log.info("sqs: ses setup notification %s acknowledged", sqs_id)
                    return True
                await self.recorder.enqueue_unusable(
                    exc.reason, body, via="sqs", dedupe=f"sqs:{sqs_id}", extra=extra
                )
                return True
            topic = _sns_topic(body)
            if topic is not None and self.sns is not None and topic not in self.sns.topics:
                await self.recorder.enqueue_unusable(
                    f"SNS topic {topic} is not in inbound.sns.topics",
                    body,
                    via="sqs",
                    dedupe=f"sqs:{sqs_id}",
                    extra=extra,
                )
                return True
            for work in works:
                await self.recorder.enqueue(work, via="sqs", extra=extra)
        except StoreError as exc:
            log.error("sqs: message %s not recorded, left in SQS for later: %s", sqs_id, exc)
            return False
        return True

    async def _delete(self, msg: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(
                self.client.delete_message,
                QueueUrl=self.settings.queue_url,
                ReceiptHandle=msg["ReceiptHandle"],
            )
        except Exception as exc:
            # Recorded already: SQS redelivers it later and the dedupe index drops it then.
            log.warning("sqs: could not delete message %s: %s", msg.get("MessageId"), exc)
            return
        self.deleted += 1


def _sns_topic(body: str) -> str | None:
    """The TopicArn when the body is an SNS envelope (SNS → SQS without raw delivery)."""
    try:
        doc = jsonlimits.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("Type") == "Notification":
        topic = doc.get("TopicArn")
        return topic if isinstance(topic, str) else ""
    return None


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run `fn` in a daemon thread: unlike asyncio.to_thread, an unfinished call does not
    hold up interpreter exit (a long poll can't be interrupted)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            result = fn()
        except Exception as exc:
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, result)
        with contextlib.suppress(RuntimeError):  # the loop closed: the relay is gone
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="relay-sqs-poll", daemon=True).start()
    return future
