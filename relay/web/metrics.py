"""GET /metrics for Prometheus, with the access `[web] metrics` sets.

- `loopback` (the default): a Prometheus on the same host scrapes without a token; any
  other client needs a token with the read role (as a bearer header).
- `token`: a read (or admin) token always, from loopback too.
- `open`: anyone who can reach the listener.

The counters and histograms are those of every worker process of this relay
(`relay.telemetry.prom`); the gauges are read from the shared queue and routing state at
each scrape (`relay.telemetry.exposition`), so every worker and host shows the same.
"""

from __future__ import annotations

import ipaddress
import itertools

from aiohttp import web

from relay.message import WAITING
from relay.telemetry.exposition import QueueFigures, gauges, render
from relay.web.auth import require
from relay.web.context import CONTEXT, WebContext


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    access = ctx.config.web.metrics
    if access == "token" or (access == "loopback" and not is_loopback(request.remote)):
        require(request, "read")
    now = ctx.clock()
    queue = QueueFigures(
        counts=await ctx.queue.counts(),
        oldest=await ctx.queue.oldest(states=WAITING),
        webhooks=await _webhooks(ctx),
    )
    shares = await ctx.admin.upstreams()
    measured = gauges(
        queue=queue,
        upstreams=[u.name for u in ctx.config.upstream],
        shares=shares,
        now=now,
        half_life=ctx.config.routing.health_half_life,
    )
    counted = ctx.telemetry.collect() if ctx.telemetry is not None else ()
    body, content_type = render(
        itertools.chain(counted, measured), request.headers.get("Accept", "")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)


async def _webhooks(ctx: WebContext) -> dict[str, dict[str, int]] | None:
    """Each hook's outbox counts: every configured hook (0 when it has none) and any other
    with events left (one removed from the config); None without hooks at all."""
    pending = await ctx.queue.outbox.pending()
    if not ctx.config.webhook and not pending:
        return None
    counts: dict[str, dict[str, int]] = {hook.label: {} for hook in ctx.config.webhook}
    counts.update(pending)
    return {hook: dict(found) for hook, found in counts.items()}
