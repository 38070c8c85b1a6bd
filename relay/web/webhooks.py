"""POST /webhooks/<upstream>: the providers' event webhooks (delivered, bounced, ...).

One path per upstream with `events = true`, so two accounts of one provider each keep
their own keys. Nothing in a body is trusted before the upstream type's module
(relay.events.<type>) has verified it (DESIGN.md invariant 6): an unverifiable request
gets 401/403 and changes nothing; a malformed one 400. A verified request's events are
recorded and acted on (relay.events.service) before the 200, so a provider that gets no
answer sends them again, and the repeat adds nothing. A verified event for a message the
relay does not know still gets 200 (counted), or the provider would retry it for days.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relay.events.base import ProviderWebhook, WebhookContext, WebhookError, WebhookRequest
from relay.events.registry import ProviderHooks
from relay.events.service import EventService
from relay.queue.base import QueueBusy, StoreError
from relay.web.bodies import read_body
from relay.web.errors import json_error

log = logging.getLogger("relay.web")

HOOKS_KEY: web.AppKey[ProviderHooks] = web.AppKey("provider_webhooks")
TURNS_KEY: web.AppKey[asyncio.Semaphore] = web.AppKey("webhook_turns")
SERVICE_KEY: web.AppKey[EventService] = web.AppKey("event_service")
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("webhook_max_body")

_CODES = {400: "malformed", 401: "unauthenticated", 403: "forbidden", 503: "unavailable"}


def setup(
    app: web.Application,
    *,
    hooks: ProviderHooks,
    service: EventService,
    max_body: int,
    concurrency: int,
) -> None:
    """Add the endpoint. `hooks` holds the upstreams that take events now: a reload may
    change them (relay.reload), so an upstream is looked up per request."""
    app[HOOKS_KEY] = hooks
    app[SERVICE_KEY] = service
    app[MAX_BODY_KEY] = max_body
    app[TURNS_KEY] = asyncio.Semaphore(concurrency)
    app.router.add_post("/webhooks/{upstream}", provider_webhook)


async def provider_webhook(request: web.Request) -> web.Response:
    name = request.match_info["upstream"]
    hook = request.app[HOOKS_KEY].get(name)
    if hook is None:
        log.warning("webhook post from %s for %r refused: no such upstream", request.remote, name)
        return json_error(
            404,
            "not_found",
            f"no upstream named {name!r} takes events here: point the provider at"
            " /webhooks/<upstream name>, with events = true on that upstream",
        )
    limit = request.app[MAX_BODY_KEY]
    try:
        body = await read_body(request, limit)
    except ConnectionError as exc:
        log.info(
            "webhook post from %s for %s: connection lost mid-body (%s)", request.remote, name, exc
        )
        return json_error(400, "incomplete", "the connection was lost before the body was read")
    if body is None:
        log.warning(
            "webhook post from %s for %s refused: over %d bytes", request.remote, name, limit
        )
        return json_error(413, "too_large", f"webhook bodies are at most {limit} bytes here")
    incoming = WebhookRequest(
        headers=request.headers, body=body, query=request.query, remote=request.remote
    )
    # Verifying and recording take turns (`[events] concurrency`): the rest of the
    # process (SMTP sessions, dispatch) keeps its share of the CPU under a flood.
    async with request.app[TURNS_KEY]:
        return await _verified(request, name, hook, incoming)


async def _verified(
    request: web.Request, name: str, hook: ProviderWebhook, incoming: WebhookRequest
) -> web.Response:
    try:
        result = await hook.handle(incoming)
    except WebhookError as exc:
        log.warning(
            "webhook post from %s for %s refused (%d): %s",
            request.remote,
            name,
            exc.status,
            exc.reason,
        )
        return json_error(exc.status, _CODES.get(exc.status, "error"), exc.reason)
    if result.answer is not None:
        return web.json_response(result.answer)
    try:
        applied = await request.app[SERVICE_KEY].apply(name, result.events)
    except StoreError as exc:
        if result.nonce is not None:
            await _give_back(request.app[HOOKS_KEY].context, result.nonce)
        if isinstance(exc, QueueBusy):
            response = json_error(503, "busy", f"{exc}; send it again shortly")
            response.headers["Retry-After"] = "5"
            return response
        log.error("webhook events from %s not recorded: %s", name, exc)
        response = json_error(503, "queue_unavailable", "the queue could not record the events")
        response.headers["Retry-After"] = "10"
        return response
    return web.json_response({"status": "ok", **applied.as_dict()})


async def _give_back(context: WebhookContext, nonce: str) -> None:
    """Give the request's replay-guard key back, for the provider's retry of the same
    signed request (best effort: a queue that could not record the events may not take
    this either, and then the retry is refused as a replay until the key expires)."""
    if context.forget_use is None:
        return
    try:
        await context.forget_use(nonce)
    except StoreError as exc:
        log.warning("webhook replay key %s not given back: %s", nonce, exc)
