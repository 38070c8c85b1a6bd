"""The status page over plain HTTP: login and logout, redirects, roles, CSRF, the login
limit, escaping, and every page rendering against a running relay."""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp
from yarl import URL

from relay.app import Relay
from relay.web.auth import LOGIN_FAILURES, SESSION_COOKIE
from tests.conftest import RelayFactory, wait_states
from tests.web.conftest import TOKENS, base_url, raw_request, send_mail

CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = ("/", "/live/overview", "/messages", "/upstreams", "/inbound", "/send")


def client() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies set by an IP address host (127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def csrf_of(html: str) -> str:
    found = CSRF_INPUT.search(html)
    assert found, "no CSRF field in the form"
    return found.group(1)


async def log_in(
    session: aiohttp.ClientSession, relay: Relay, name: str, *, next_page: str = ""
) -> aiohttp.ClientResponse:
    url = base_url(relay)
    async with session.get(f"{url}/login", params={"next": next_page} if next_page else {}) as r:
        form = csrf_of(await r.text())
    data = {"csrf": form, "token": TOKENS[name][1], "next": next_page or "/"}
    async with session.post(f"{url}/login", data=data, allow_redirects=False) as r:
        await r.read()
        return r


async def page_csrf(session: aiohttp.ClientSession, relay: Relay, path: str = "/") -> str:
    async with session.get(base_url(relay) + path) as r:
        assert r.status == 200
        return csrf_of(await r.text())


async def paused(relay: Relay, name: str = "outbox") -> bool:
    rows = await relay.queue.routing.sync([], now=time.time(), half_life=60.0)
    return name in rows and rows[name].paused


async def test_a_page_without_a_session_sends_the_browser_to_login(web_relay: Relay) -> None:
    url = base_url(web_relay)
    async with client() as session:
        for path in PAGES:
            async with session.get(url + path, allow_redirects=False) as r:
                assert r.status == 303, path
                location = r.headers["Location"]
                assert location.startswith("/login"), location
        async with session.get(
            url + "/messages?state=failed&kind=inbound", allow_redirects=False
        ) as r:
            target = URL(r.headers["Location"])
            assert target.path == "/login"
            assert target.query["next"] == "/messages?state=failed&kind=inbound"
        async with session.get(url + "/login") as r:
            assert r.status == 200
            html = await r.text()
            assert 'name="token"' in html and "relay token new" in html


async def test_login_opens_every_page_and_returns_to_the_page_asked_for(
    web_relay: Relay,
) -> None:
    url = base_url(web_relay)
    async with client() as session:
        r = await log_in(session, web_relay, "ops", next_page="/upstreams")
        assert r.status == 303 and r.headers["Location"] == "/upstreams"
        cookie = r.cookies[SESSION_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]
        for path in PAGES:
            async with session.get(url + path, allow_redirects=False) as page:
                assert page.status == 200, path
                assert "script-src 'self'" in page.headers["Content-Security-Policy"]
                assert page.headers["Cache-Control"] == "no-store"
        async with session.get(url + "/static/relay.css") as css:
            assert css.status == 200 and "--accent" in await css.text()


async def test_login_never_redirects_off_the_site(web_relay: Relay) -> None:
    for target in (
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "/\t/evil.example",
    ):
        async with client() as session:
            r = await log_in(session, web_relay, "ops", next_page=target)
            assert r.headers["Location"] == "/", target


async def test_a_wrong_token_is_refused_and_a_submit_token_cannot_see_pages(
    web_relay: Relay,
) -> None:
    url = base_url(web_relay)
    async with client() as session:
        async with session.get(f"{url}/login") as r:
            form = csrf_of(await r.text())
        async with session.post(
            f"{url}/login", data={"csrf": form, "token": "not-a-token"}, allow_redirects=False
        ) as r:
            assert r.status == 401
            assert "That token is not one of the relay" in await r.text()
        r = await log_in(session, web_relay, "app")
        assert r.status == 403
        assert SESSION_COOKIE not in r.cookies
        async with session.get(f"{url}/login") as page:
            pass
        r2 = await session.get(url + "/", allow_redirects=False)
        assert r2.status == 303  # no session was made
        r2.release()
    # A submit token that reaches a page anyway (bearer) gets the reason, not the page.
    async with aiohttp.ClientSession() as plain:
        headers = {"Authorization": f"Bearer {TOKENS['app'][1]}"}
        async with plain.get(url + "/messages", headers=headers) as page:
            assert page.status == 403
            text = await page.text()
            assert "the role <code>submit</code>" in text and "POST /api/v1/messages" in text


async def test_without_tokens_the_login_page_says_how_to_add_one(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay()
    url = base_url(relay)
    async with client() as session:
        async with session.get(url + "/", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        async with session.get(url + "/login") as r:
            assert r.status == 403
            html = await r.text()
            assert "relay token new" in html and "[[web.tokens]]" in html
            assert 'name="token"' not in html


async def test_a_form_post_without_the_right_csrf_token_changes_nothing(
    web_relay: Relay,
) -> None:
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "ops")
        csrf = await page_csrf(session, web_relay, "/upstreams")
        for data in ({}, {"csrf": "forged-" + csrf[7:]}, {"csrf": ""}):
            async with session.post(
                url + "/upstreams/outbox/pause", data=data, allow_redirects=False
            ) as r:
                assert r.status == 403, data
                assert (await r.json())["error"] == "csrf"
        assert not await paused(web_relay)
        async with session.post(url + "/logout", data={}, allow_redirects=False) as r:
            assert r.status == 403
        async with session.get(url + "/upstreams", allow_redirects=False) as r:
            assert r.status == 200  # still logged in
        async with session.post(
            url + "/upstreams/outbox/pause", data={"csrf": csrf}, allow_redirects=False
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/upstreams?done=pause&name=outbox"
        assert await paused(web_relay)
        async with session.get(url + "/upstreams?done=pause&name=outbox") as r:
            html = await r.text()
            assert "Resume" in html and "outbox: Paused: it takes no new attempts" in html
        async with session.post(
            url + "/upstreams/outbox/resume",
            headers={"X-CSRF-Token": csrf},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
        assert not await paused(web_relay)


async def test_the_read_role_sees_no_buttons_and_cannot_act(web_relay: Relay) -> None:
    url = base_url(web_relay)
    await send_mail(web_relay, "for the viewer")
    await wait_states(web_relay, sent=1)
    msg_id = (await web_relay.queue.search(limit=1))[0].id
    async with client() as session:
        await log_in(session, web_relay, "viewer")
        async with session.get(f"{url}/messages/{msg_id}") as r:
            html = await r.text()
            assert r.status == 200 and "for the viewer" in html
            assert "/hold" not in html and "Delete" not in html
        async with session.get(f"{url}/upstreams") as r:
            html = await r.text()
            assert "Pause" not in html
            csrf = csrf_of(html)
        async with session.get(f"{url}/send") as r:
            assert "sending needs <code>admin</code>" in await r.text()
        for path in ("/upstreams/outbox/pause", f"/messages/{msg_id}/delete", "/send"):
            async with session.post(url + path, data={"csrf": csrf}) as r:
                assert r.status == 403, path
                assert "this needs" in await r.text()
        assert not await paused(web_relay)
        assert await web_relay.queue.get(msg_id) is not None


async def test_repeated_failed_logins_get_429(web_relay: Relay) -> None:
    url = base_url(web_relay)
    async with client() as session:
        async with session.get(f"{url}/login") as r:
            form = csrf_of(await r.text())
        for _ in range(LOGIN_FAILURES):
            async with session.post(
                f"{url}/login", data={"csrf": form, "token": "guess"}, allow_redirects=False
            ) as r:
                assert r.status == 401
        for token in ("guess", TOKENS["ops"][1]):
            async with session.post(
                f"{url}/login", data={"csrf": form, "token": token}, allow_redirects=False
            ) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) > 0
                assert "Too many failed logins" in await r.text()


async def test_a_login_post_from_another_site_is_refused(web_relay: Relay) -> None:
    """The login form's own CSRF token: a post without the login cookie's value fails."""
    async with (
        client() as session,
        session.post(
            f"{base_url(web_relay)}/login",
            data={"csrf": "made-up", "token": TOKENS["ops"][1]},
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 403
        assert SESSION_COOKIE not in r.cookies


async def test_a_login_cookie_that_is_not_ours_gets_a_fresh_form_not_a_500(
    web_relay: Relay,
) -> None:
    url = base_url(web_relay)
    body = b"csrf=%FF&token=x"
    for cookie in (b"\xff\xfe", "\u00e9t\u00e9".encode(), b"short"):
        head = b"Host: x\r\nCookie: relay_login=" + cookie + b"\r\n"
        answer = await raw_request(url, b"GET /login HTTP/1.1\r\n" + head)
        assert answer.startswith(b"HTTP/1.1 200 "), (cookie, answer[:200])
        assert b"relay_login=" + cookie not in answer  # a new token replaces it
        answer = await raw_request(
            url,
            b"POST /login HTTP/1.1\r\n"
            + head
            + b"Content-Type: application/x-www-form-urlencoded\r\n",
            body,
        )
        assert answer.startswith(b"HTTP/1.1 403 "), (cookie, answer[:200])
        assert b"The login form had expired" in answer


async def test_logout_ends_the_session(web_relay: Relay) -> None:
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "ops")
        csrf = await page_csrf(session, web_relay)
        async with session.post(url + "/logout", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login?out=1"
        async with session.get(url + "/", allow_redirects=False) as r:
            assert r.status == 303
        async with session.get(url + "/login?out=1") as r:
            assert "You are logged out." in await r.text()


async def test_a_script_subject_is_text_on_every_page(web_relay: Relay) -> None:
    subject = "<script>alert(1)</script>"
    await send_mail(web_relay, subject)
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "ops")
        msg_id = (await web_relay.queue.search(limit=1))[0].id
        for path in ("/", "/live/overview", "/messages", f"/messages/{msg_id}"):
            async with session.get(url + path) as r:
                html = await r.text()
                assert "<script>alert" not in html, path
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path


async def test_the_search_form_filters_and_explains_a_bad_time(
    web_relay: Relay, tmp_path: Path
) -> None:
    await send_mail(web_relay, "to alice", to="alice@example.org")
    await send_mail(web_relay, "to bob", to="bob@example.org")
    await wait_states(web_relay, sent=2)
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "viewer")
        async with session.get(url + "/messages", params={"recipient": "alice"}) as r:
            html = await r.text()
            assert "to alice" in html and "to bob" not in html
        async with session.get(url + "/messages", params={"state": "sent"}) as r:
            html = await r.text()
            assert "to alice" in html and "to bob" in html
        async with session.get(url + "/messages", params={"since": "yesterday"}) as r:
            assert r.status == 400
            assert "write a UTC time such as 2025-06-01T14:30" in await r.text()
        async with session.get(url + "/messages/0000000000NOSUCHID00") as r:
            assert r.status == 404
        # A cursor that is not an id never reaches the database.
        async with session.get(url + "/messages", params={"before": "x\x00'"}) as r:
            assert r.status == 400 and "not a page cursor" in await r.text()
        async with session.get(url + "/inbound", params={"before": "x\x00'"}) as r:
            assert r.status == 200


async def test_a_test_message_from_the_page_says_where_it_came_from(web_relay: Relay) -> None:
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "ops")
        csrf = await page_csrf(session, web_relay, "/send")
        form = {
            "csrf": csrf,
            "from": "ops@example.com",
            "to": "someone@example.org",
            "subject": "Checking the setup",
            "body": "Hello",
        }
        async with session.post(url + "/send", data=form, allow_redirects=False) as r:
            assert r.status == 303
            msg_id = r.headers["Location"].rpartition("sent=")[2]
    [received] = [e for e in await web_relay.queue.timeline(msg_id) if e["type"] == "received"]
    assert received["client"] == "127.0.0.1" and received["via"] == "page", received


async def test_an_action_returns_to_a_page_of_this_site_only(web_relay: Relay) -> None:
    """The `back` field of an action's form is where the browser goes afterwards: a path
    here, or the overview (never another site, never a broken header)."""
    url = base_url(web_relay)
    backs = {
        "/inbound": "/inbound?done=delete",
        "/\t/evil.example/": "/?done=delete",
        "//evil.example/?a=1": "/?done=delete",
        "/\r\nSet-Cookie: x=1": "/?done=delete",
    }
    for i in range(len(backs)):
        await send_mail(web_relay, f"to delete {i}")
    await wait_states(web_relay, sent=len(backs))
    ids = [row.id for row in await web_relay.queue.search(limit=len(backs))]
    async with client() as session:
        await log_in(session, web_relay, "ops")
        csrf = await page_csrf(session, web_relay)
        for msg_id, (back, expected) in zip(ids, backs.items(), strict=True):
            async with session.post(
                f"{url}/messages/{msg_id}/delete",
                data={"csrf": csrf, "back": back},
                allow_redirects=False,
            ) as r:
                assert (r.status, r.headers.get("Location")) == (303, expected), repr(back)
