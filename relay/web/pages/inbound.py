"""Inbound work (SES notifications): the recent ones, and the failures to replay."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from relay.queue.base import MessageQuery
from relay.web import views
from relay.web.auth import Principal
from relay.web.context import CONTEXT
from relay.web.pages.forms import FormError, page_cursor
from relay.web.pages.guard import page
from relay.web.pages.render import render

DONE = {"retry": "Queued again: it will be fetched and delivered now."}


@page()
async def inbound_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    try:
        before = page_cursor(request.query.get("before", ""))
    except FormError:
        before = None  # a cursor that is not one: the first page
    recent = await views.message_page(ctx, MessageQuery(kind="inbound", before=before, limit=50))
    failed = await views.message_page(ctx, MessageQuery(kind="inbound", state="failed", limit=20))
    cursor = recent["next_cursor"]
    return render(
        request,
        "inbound.html",
        {
            "recent": recent["messages"],
            "failed": failed["messages"],
            "older": "/inbound?" + urlencode({"before": cursor}) if cursor else None,
            "configured": ctx.inbound is not None,
            "done": DONE.get(request.query.get("done", "")),
        },
        section="inbound",
    )
