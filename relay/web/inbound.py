"""POST /inbound/sns: Amazon SNS delivers SES (or S3 event) notifications here.

Order of business, so that nothing is trusted before it is verified (DESIGN.md invariant 6)
and nothing is acknowledged before it is durable (the inbound half of invariant 1):

1. read at most `[inbound.sns] max_body` bytes (413 beyond);
2. `SNSVerifier.verify()`: JSON shape (400), topic allowlist, certificate URL host, age and
   signature (403), certificate unavailable (503, so SNS retries);
3. SubscriptionConfirmation: visit the SubscribeURL (held to the same host rules);
   UnsubscribeConfirmation: acknowledged and ignored (re-subscribing is an operator's act);
4. Notification: every unit of work in it is written to the queue (group commit, fsync)
   and only then is 200 returned. A queue that can't take it gets 503: SNS retries later.

Errors are JSON `{"error": ..., "detail": ...}` without tracebacks. The verifier is made in
a `cleanup_ctx`, so its certificate cache lives as long as the app and is closed with it.

This endpoint is what puts the web port on the internet, where clients that reset mid-body
and garbage requests (scanners, fuzzers, TLS spoken to a plain port) are routine. Each is
one INFO or WARNING line with the client address: a client gone mid-body is handled here,
and aiohttp's own "Error handling request" tracebacks for requests its parser refuses are
turned into one line by `relay.web.client_errors`, which every relay web app installs.
Tracebacks remain for what is not the client's doing (a bug in a handler).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from relay.inbound.notify import NotificationError, is_ses_setup_notification, parse_notification
from relay.inbound.sns import HTTPSFetcher, SNSError, SNSMessage, SNSVerifier
from relay.queue.base import StoreError, StoreFull
from relay.web.bodies import read_body

if TYPE_CHECKING:
    from relay.inbound.service import InboundService
    from relay.inbound.settings import SNSSettings

log = logging.getLogger("relay.web")

VERIFIER_KEY: web.AppKey[SNSVerifier] = web.AppKey("sns_verifier")
SERVICE_KEY: web.AppKey[InboundService] = web.AppKey("inbound_service")
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("sns_max_body")


def error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


_ERROR_NAMES = {400: "malformed", 403: "rejected", 503: "unavailable"}


def setup(app: web.Application, service: InboundService, settings: SNSSettings) -> None:
    """Add the endpoint and the verifier's lifetime to `app`."""
    app[SERVICE_KEY] = service
    app[MAX_BODY_KEY] = int(settings.max_body)

    async def verifier_ctx(app: web.Application) -> AsyncIterator[None]:
        async def fetch(url: str) -> bytes:
            # Looked up per call, so a fetcher swapped in after start (tests) is used.
            return await service.cert_fetcher(url)

        verifier = SNSVerifier(
            topics=settings.topics,
            fetcher=fetch,
            max_age=float(settings.max_age),
        )
        app[VERIFIER_KEY] = verifier
        yield
        await verifier.close()
        if isinstance(service.cert_fetcher, HTTPSFetcher):
            await service.cert_fetcher.close()  # its session lives as long as the web app

    app.cleanup_ctx.append(verifier_ctx)
    app.router.add_post("/inbound/sns", sns_endpoint)


async def sns_endpoint(request: web.Request) -> web.Response:
    limit = request.app[MAX_BODY_KEY]
    try:
        body = await read_body(request, limit)
    except ConnectionError as exc:
        log.info("sns post from %s: connection lost mid-body (%s)", request.remote, exc)
        return error(400, "incomplete", "the connection was lost before the body was read")
    if body is None:
        return error(413, "too_large", f"SNS messages are at most {limit} bytes here")
    try:
        msg = await request.app[VERIFIER_KEY].verify(body)
    except SNSError as exc:
        log.warning("sns post from %s refused (%d): %s", request.remote, exc.status, exc.reason)
        return error(exc.status, _ERROR_NAMES.get(exc.status, "error"), exc.reason)

    if msg.type == "SubscriptionConfirmation":
        try:
            await request.app[VERIFIER_KEY].confirm_subscription(msg)
        except SNSError as exc:
            log.warning("sns subscription to %s not confirmed: %s", msg.topic_arn, exc.reason)
            return error(exc.status, _ERROR_NAMES.get(exc.status, "error"), exc.reason)
        return web.json_response({"status": "confirmed", "topic": msg.topic_arn})
    if msg.type == "UnsubscribeConfirmation":
        log.info("sns unsubscribe confirmation for %s ignored", msg.topic_arn)
        return web.json_response({"status": "ignored", "topic": msg.topic_arn})
    return await _notification(request.app[SERVICE_KEY], msg)


async def _notification(service: InboundService, msg: SNSMessage) -> web.Response:
    extra = {"sns_message_id": msg.message_id, "topic": msg.topic_arn}
    try:
        try:
            works = parse_notification(msg.message)
        except NotificationError as exc:
            if is_ses_setup_notification(msg.message):
                log.info("ses setup notification on %s acknowledged", msg.topic_arn)
                return web.json_response({"status": "ignored"})
            # Authentic but useless (an SES rule without an S3 action, a bounce topic wired
            # here by mistake): a dead letter the operator can see, not an SNS retry loop.
            await service.enqueue_unusable(
                exc.reason, msg.message, via="sns", dedupe=msg.dedupe_key, extra=extra
            )
            return web.json_response({"status": "unusable", "detail": exc.reason})
        queued: list[bool] = []
        for work in works:
            queued.append(await service.enqueue(work, via="sns", extra=extra))
    except StoreFull as exc:
        return error(503, "queue_full", str(exc))
    except StoreError as exc:
        log.error("sns notification %s not recorded: %s", msg.message_id, exc)
        return error(503, "queue_unavailable", "the queue could not record the notification")
    return web.json_response(
        {"status": "queued", "queued": sum(queued), "duplicates": len(queued) - sum(queued)}
    )
