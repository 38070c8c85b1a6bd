"""Logging in with a token, and out.

The login form has its own CSRF token (a cookie of the login path repeated in the form),
so another site cannot log a browser in as someone else. Failed attempts count against
the client address (`Access.refuse`), and past the limit the form answers 429 before it
looks at the token at all.
"""

from __future__ import annotations

import re
import secrets

from aiohttp import web

from relay.web.auth import (
    ACCESS_KEY,
    CSRF_FIELD,
    NO_TOKENS,
    PRINCIPAL,
    SESSION_COOKIE,
    same_text,
)
from relay.web.context import CONTEXT
from relay.web.pages.guard import safe_next
from relay.web.pages.render import render

LOGIN_COOKIE = "relay_login"
# What `secrets.token_urlsafe(24)` makes: a login cookie of any other shape is not ours.
FORM_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")


def _secure(request: web.Request) -> bool:
    return bool(request.app[CONTEXT].config.web.tls_cert)


def _form(
    request: web.Request, *, target: str, error: str = "", notice: str = "", status: int = 200
) -> web.Response:
    access = request.app[ACCESS_KEY]
    # One token per browser (kept while its cookie lasts), so two open login tabs work.
    kept = request.cookies.get(LOGIN_COOKIE, "")
    form_token = kept if FORM_TOKEN.fullmatch(kept) else secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {
            "configured": access.configured,
            "no_tokens": NO_TOKENS,
            "next": target,
            "login_csrf": form_token,
            "error": error,
            "notice": notice,
        },
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        form_token,
        path="/login",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        max_age=3600,
    )
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    target = safe_next(request.query.get("next"))
    principal = request[PRINCIPAL]
    if principal is not None and principal.can("read"):
        raise web.HTTPSeeOther(target)
    notice = "You are logged out." if "out" in request.query else ""
    status = 200 if request.app[ACCESS_KEY].configured else 403
    return _form(request, target=target, notice=notice, status=status)


async def login(request: web.Request) -> web.StreamResponse:
    access = request.app[ACCESS_KEY]
    form = await request.post()
    target = safe_next(_text(form.get("next")))
    if not access.configured:
        return _form(request, target=target, status=403)
    limited = access.limited(request)
    if limited is not None:
        wait = limited.headers["Retry-After"]
        response = _form(
            request,
            target=target,
            error=f"Too many failed logins from this address. Try again in {wait} s.",
            status=429,
        )
        response.headers["Retry-After"] = wait
        return response
    presented = _text(form.get(CSRF_FIELD))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not same_text(presented, expected):
        return _form(
            request,
            target=target,
            error="The login form had expired. Enter the token again.",
            status=403,
        )
    principal = access.by_token(_text(form.get("token")).strip())
    if principal is None:
        access.refuse(request, "a token that is not one of [[web.tokens]] on the login form")
        return _form(
            request,
            target=target,
            error="That token is not one of the relay's [[web.tokens]]. Check it and try again.",
            status=401,
        )
    if not principal.can("read"):
        return _form(
            request,
            target=target,
            error=(
                f"The token {principal.name!r} has the role {principal.role!r}, which sends"
                " mail through the API but cannot see these pages. Log in with a 'read' or"
                " 'admin' token."
            ),
            status=403,
        )
    cookie, _ = access.issue(principal)
    response = web.HTTPSeeOther(target)
    access.set_cookie(response, cookie, secure=_secure(request))
    response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """Forget the session cookie. (The middleware has already checked the form's CSRF
    token when the cookie was valid.)"""
    response = web.HTTPSeeOther("/login?out=1")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
