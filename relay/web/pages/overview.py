"""The overview: the whole relay at a glance, and the fragment it refreshes itself with."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.queue.base import MessageQuery
from relay.web import views
from relay.web.auth import Principal
from relay.web.context import CONTEXT
from relay.web.pages.charts import throughput_chart
from relay.web.pages.guard import page
from relay.web.pages.render import render

# The order states are shown in: the way a message moves.
STATES = ("queued", "sending", "deferred", "held", "sent", "failed")
REFRESH_SECONDS = 5
LATEST = 8


async def overview_data(request: web.Request) -> dict[str, Any]:
    ctx = request.app[CONTEXT]
    data = await views.overview(ctx)
    latest = await views.message_page(ctx, MessageQuery(limit=LATEST))
    counts = data["counts"]
    return {
        "data": data,
        "states": [(s, counts.get(s, 0)) for s in STATES],
        "waiting": sum(counts.get(s, 0) for s in ("queued", "sending", "deferred", "held")),
        "hour": throughput_chart(data["throughput_1h"], title="Messages in the last hour"),
        "day": throughput_chart(data["throughput_24h"], title="Messages in the last 24 hours"),
        "latest": latest["messages"],
        "refresh": REFRESH_SECONDS,
    }


@page()
async def overview_page(request: web.Request, principal: Principal) -> web.StreamResponse:
    return render(request, "overview.html", await overview_data(request), section="overview")


@page()
async def overview_live(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The live part of the overview alone, fetched every few seconds by relay.js."""
    return render(request, "overview_live.html", await overview_data(request))
