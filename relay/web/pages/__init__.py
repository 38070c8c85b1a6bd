"""The admin status page: server-rendered HTML (Jinja2), hand-written CSS and a few lines
of JS served from here (no CDN, no build step), charts drawn as SVG on the server.

Every page reads the same view models as the API (`relay.web.views`), so the two never
disagree; every action goes through `QueueAdmin` with the logged-in token as the actor.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from relay.web.pages import inbound, login, messages, overview, send, suppressions, upstreams
from relay.web.pages.render import setup_templates

STATIC = Path(__file__).parent / "static"


def setup(app: web.Application) -> None:
    setup_templates(app)
    r = app.router
    r.add_get("/login", login.login_form)
    r.add_post("/login", login.login)
    r.add_post("/logout", login.logout)
    r.add_get("/", overview.overview_page)
    r.add_get("/live/overview", overview.overview_live)
    r.add_get("/messages", messages.message_list)
    r.add_get("/messages/{id}", messages.message_page)
    r.add_post("/messages/{id}/{action}", messages.message_action)
    r.add_get("/upstreams", upstreams.upstream_list)
    r.add_post("/upstreams/{name}/{action}", upstreams.upstream_action)
    r.add_get("/inbound", inbound.inbound_page)
    r.add_get("/suppressions", suppressions.suppression_list)
    r.add_post("/suppressions", suppressions.suppression_add)
    r.add_post("/suppressions/remove", suppressions.suppression_remove)
    r.add_get("/send", send.send_form)
    r.add_post("/send", send.send)
    r.add_static("/static/", STATIC, name="static", append_version=False)
