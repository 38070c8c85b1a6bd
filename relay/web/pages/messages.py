"""The message list (the API's search as a form), one message, and the actions on it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from relay.queue.admin import MESSAGE_ACTIONS
from relay.queue.base import QueueActionError
from relay.web import views
from relay.web.auth import Principal
from relay.web.context import CONTEXT
from relay.web.pages.forms import KIND_CHOICES, STATE_CHOICES, FormError, message_query
from relay.web.pages.guard import page, safe_next
from relay.web.pages.render import render

DONE = {
    "retry": "Queued again: it will be tried now.",
    "hold": "Held: no attempts until it is released.",
    "release": "Released: it is queued again.",
    "delete": "Deleted.",
}
FILTERS = ("state", "kind", "sender", "recipient", "subject", "upstream", "since", "until")


@page()
async def message_list(request: web.Request, principal: Principal) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    form = {k: request.query.get(k, "") for k in FILTERS}
    error: FormError | None = None
    result: dict[str, Any] = {"messages": [], "next_cursor": None}
    try:
        query = message_query(request.query)
    except FormError as exc:
        error = exc
    else:
        result = await views.message_page(ctx, query)
    filled = {k: v for k, v in form.items() if v}
    older = (
        "/messages?" + urlencode({**filled, "before": result["next_cursor"]})
        if result["next_cursor"]
        else None
    )
    return render(
        request,
        "messages.html",
        {
            "form": form,
            "states": STATE_CHOICES,
            "kinds": KIND_CHOICES,
            "upstreams": [u.name for u in ctx.config.upstream],
            "messages": result["messages"],
            "older": older,
            "paged": bool(request.query.get("before")),
            "newest": "/messages?" + urlencode(filled) if filled else "/messages",
            "error": error,
            "done": DONE.get(request.query.get("done", "")),
        },
        status=400 if error else 200,
        section="messages",
    )


async def _message(
    request: web.Request, msg_id: str, *, error: str = "", status: int = 200
) -> web.StreamResponse:
    detail = await views.message_detail(request.app[CONTEXT], msg_id)
    if detail is None:
        return render(
            request,
            "not_found.html",
            {"what": f"No message {msg_id} in the queue (never stored, deleted or purged)."},
            status=404,
            section="messages",
        )
    return render(
        request,
        "message.html",
        {
            "m": detail,
            "done": DONE.get(request.query.get("done", "")),
            "error": error,
            "back": safe_next(request.query.get("back")) if "back" in request.query else "",
        },
        status=status,
        section="inbound" if detail["kind"] == "inbound" else "messages",
    )


@page()
async def message_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    return await _message(request, request.match_info["id"])


@page("admin")
async def message_action(request: web.Request, principal: Principal) -> web.StreamResponse:
    """Retry, hold, release or delete, as the logged-in operator (on the timeline)."""
    msg_id = request.match_info["id"]
    action = next((a for a in MESSAGE_ACTIONS if a == request.match_info["action"]), None)
    if action is None:
        raise web.HTTPNotFound()
    form = await request.post()
    back = form.get("back")
    try:
        await request.app[CONTEXT].admin.act(msg_id, action, actor=principal.actor)
    except QueueActionError as exc:
        return await _message(request, msg_id, error=f"Not done: {exc}.", status=409)
    if isinstance(back, str) and back:
        target = safe_next(back)
        raise web.HTTPSeeOther(f"{target}{'&' if '?' in target else '?'}done={action}")
    if action == "delete":
        raise web.HTTPSeeOther("/messages?done=delete")
    raise web.HTTPSeeOther(f"/messages/{msg_id}?done={action}")
