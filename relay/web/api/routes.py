"""The JSON API under /api/v1: submit, search, read, act, and watch the upstreams.

Roles (`relay.web.auth.require`): `read` for every GET, `submit` for POST /messages only,
`admin` for everything, including the stored bytes and every action. Each action goes
through `QueueAdmin` with the token as the actor, so the message's timeline says who did
it. Every error is JSON `{"error", "message", "field"?}`; the OpenAPI document
(`relay.web.api.openapi`) describes each route listed in ROUTES and the tests hold the
server to it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from relay.queue.admin import MessageAction
from relay.queue.base import QueueActionError, StoreError
from relay.web import views
from relay.web.api.compose import SubmitError, invalid
from relay.web.api.inputs import (
    MESSAGE_ID,
    SMALL_BODY,
    error_response,
    is_json,
    json_object,
    message_query,
    parse_json,
    read_body,
    single_params,
)
from relay.web.api.openapi import document
from relay.web.api.submit import Origin, count_submission, submit_json, submit_raw
from relay.web.api.suppressions import add_suppression, list_suppressions, remove_suppression
from relay.web.auth import Need, require
from relay.web.context import CONTEXT, WebContext
from relay.web.errors import http_error, json_error

log = logging.getLogger("relay.web.api")

PREFIX = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# JSON carries attachments in base64 (4/3 of their size) beside the text: room for both.
JSON_OVERHEAD = 1.4
BULK_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # below PREFIX
    handler: Handler
    need: Need | None  # None: open to anyone (the index and the OpenAPI document)
    summary: str


def _ctx(request: web.Request) -> WebContext:
    return request.app[CONTEXT]


def _origin(request: web.Request) -> Origin:
    return Origin(client=request.remote or "unknown", tls=request.secure, via="api")


def _message_id(request: web.Request) -> str:
    msg_id = request.match_info["id"]
    if not MESSAGE_ID.fullmatch(msg_id):
        raise http_error(404, "not_found", f"no message {msg_id!r}: ids are 20 letters and digits")
    return msg_id


def _not_found(msg_id: str) -> web.HTTPException:
    return http_error(404, "not_found", f"no message {msg_id} in the queue (deleted or purged?)")


# -- index and document ------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "name": "relay",
            "version": _version(),
            "api": "v1",
            "openapi": f"{PREFIX}/openapi.json",
            "endpoints": [
                {
                    "method": r.method,
                    "path": PREFIX + r.path,
                    "role": r.need or "none",
                    "summary": r.summary,
                }
                for r in ROUTES
            ],
        }
    )


def _version() -> str:
    try:
        return version("relay")
    except PackageNotFoundError:
        return "unknown"


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(_version()))


# -- submitting ----------------------------------------------------------------------------


async def post_message(request: web.Request) -> web.Response:
    principal = require(request, "submit")
    ctx = _ctx(request)
    key = request.headers.get("Idempotency-Key")
    origin = _origin(request)
    try:
        if request.content_type == "message/rfc822":
            mail_from, rcpts, data = await _raw_request(request, ctx)
        else:
            payload = await _json_request(request, ctx)
    except SubmitError as exc:
        # Refused before submit_json/submit_raw, which log their own refusals.
        log.warning(
            "API: refused a message from %s (token %s): %s %s",
            origin.client,
            principal.name,
            exc.status,
            exc.message,
        )
        count_submission(ctx, "api", exc)
        return error_response(exc)
    try:
        if request.content_type == "message/rfc822":
            msg_id, created = await submit_raw(
                ctx,
                principal,
                data,
                mail_from=mail_from,
                rcpts=rcpts,
                idempotency_key=key,
                origin=origin,
            )
        else:
            msg_id, created = await submit_json(
                ctx, principal, payload, idempotency_key=key, origin=origin
            )
    except SubmitError as exc:
        count_submission(ctx, "api", exc)
        return error_response(exc)
    if created:
        count_submission(ctx, "api", None)
    return web.json_response({"id": msg_id, "created": created}, status=202 if created else 200)


async def _raw_request(request: web.Request, ctx: WebContext) -> tuple[str, list[str], bytes]:
    """The envelope (query) and bytes of a message/rfc822 submission."""
    params = request.query
    unknown = sorted(set(params) - {"from", "to"})
    if unknown:
        raise invalid(unknown[0], "unknown parameter; a raw message takes from and to")
    if "from" not in params:
        raise invalid("from", "give the envelope sender as ?from= (?from=<> for none)")
    if len(params.getall("from")) > 1:
        raise invalid("from", "given more than once")
    limit = int(ctx.config.smtp.max_message_size) + SMALL_BODY
    data = await read_body(request, limit=limit)
    return params["from"], params.getall("to", []), data


async def _json_request(request: web.Request, ctx: WebContext) -> Any:
    if not is_json(request):
        raise SubmitError(
            415,
            "unsupported_media_type",
            "send JSON (Content-Type: application/json) or a whole message"
            " (Content-Type: message/rfc822 with ?from=&to= for the envelope)",
            None,
        )
    if request.query:
        name = sorted(request.query)[0]
        raise invalid(name, "a JSON submission takes no query parameters")
    limit = int(int(ctx.config.smtp.max_message_size) * JSON_OVERHEAD) + SMALL_BODY
    return parse_json(await read_body(request, limit=limit))


# -- reading -------------------------------------------------------------------------------


async def list_messages(request: web.Request) -> web.Response:
    require(request, "read")
    query = message_query(single_params(request))
    return web.json_response(await views.message_page(_ctx(request), query))


async def get_message(request: web.Request) -> web.Response:
    require(request, "read")
    msg_id = _message_id(request)
    detail = await views.message_detail(_ctx(request), msg_id)
    if detail is None:
        raise _not_found(msg_id)
    return web.json_response(detail)


async def get_events(request: web.Request) -> web.Response:
    require(request, "read")
    msg_id = _message_id(request)
    ctx = _ctx(request)
    if await ctx.queue.get(msg_id) is None:
        raise _not_found(msg_id)
    return web.json_response({"id": msg_id, "events": await ctx.queue.timeline(msg_id)})


async def get_raw(request: web.Request) -> web.Response:
    require(request, "admin")
    msg_id = _message_id(request)
    ctx = _ctx(request)
    if await ctx.queue.get(msg_id) is None:
        raise _not_found(msg_id)
    data = await ctx.queue.body(msg_id)
    if data is None:
        return json_error(
            410,
            "body_gone",
            f"message {msg_id} no longer has its bytes: they are dropped once it is sent",
        )
    return web.Response(body=data, content_type="message/rfc822")


async def list_upstreams(request: web.Request) -> web.Response:
    require(request, "read")
    return web.json_response({"upstreams": await views.upstream_rows(_ctx(request))})


async def get_stats(request: web.Request) -> web.Response:
    require(request, "read")
    params = single_params(request)
    unknown = sorted(set(params) - {"window"})
    window = params.get("window", "1h")
    if unknown:
        raise invalid(unknown[0], "unknown parameter; stats takes window")
    if window not in views.WINDOWS:
        raise invalid("window", f"must be one of {', '.join(views.WINDOWS)}")
    return web.json_response(await views.stats(_ctx(request), window))


# -- acting (admin) ------------------------------------------------------------------------


async def _act(request: web.Request, action: MessageAction) -> web.Response:
    principal = require(request, "admin")
    msg_id = _message_id(request)
    ctx = _ctx(request)
    if await ctx.queue.get(msg_id) is None:
        raise _not_found(msg_id)
    try:
        probing = await ctx.admin.act(msg_id, action, actor=principal.actor)
    except QueueActionError as exc:
        raise http_error(409, "conflict", str(exc)) from None
    row = await ctx.queue.get(msg_id)
    return web.json_response(
        {
            "id": msg_id,
            "action": action,
            "state": None if row is None else row.state,
            "deleted": row is None,
            "probing": probing,
        }
    )


async def retry_message(request: web.Request) -> web.Response:
    return await _act(request, "retry")


async def hold_message(request: web.Request) -> web.Response:
    return await _act(request, "hold")


async def release_message(request: web.Request) -> web.Response:
    return await _act(request, "release")


async def delete_message(request: web.Request) -> web.Response:
    return await _act(request, "delete")


async def flush_queue(request: web.Request) -> web.Response:
    principal = require(request, "admin")
    ids, probing = await _ctx(request).admin.flush(actor=principal.actor)
    return web.json_response({"flushed": ids, "count": len(ids), "probing": probing})


async def retry_matching(request: web.Request) -> web.Response:
    """Retry every message matching a filter (default: the failed ones), each recorded
    on its own timeline; at most `limit` (≤ 1000) per call, `more` says if others match."""
    principal = require(request, "admin")
    ctx = _ctx(request)
    payload = await json_object(request, limit=SMALL_BODY, empty_ok=True)
    if "before" in payload:
        raise invalid("before", "a bulk retry has no cursor; narrow it with since/until")
    limit = payload.pop("limit", BULK_LIMIT)
    query = message_query({"state": "failed", **payload, "limit": limit}, max_limit=BULK_LIMIT)
    if query.state not in ("failed", "deferred", "held"):
        raise invalid("state", "retry takes failed, deferred or held messages")
    rows = await ctx.queue.find(query)
    retried: list[str] = []
    skipped: dict[str, str] = {}
    probing: set[str] = set()
    for row in rows:
        try:
            probing.update(await ctx.admin.retry(row.id, actor=principal.actor))
            retried.append(row.id)
        except QueueActionError as exc:
            skipped[row.id] = str(exc)
    more = bool(rows) and len(rows) == query.limit
    log.info(
        "bulk retry by %s: %d queued again, %d skipped", principal.actor, len(retried), len(skipped)
    )
    return web.json_response(
        {
            "retried": retried,
            "count": len(retried),
            "skipped": skipped,
            "more": more,
            "probing": sorted(probing),
        }
    )


async def _upstream_action(request: web.Request, action: str) -> web.Response:
    principal = require(request, "admin")
    ctx = _ctx(request)
    name = request.match_info["name"]
    if name not in {u.name for u in ctx.config.upstream}:
        raise http_error(
            404,
            "not_found",
            f"no upstream named {name!r}; the upstreams are"
            f" {', '.join(u.name for u in ctx.config.upstream) or '(none)'}",
        )
    await ctx.admin.upstream_action(
        name,
        "pause" if action == "pause" else "resume",
        actor=principal.actor,
        cooldown=ctx.config.routing.cooldown,
    )
    rows = await views.upstream_rows(ctx)
    return web.json_response({"upstream": next(r for r in rows if r["name"] == name)})


async def pause_upstream(request: web.Request) -> web.Response:
    return await _upstream_action(request, "pause")


async def resume_upstream(request: web.Request) -> web.Response:
    return await _upstream_action(request, "resume")


ROUTES: tuple[Route, ...] = (
    Route("GET", "", index, None, "The API's version and endpoints"),
    Route("GET", "/openapi.json", openapi, None, "This API's OpenAPI 3 document"),
    Route("POST", "/messages", post_message, "submit", "Submit a message (JSON or message/rfc822)"),
    Route("GET", "/messages", list_messages, "read", "Search messages, newest first"),
    Route(
        "POST", "/messages/retry", retry_matching, "admin", "Retry the messages a filter matches"
    ),
    Route("GET", "/messages/{id}", get_message, "read", "One message and its recipients"),
    Route("DELETE", "/messages/{id}", delete_message, "admin", "Delete a message"),
    Route("GET", "/messages/{id}/events", get_events, "read", "A message's timeline"),
    Route("GET", "/messages/{id}/raw", get_raw, "admin", "A message's stored bytes"),
    Route("POST", "/messages/{id}/retry", retry_message, "admin", "Make a message due now"),
    Route("POST", "/messages/{id}/hold", hold_message, "admin", "Hold a queued message"),
    Route("POST", "/messages/{id}/release", release_message, "admin", "Release a held message"),
    Route("POST", "/queue/flush", flush_queue, "admin", "Make every deferred message due now"),
    Route("GET", "/upstreams", list_upstreams, "read", "Upstreams with health and rates"),
    Route("POST", "/upstreams/{name}/pause", pause_upstream, "admin", "Pause an upstream"),
    Route("POST", "/upstreams/{name}/resume", resume_upstream, "admin", "Resume an upstream"),
    Route("GET", "/stats", get_stats, "read", "Counts, throughput and latency over a window"),
    Route("GET", "/suppressions", list_suppressions, "read", "The suppression list, by address"),
    Route("POST", "/suppressions", add_suppression, "admin", "Suppress an address"),
    Route(
        "DELETE",
        "/suppressions/{address}",
        remove_suppression,
        "admin",
        "Lift an address's suppression",
    ),
)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /api/: every error is JSON (a SubmitError raised at any depth is its 4xx), and
    a failure inside is a logged 500 or, when the queue cannot be read, a 503 to retry,
    never a traceback."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        reason = exc.reason if exc.status != 405 else f"{request.method} is not allowed here"
        response = json_error(exc.status, _code(exc.status), reason)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except SubmitError as exc:
        return error_response(exc)
    except StoreError as exc:
        log.error("API: %s %s: the queue failed: %s", request.method, request.path, exc)
        response = json_error(503, "queue_unavailable", f"the queue cannot answer now: {exc}")
        response.headers["Retry-After"] = "10"
        return response
    except Exception:
        log.exception("API: %s %s failed", request.method, request.path)
        return json_error(500, "internal", "the relay failed to answer; its log says why")


def _code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        status, "bad_request" if status < 500 else "internal"
    )


def setup(app: web.Application) -> None:
    """Add the API's routes, and its JSON-errors middleware, to the relay's web app."""
    app.middlewares.append(api_errors)
    for route in ROUTES:
        app.router.add_route(route.method, PREFIX + route.path, route.handler)
