"""Who may use the web side: bearer tokens, sessions, CSRF, lockouts, and the config rules.

The middleware is exercised over real HTTP on loopback, in a small app that has one route
per need, so these tests pin the access rules apart from any page or endpoint.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.config import ConfigError, WebConfig, parse
from relay.smtp.listener import EX_CONFIG
from relay.web.auth import (
    ACCESS_KEY,
    CSRF,
    CSRF_HEADER,
    LOGIN_FAILURES,
    SESSION_COOKIE,
    Access,
    Need,
    authenticate,
    require,
)
from tests.conftest import RelayFactory, relay_config
from tests.web.conftest import TOKENS, base_url, bearer, raw_request, token_entries


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def web_config(tmp_path: Path, **extra: Any) -> WebConfig:
    cfg = relay_config(tmp_path, web={"tokens": token_entries(tmp_path), **extra})
    return cfg.web


async def serve(access: Access) -> tuple[web.AppRunner, str]:
    app = web.Application(middlewares=[authenticate])
    app[ACCESS_KEY] = access

    def route(need: Need) -> Any:
        async def handler(request: web.Request) -> web.Response:
            principal = require(request, need)
            return web.json_response({"name": principal.name, "csrf": request[CSRF]})

        return handler

    for need in ("read", "submit", "admin"):
        app.router.add_get(f"/{need}", route(need))
        app.router.add_post(f"/{need}", route(need))

    async def login(request: web.Request) -> web.Response:
        principal = access.by_name((await request.json())["name"], session=True)
        assert principal is not None
        value, csrf = access.issue(principal)
        response = web.json_response({"csrf": csrf})
        access.set_cookie(response, value, secure=False)
        return response

    app.router.add_post("/test-login", login)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, Clock]]:
    clock = Clock()
    runner, url = await serve(Access(web_config(tmp_path), clock=clock))
    yield url, clock
    await runner.cleanup()


def session() -> aiohttp.ClientSession:
    """A client that keeps cookies set by an IP address (aiohttp's jar refuses them)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def status(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


async def test_each_role_reaches_what_it_may_and_nothing_else(
    server: tuple[str, Clock],
) -> None:
    url, _ = server
    may = {
        "ops": {"read", "submit", "admin"},
        "viewer": {"read"},
        "app": {"submit"},
    }
    async with aiohttp.ClientSession() as http:
        for name, allowed in may.items():
            for need in ("read", "submit", "admin"):
                code, body = await status(http, "GET", f"{url}/{need}", headers=bearer(name))
                if need in allowed:
                    assert (code, body["name"]) == (200, name)
                else:
                    assert code == 403 and body["error"] == "forbidden"
                    assert f"role {TOKENS[name][0]!r}" in body["message"]


async def test_no_token_or_a_wrong_one_is_401_with_a_challenge(
    server: tuple[str, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/read") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in (await resp.json())["message"]
        wrong = {"Authorization": "Bearer " + TOKENS["ops"][1][:-1] + "X"}
        code, body = await status(http, "GET", f"{url}/read", headers=wrong)
        assert code == 401 and "not one of [[web.tokens]]" in body["message"]
        code, body = await status(http, "GET", f"{url}/read", headers={"Authorization": "Basic x"})
        assert code == 401
    assert "unknown bearer token" in caplog.text  # the refusal is on the server side too


async def test_repeated_wrong_tokens_lock_the_address_out_for_a_while(
    server: tuple[str, Clock],
) -> None:
    url, clock = server
    wrong = {"Authorization": "Bearer not-a-token-at-all-0000"}
    async with aiohttp.ClientSession() as http:
        for _ in range(LOGIN_FAILURES):
            assert (await status(http, "GET", f"{url}/read", headers=wrong))[0] == 401
        async with http.get(f"{url}/read", headers=bearer("ops")) as resp:
            # Locked out: even the right token waits, so guessing cannot go on.
            assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
        clock.now += 301
        assert (await status(http, "GET", f"{url}/read", headers=bearer("ops")))[0] == 200


async def test_a_session_needs_its_csrf_token_for_every_change(
    server: tuple[str, Clock],
) -> None:
    url, clock = server
    async with session() as http:
        code, body = await status(http, "POST", f"{url}/test-login", json={"name": "ops"})
        csrf = body["csrf"]
        assert (await status(http, "GET", f"{url}/admin"))[0] == 200  # reading: cookie only
        code, body = await status(http, "POST", f"{url}/admin")
        assert code == 403 and body["error"] == "csrf"
        code, _ = await status(http, "POST", f"{url}/admin", headers={CSRF_HEADER: "x" + csrf})
        assert code == 403
        code, _ = await status(http, "POST", f"{url}/admin", data={"csrf": csrf})
        assert code == 200
        code, _ = await status(http, "POST", f"{url}/admin", headers={CSRF_HEADER: csrf})
        assert code == 200
        clock.now += 13 * 3600  # past session_lifetime (12 h)
        assert (await status(http, "GET", f"{url}/admin"))[0] == 401


async def test_a_tampered_session_cookie_is_no_session(
    server: tuple[str, Clock], tmp_path: Path
) -> None:
    url, _ = server
    async with session() as http:
        await status(http, "POST", f"{url}/test-login", json={"name": "viewer"})
        cookie = next(c for c in http.cookie_jar if c.key == SESSION_COOKIE)
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        payload, _, signature = cookie.value.partition(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert data["n"] == "viewer"
    # The viewer's signature over a payload naming the admin token does not pass.
    forged = base64.urlsafe_b64encode(json.dumps({**data, "n": "ops"}).encode()).decode()
    async with aiohttp.ClientSession() as http:
        for value, expected in ((cookie.value, 200), (f"{forged.rstrip('=')}.{signature}", 401)):
            headers = {"Cookie": f"{SESSION_COOKIE}={value}"}
            assert (await status(http, "GET", f"{url}/read", headers=headers))[0] == expected


def test_sessions_end_when_the_tokens_change(tmp_path: Path) -> None:
    access = Access(web_config(tmp_path))
    principal = access.by_name("ops", session=True)
    assert principal is not None
    cookie, _ = access.issue(principal)
    assert access.session(cookie) is not None
    (tmp_path / "other").mkdir()
    entries = token_entries(tmp_path / "other")
    entries[0]["role"] = "read"  # ops demoted
    cfg = relay_config(tmp_path, web={"tokens": entries})
    assert Access(cfg.web).session(cookie) is None


async def test_no_tokens_configured_means_closed_with_how_to_open(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path)
    runner, url = await serve(Access(cfg.web))
    try:
        async with aiohttp.ClientSession() as http:
            code, body = await status(http, "GET", f"{url}/read")
        assert code == 403 and "relay token new" in body["message"]
    finally:
        await runner.cleanup()


def config_error(tmp_path: Path, tokens: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse({"web": {"tokens": tokens}}, tmp_path / "config.toml")
    return str(exc.value)


def test_tokens_come_from_env_or_files_and_are_long_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    literal = config_error(tmp_path, [{"name": "ops", "token": "a" * 40}])
    assert "web.tokens[0].token: write env:NAME or file:PATH" in literal
    monkeypatch.setenv("SHORT", "abc")
    assert "shorter than 16" in config_error(tmp_path, [{"name": "a", "token": "env:SHORT"}])
    monkeypatch.setenv("T1", "x" * 20)
    twice = config_error(
        tmp_path, [{"name": "a", "token": "env:T1"}, {"name": "a", "token": "env:T1"}]
    )
    assert "'a' is used twice" in twice
    role = config_error(tmp_path, [{"name": "a", "token": "env:T1", "role": "root"}])
    assert "must be one of 'read', 'submit', 'admin'" in role


async def test_a_public_listener_without_tokens_refuses_to_start(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        await make_relay(web={"listen": "0.0.0.0:0"})
    assert exc.value.code == EX_CONFIG
    assert "allow_no_tokens" in caplog.text
    relay = await make_relay(web={"listen": "0.0.0.0:0", "allow_no_tokens": True})
    async with aiohttp.ClientSession() as http:
        assert (await status(http, "GET", f"{base_url(relay)}/healthz"))[0] == 200


async def test_the_web_listener_speaks_tls_when_given_a_certificate(
    make_relay: RelayFactory,
    tls_files: tuple[str, str],
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    cert, key = tls_files
    relay = await make_relay(
        web={
            "listen": "127.0.0.1:0",
            "tls_cert": cert,
            "tls_key": key,
            "tokens": token_entries(tmp_path),
        }
    )
    url = f"https://localhost:{relay.web_port}/healthz"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, ssl=client_tls) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{relay.web_port}/healthz") as resp:
                await resp.read()


async def test_a_csrf_token_or_cookie_that_is_not_ascii_is_refused_not_a_500(
    server: tuple[str, Clock],
) -> None:
    url, _ = server
    async with session() as http:
        await status(http, "POST", f"{url}/test-login", json={"name": "ops"})
        code, body = await status(http, "POST", f"{url}/admin", data={"csrf": "é"})
        assert code == 403 and body["error"] == "csrf"
        code, body = await status(
            http, "POST", f"{url}/admin", headers={CSRF_HEADER: "\u00e9".encode().decode("latin-1")}
        )
        assert code == 403 and body["error"] == "csrf"
    async with aiohttp.ClientSession() as http:
        headers = {"Cookie": f"{SESSION_COOKIE}=e30.\u00e9".encode().decode("latin-1")}
        assert (await status(http, "GET", f"{url}/read", headers=headers))[0] == 401
    # Bytes that are not UTF-8 (aiohttp hands them on as surrogates), in either half.
    for cookie in (b"\xff\xfe.abc", b"abc.\xff", b"\xff"):
        answer = await raw_request(
            url, b"GET /read HTTP/1.1\r\nHost: x\r\nCookie: relay_session=" + cookie + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 401 "), (cookie, answer[:200])


async def test_the_sns_endpoint_answers_as_before_whatever_authorization_it_carries(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    """/inbound/sns trusts the SNS signature alone: an Authorization header (SNS sends
    Basic when the subscription URL has credentials, a proxy may add its own) is not the
    relay's to judge there, and a wrong one must not count towards a lockout."""
    relay = await make_relay(
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)},
        inbound={
            "aws": {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"},
            "route": [
                {
                    "recipients": ["*"],
                    "destination": {"type": "maildir", "path": str(tmp_path / "box")},
                }
            ],
            "sns": {"topics": ["arn:aws:sns:eu-west-1:123456789012:relay-inbound"]},
        },
    )
    url = f"{base_url(relay)}/inbound/sns"
    unsigned = json.dumps({"Type": "Notification", "Message": "{}"})
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=unsigned) as resp:
            plain = resp.status, await resp.json()
        assert plain[0] in (400, 403)
        for header in (
            "Basic dXNlcjpwYXNzd29yZA==",
            "Bearer not-a-token-at-all-0000",
            "Bearer " + TOKENS["ops"][1],
        ) * LOGIN_FAILURES:
            async with http.post(url, data=unsigned, headers={"Authorization": header}) as resp:
                assert (resp.status, await resp.json()) == plain, header
        async with http.get(f"{base_url(relay)}/api/v1/upstreams", headers=bearer("ops")) as resp:
            assert resp.status == 200  # no lockout earned on the SNS endpoint
