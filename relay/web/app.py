"""The relay's HTTP side: one aiohttp application (health now; admin, API, webhooks and
inbound endpoints are added by their own modules through `create_app`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from relay.app import Relay

RELAY_KEY: web.AppKey[Relay] = web.AppKey("relay")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    problems = relay.readiness_problems()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def create_app(relay: Relay) -> web.Application:
    app = web.Application()
    app[RELAY_KEY] = relay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if relay.inbound is not None:
        relay.inbound.add_routes(app)
    return app
