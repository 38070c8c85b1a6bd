"""Who is asking, and may they: bearer tokens, page sessions, CSRF, failed-login limits.

Tokens come from `[[web.tokens]]` (env:/file: only). The API takes `Authorization: Bearer`;
the page logs in with a token once and then carries a session cookie: HttpOnly,
SameSite=Strict, Secure under TLS. The cookie is signed with a key derived from the
configured tokens, so every host with the same config accepts it and changing or removing
a token ends the sessions made with it. A session also carries a CSRF token that every
state-changing request made with the cookie must repeat (a form field or a header); a
bearer request carries no ambient credential and needs none.

Failures are counted per client address: past `LOGIN_FAILURES` in `LOGIN_WINDOW` seconds
the address gets 429 until the window passes. Each refusal is logged with its reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from relay.config import WebConfig, WebToken
from relay.web.errors import http_error, json_error

log = logging.getLogger("relay.web.auth")

Need = Literal["read", "submit", "admin"]
# Which roles may do what each need names.
GRANTS: dict[Need, frozenset[str]] = {
    "read": frozenset({"read", "admin"}),
    "submit": frozenset({"submit", "admin"}),
    "admin": frozenset({"admin"}),
}
SESSION_COOKIE = "relay_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
NO_TOKENS = (
    "no [[web.tokens]] are configured, so the page and the API are closed. Add one: run"
    " `relay token new`, put the token in the environment or a file, and add"
    ' [[web.tokens]] name = "ops", token = "env:RELAY_OPS_TOKEN", role = "admin"'
    " to the config"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the token's name (the actor on timelines) and role."""

    name: str
    role: str
    allowed_senders: tuple[str, ...]
    # True when it came from the page's session cookie (then CSRF applies).
    session: bool = False

    def can(self, need: Need) -> bool:
        return self.role in GRANTS[need]

    @property
    def actor(self) -> str:
        return f"web:{self.name}"


# Routes that never ask who is calling, passed on as they come: the health checks, and
# the SNS endpoint, which trusts the SNS signature alone (an Authorization header there
# is SNS's Basic credentials from the subscription URL, or a proxy's, not ours to judge,
# and a cookie there is not a session that could need CSRF).
UNAUTHENTICATED = frozenset({"/healthz", "/readyz", "/inbound/sns"})
# The providers' event webhooks: each verifies its provider's signature or credentials.
UNAUTHENTICATED_PREFIX = "/webhooks/"
PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("principal")
CSRF: web.RequestKey[str] = web.RequestKey("csrf")


class LoginLimiter:
    """Failed attempts per client address in a sliding window."""

    def __init__(self, *, failures: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW) -> None:
        self.failures = failures
        self.window = window
        self._seen: dict[str, deque[float]] = {}

    def retry_after(self, client: str, now: float) -> float:
        """0.0 when `client` may try; else the seconds until it may."""
        seen = self._seen.get(client)
        if not seen:
            return 0.0
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if not seen:
            del self._seen[client]
            return 0.0
        if len(seen) < self.failures:
            return 0.0
        return seen[0] + self.window - now

    def failed(self, client: str, now: float) -> None:
        if len(self._seen) > 10_000:  # a bound on memory under a spray of addresses
            self._seen.clear()
        self._seen.setdefault(client, deque()).append(now)


