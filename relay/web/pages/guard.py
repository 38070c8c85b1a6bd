"""Who may see a page: a session (or bearer) with a role that reads, and admin to act.

A page asked for without a session sends the browser to the login form, which brings it
back afterwards; a caller who is known but lacks the role gets a page saying which role
it has and which one this needs (an HTML page, since a person reads it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from relay.web.auth import ACCESS_KEY, GRANTS, PRINCIPAL, Need, Principal
from relay.web.pages.render import render

# Control characters (a browser drops some, a header cannot carry others) and backslashes.
UNSAFE_TARGET = re.compile(r"[\x00-\x1f\x7f\\]")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PageHandler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (never `//host` or a
    full URL, which would make the login form an open redirect). Browsers drop tabs and
    line breaks from a URL and read a backslash as a slash, so `/<tab>/host` and `/\\host`
    are `//host`: a target with any control character or backslash is refused whole
    (a path this server writes has them percent-encoded)."""
    if not target or not target.startswith("/") or UNSAFE_TARGET.search(target):
        return "/"
    if target.startswith("//"):
        return "/"
    if target.startswith(("/login", "/logout")):
        return "/"
    return target


def to_login(request: web.Request) -> web.Response:
    target = request.path_qs if request.method == "GET" else "/"
    location = "/login" if target == "/" else f"/login?next={quote(target, safe='/')}"
    raise web.HTTPSeeOther(location)


def refused(request: web.Request, principal: Principal, need: Need) -> web.Response:
    roles = " or ".join(sorted(GRANTS[need]))
    if principal.can("submit") and not principal.can("read"):
        hint = (
            "Tokens with the role 'submit' send mail through the API"
            " (POST /api/v1/messages) and cannot read the status page."
        )
    else:
        hint = "Ask whoever runs the relay for a token with that role."
    return render(
        request,
        "refused.html",
        {"name": principal.name, "role": principal.role, "roles": roles, "hint": hint},
        status=403,
    )


def page(need: Need = "read") -> Callable[[PageHandler], Handler]:
    """A page handler, called with the principal once it may see (`read`) or act (`admin`)."""

    def wrap(handler: PageHandler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not request.app[ACCESS_KEY].configured:
                raise web.HTTPSeeOther("/login")
            principal = request[PRINCIPAL]
            if principal is None:
                return to_login(request)
            wanted: Need
            for wanted in ("read", need):
                if not principal.can(wanted):
                    return refused(request, principal, wanted)
            return await handler(request, principal)

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap
