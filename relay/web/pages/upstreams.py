"""The upstreams: routing state and rates as every process reports them, pause and resume."""

from __future__ import annotations

from aiohttp import web

from relay.web import views
from relay.web.auth import Principal
from relay.web.context import CONTEXT
from relay.web.pages.guard import page
from relay.web.pages.render import render

DONE = {
    "pause": (
        "Paused: it takes no new attempts until resumed (running relays follow within a second)."
    ),
    "resume": "Resumed: it takes attempts again.",
}


@page()
async def upstream_list(request: web.Request, principal: Principal) -> web.StreamResponse:
    rows = await views.upstream_rows(request.app[CONTEXT])
    done = DONE.get(request.query.get("done", ""))
    name = request.query.get("name", "")
    return render(
        request,
        "upstreams.html",
        {"rows": rows, "done": f"{name}: {done}" if done and name else ""},
        section="upstreams",
    )


@page("admin")
async def upstream_action(request: web.Request, principal: Principal) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in ("pause", "resume") or name not in {u.name for u in ctx.config.upstream}:
        raise web.HTTPNotFound()
    await ctx.admin.upstream_action(
        name,
        "pause" if action == "pause" else "resume",
        actor=principal.actor,
        cooldown=ctx.config.routing.cooldown,
    )
    raise web.HTTPSeeOther(f"/upstreams?done={action}&name={name}")
