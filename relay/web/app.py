"""The relay's HTTP side: one aiohttp application for health, the admin page, the API,
/metrics, and the inbound and provider-event endpoints, each added by its own module.

`create_app` receives the parts it serves (`WebContext`), never the relay object: the web
side depends on the stages, not the other way round.
"""

from __future__ import annotations

from aiohttp import web

from relay.web import api, metrics, pages
from relay.web.auth import ACCESS_KEY, Access, authenticate
from relay.web.client_errors import quiet_client_errors
from relay.web.context import CONTEXT, WebContext


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[CONTEXT].readiness()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def create_app(context: WebContext) -> web.Application:
    quiet_client_errors()
    app = web.Application(middlewares=[authenticate])
    app[CONTEXT] = context
    app[ACCESS_KEY] = Access(context.config.web, clock=context.clock)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    api.setup(app)
    pages.setup(app)
    metrics.setup(app)
    inbound = context.inbound
    if inbound is not None and inbound.settings.sns is not None:
        from relay.web.inbound import setup

        setup(app, inbound, inbound.settings.sns)
    if context.events is not None and context.provider_hooks is not None:
        from relay.web import webhooks

        webhooks.setup(
            app,
            hooks=context.provider_hooks,
            service=context.events,
            max_body=int(context.config.events.max_body),
            concurrency=context.config.events.concurrency,
        )
    return app