class Access:
    """The configured tokens, and the sessions signed with a key derived from them."""

    def __init__(self, settings: WebConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.limiter = LoginLimiter()
        self.replace(settings)

    def replace(self, settings: WebConfig) -> None:
        """The tokens of a reload, in force for the next request. The session key is
        derived from them, so sessions of a changed or removed token end here too."""
        self.settings = settings
        self._tokens: list[tuple[bytes, WebToken]] = [
            (hashlib.sha256(t.token.encode()).digest(), t) for t in settings.tokens
        ]
        material = b"\0".join(
            f"{t.name}\0{t.role}\0{t.token}".encode()
            for t in sorted(settings.tokens, key=lambda t: t.name)
        )
        self._key = hmac.new(b"relay web session v1", material, hashlib.sha256).digest()

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def by_token(self, presented: str) -> Principal | None:
        """The token's principal. Every configured token is compared, in constant time,
        so the time taken says nothing about which one (or how much of one) matched."""
        digest = hashlib.sha256(presented.encode(errors="surrogateescape")).digest()
        found: WebToken | None = None
        for stored, token in self._tokens:
            if hmac.compare_digest(stored, digest):
                found = token
        if found is None:
            return None
        return Principal(found.name, found.role, found.allowed_senders)

    def by_name(self, name: str, *, session: bool) -> Principal | None:
        for _, token in self._tokens:
            if token.name == name:
                return Principal(token.name, token.role, token.allowed_senders, session)
        return None

    # -- page sessions

    def issue(self, principal: Principal) -> tuple[str, str]:
        """(cookie value, CSRF token) for a new session of `principal`."""
        csrf = secrets.token_urlsafe(24)
        expires = int(self.clock() + self.settings.session_lifetime)
        payload = _b64(json.dumps({"n": principal.name, "e": expires, "c": csrf}).encode())
        return f"{payload}.{self._sign(payload)}", csrf

    def session(self, cookie: str) -> tuple[Principal, str] | None:
        """The principal and CSRF token of a valid, unexpired session cookie."""
        payload, _, signature = cookie.partition(".")
        if not signature or not same_text(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            name, expires, csrf = str(data["n"]), float(data["e"]), str(data["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < self.clock():
            return None
        principal = self.by_name(name, session=True)
        return None if principal is None else (principal, csrf)

    def set_cookie(self, response: web.StreamResponse, value: str, *, secure: bool) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=int(self.settings.session_lifetime),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=secure,
        )

    def _sign(self, payload: str) -> str:
        # A cookie is whatever the client sent: bytes that are not UTF-8 arrive as
        # surrogates, which must sign (and fail to match), not raise.
        data = payload.encode("utf-8", "surrogateescape")
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    # -- failures

    def refuse(self, request: web.Request, reason: str) -> None:
        """Count and log a failed login or a wrong bearer token from this client."""
        client = client_address(request)
        self.limiter.failed(client, self.clock())
        log.warning("web: refused %s %s from %s: %s", request.method, request.path, client, reason)

    def limited(self, request: web.Request) -> web.Response | None:
        """429 when the client has failed too often lately."""
        wait = self.limiter.retry_after(client_address(request), self.clock())
        if wait <= 0:
            return None
        log.warning(
            "web: %s is locked out for %.0f s after failed logins", client_address(request), wait
        )
        response = json_error(
            429,
            "too_many_failures",
            f"too many failed logins from this address; try again in {int(wait) + 1} s",
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response


def same_text(presented: str, expected: str) -> bool:
    """A constant-time comparison of a value the client sent (any text: a header, a form
    field, a cookie) with ours. compare_digest raises TypeError on str with non-ASCII
    characters, so both are compared as bytes."""
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


ACCESS_KEY: web.AppKey[Access] = web.AppKey("access")


@web.middleware
async def authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Find the caller (bearer token or session cookie); enforce CSRF on cookie writes.
    Whether the caller may do what it asks is each handler's `require`."""
    access = request.app[ACCESS_KEY]
    request[PRINCIPAL] = None
    request[CSRF] = ""
    if request.path in UNAUTHENTICATED or request.path.startswith(UNAUTHENTICATED_PREFIX):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return json_error(
                401, "unauthorized", "use 'Authorization: Bearer <token>'", bearer=True
            )
        if (limited := access.limited(request)) is not None:
            return limited
        principal = access.by_token(presented.strip())
        if principal is None:
            access.refuse(request, "unknown bearer token")
            return json_error(
                401,
                "unauthorized",
                "the bearer token is not one of [[web.tokens]]",
                bearer=True,
            )
        request[PRINCIPAL] = principal
        return await handler(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found = access.session(cookie)
        if found is not None:
            request[PRINCIPAL], request[CSRF] = found
            if request.method not in SAFE_METHODS and not await _csrf_ok(request, found[1]):
                log.warning(
                    "web: refused %s %s from %s (%s): CSRF token missing or wrong",
                    request.method,
                    request.path,
                    client_address(request),
                    found[0].name,
                )
                return json_error(
                    403,
                    "csrf",
                    "the form's CSRF token is missing or wrong: reload the page and try again",
                )
    return await handler(request)


async def _csrf_ok(request: web.Request, expected: str) -> bool:
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        presented = value if isinstance(value, str) else None
    return presented is not None and same_text(presented, expected)


def require(request: web.Request, need: Need) -> Principal:
    """The caller, if it may do `need`; else a 401/403 JSON error saying what is missing."""
    access = request.app[ACCESS_KEY]
    if not access.configured:
        raise http_error(403, "no_tokens", NO_TOKENS)
    principal = request[PRINCIPAL]
    if principal is None:
        raise http_error(
            401,
            "unauthorized",
            "this needs a token: send 'Authorization: Bearer <token>' (see [[web.tokens]])",
            bearer=True,
        )
    if not principal.can(need):
        log.warning(
            "web: refused %s %s to %s (role %s, needs %s)",
            request.method,
            request.path,
            principal.name,
            principal.role,
            need,
        )
        raise http_error(
            403,
            "forbidden",
            f"the token {principal.name!r} has the role {principal.role!r};"
            f" this needs {' or '.join(sorted(GRANTS[need]))}",
        )
    return principal
