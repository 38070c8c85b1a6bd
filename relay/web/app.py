"""The relay's HTTP side: one aiohttp application (health now; admin, API, webhooks and
inbound endpoints are added by their own modules through `create_app`).

`create_app` receives the parts it serves (a readiness check, the inbound service), never
the relay object: the web side depends on the stages, not the other way round.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from relay.web.client_errors import quiet_client_errors

if TYPE_CHECKING:
    from relay.inbound.service import InboundService

Readiness = Callable[[], Awaitable[list[str]]]
READINESS_KEY: web.AppKey[Readiness] = web.AppKey("readiness")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[READINESS_KEY]()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def create_app(*, readiness: Readiness, inbound: InboundService | None = None) -> web.Application:
    quiet_client_errors()
    app = web.Application()
    app[READINESS_KEY] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if inbound is not None and inbound.settings.sns is not None:
        from relay.web.inbound import setup

        setup(app, inbound, inbound.settings.sns)
    return app
