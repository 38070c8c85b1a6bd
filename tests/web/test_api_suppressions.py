"""/api/v1/suppressions over real HTTP: roles, adding, paging, lifting, refusals that
name the field; POST /api/v1/messages refusing a suppressed recipient (422, nothing
queued), as RCPT TO does over SMTP; and the Suppressions page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.app import Relay
from relay.queue.base import Suppression
from tests.conftest import RelayFactory
from tests.web.api import call, simple_message
from tests.web.conftest import base_url, token_entries


async def test_roles(web_relay: Relay) -> None:
    assert (await call(web_relay, "GET", "/suppressions", token=None))[0] == 401
    assert (await call(web_relay, "GET", "/suppressions", token="app"))[0] == 403
    assert (await call(web_relay, "GET", "/suppressions", token="viewer"))[0] == 200
    for token in ("viewer", "app"):
        status, body = await call(
            web_relay, "POST", "/suppressions", token=token, json={"address": "a@example.org"}
        )
        assert status == 403, body
        assert (await call(web_relay, "DELETE", "/suppressions/a@example.org", token=token))[
            0
        ] == 403


async def test_add_list_and_lift(web_relay: Relay) -> None:
    status, body = await call(
        web_relay,
        "POST",
        "/suppressions",
        json={"address": "Gone@Example.org", "expires": "30d", "detail": "asked by phone"},
    )
    assert status == 201, body
    added = body["suppression"]
    assert added["address"] == "gone@example.org" and added["scope"] == ""
    assert added["reason"] == "manual" and added["source"] == "web:ops"
    assert added["expires"] == pytest.approx(added["created"] + 30 * 86400)
    # In force in this process at once: the next submission to it is refused.
    assert web_relay.suppression is not None
    assert web_relay.suppression.check("gone@example.org", "app@example.com") is not None

    await call(
        web_relay,
        "POST",
        "/suppressions",
        json={"address": "gone@example.org", "scope": "Shop.Example", "reason": "complaint"},
    )
    status, body = await call(web_relay, "GET", "/suppressions", params={"search": "GONE"})
    assert status == 200
    assert [(e["address"], e["scope"]) for e in body["suppressions"]] == [
        ("gone@example.org", ""),
        ("gone@example.org", "shop.example"),
    ]
    assert body["next_cursor"] is None

    status, body = await call(
        web_relay, "DELETE", "/suppressions/gone@example.org", params={"scope": "shop.example"}
    )
    assert (status, body) == (
        200,
        {"address": "gone@example.org", "scope": "shop.example", "removed": 1},
    )
    status, body = await call(web_relay, "DELETE", "/suppressions/GONE@example.org")
    assert status == 200 and body["removed"] == 1
    assert web_relay.suppression.check("gone@example.org", "app@example.com") is None
    status, body = await call(web_relay, "DELETE", "/suppressions/gone@example.org")
    assert status == 404
    assert body["message"] == "gone@example.org is not on the suppression list"


async def test_pages_follow_next_cursor(web_relay: Relay) -> None:
    for n in range(5):
        await call(web_relay, "POST", "/suppressions", json={"address": f"u{n}@example.org"})
    seen: list[str] = []
    params: dict[str, str] = {"limit": "2"}
    while True:
        status, body = await call(web_relay, "GET", "/suppressions", params=params)
        assert status == 200
        seen += [e["address"] for e in body["suppressions"]]
        if body["next_cursor"] is None:
            break
        params = {"limit": "2", "after": body["next_cursor"]}
    assert seen == [f"u{n}@example.org" for n in range(5)]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "address"),
        ({"address": "nobody"}, "address"),
        ({"address": "a b@example.org"}, "address"),
        ({"address": "a@example.org", "reason": "dislike"}, "reason"),
        ({"address": "a@example.org", "scope": "not a domain"}, "scope"),
        ({"address": "a@example.org", "expires": "soon"}, "expires"),
        ({"address": "a@example.org", "expires": 0}, "expires"),
        ({"address": "a@example.org", "expires": 10**400}, "expires"),
        ({"address": "a@example.org", "colour": "red"}, "colour"),
        ({"address": ["a@example.org"]}, "address"),
    ],
)
async def test_bad_additions_name_the_field(
    web_relay: Relay, payload: dict[str, object], field: str
) -> None:
    status, body = await call(web_relay, "POST", "/suppressions", json=payload)
    assert status == 400, body
    assert body["field"] == field
    status, body = await call(web_relay, "GET", "/suppressions")
    assert body["suppressions"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"sort": "address"}, "sort")],
)
async def test_bad_list_parameters(web_relay: Relay, params: dict[str, str], field: str) -> None:
    status, body = await call(web_relay, "GET", "/suppressions", params=params)
    assert status == 400 and body["field"] == field


async def test_submission_to_a_suppressed_recipient_is_refused(web_relay: Relay) -> None:
    assert web_relay.suppression is not None
    await web_relay.suppression.add(
        [Suppression("gone@example.org", "", "hard_bounce", "sendgrid:ev-9", 1_800_000_000.0)]
    )
    message = simple_message(to=["ok@example.org"], bcc=["Gone@example.org"])
    status, body = await call(web_relay, "POST", "/messages", token="app", json=message)
    assert status == 422, body
    assert body["error"] == "suppressed_recipient" and body["field"] == "bcc[0]"
    assert (
        "Gone@example.org is on the suppression list (hard bounce on 2027-01-15"
        in (body["message"])
    )
    assert "relay suppression remove gone@example.org" in body["message"]
    # The raw form too, naming the query parameter.
    status, body = await call(
        web_relay,
        "POST",
        "/messages",
        token="app",
        data=b"Subject: x\r\n\r\nhi\r\n",
        params=[("from", "app@example.com"), ("to", "ok@example.org"), ("to", "gone@example.org")],
        headers={"Content-Type": "message/rfc822"},
    )
    assert status == 422 and body["field"] == "to[1]"
    assert await web_relay.queue.counts() == {}


async def test_submission_with_action_bounce_is_accepted(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = await make_relay(
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)},
        suppression={"action": "bounce"},
    )
    assert relay.suppression is not None
    await relay.suppression.add(
        [Suppression("gone@example.org", "", "hard_bounce", "t", 1_800_000_000.0)]
    )
    status, body = await call(
        relay, "POST", "/messages", token="app", json=simple_message(to=["gone@example.org"])
    )
    assert status == 202, body


# -- the page ---------------------------------------------------------------------------


async def test_the_page_lists_adds_and_removes_with_csrf(web_relay: Relay) -> None:
    from tests.web.test_pages import client, log_in, page_csrf

    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "ops")
        async with session.get(f"{url}/") as r:
            assert 'href="/suppressions"' in await r.text()  # in the nav
        csrf = await page_csrf(session, web_relay, "/suppressions")
        form = {"address": "<b>x</b>@example.org", "scope": "", "reason": "manual"}
        async with session.post(f"{url}/suppressions", data={"csrf": csrf, **form}) as r:
            assert r.status == 400
            html = await r.text()
            assert "address: " in html and "&lt;b&gt;x&lt;/b&gt;@example.org" in html
        # Without the CSRF token nothing is added.
        form = {"address": "gone@example.org", "scope": "shop.example", "expires": "7d"}
        async with session.post(f"{url}/suppressions", data=form) as r:
            assert r.status == 403
        assert web_relay.suppression is not None
        assert web_relay.suppression.check("gone@example.org", "a@shop.example") is None
        async with session.post(f"{url}/suppressions", data={"csrf": csrf, **form}) as r:
            assert r.status == 200 and r.url.path == "/suppressions"
            html = await r.text()
        assert "gone@example.org is suppressed." in html and "shop.example" in html
        assert web_relay.suppression.check("gone@example.org", "a@shop.example") is not None
        async with session.get(f"{url}/suppressions", params={"search": "nobody"}) as r:
            assert "No address matches this search." in await r.text()

        remove = {"csrf": csrf, "address": "gone@example.org", "scope": "shop.example"}
        async with session.post(f"{url}/suppressions/remove", data=remove) as r:
            assert r.status == 200
            assert "gone@example.org may be mailed again." in await r.text()
        assert web_relay.suppression.check("gone@example.org", "a@shop.example") is None
        async with session.post(f"{url}/suppressions/remove", data=remove) as r:
            assert r.status == 404


async def test_the_read_role_sees_the_list_without_forms(web_relay: Relay) -> None:
    from tests.web.test_pages import client, log_in

    assert web_relay.suppression is not None
    await web_relay.suppression.add(
        [Suppression("gone@example.org", "", "complaint", "sendgrid:ev-2", 1_800_000_000.0)]
    )
    url = base_url(web_relay)
    async with client() as session:
        await log_in(session, web_relay, "viewer")
        async with session.get(f"{url}/suppressions") as r:
            html = await r.text()
        assert "gone@example.org" in html and "spam complaint" in html
        assert "sendgrid:ev-2" in html
        assert "Remove" not in html and "Add an address" not in html
        async with session.get(f"{url}/suppressions") as r:
            csrf = re.search(r'name="csrf" value="([^"]*)"', await r.text())
        data = {"csrf": csrf.group(1) if csrf else "", "address": "gone@example.org"}
        async with session.post(f"{url}/suppressions/remove", data=data) as r:
            assert r.status == 403
    assert web_relay.suppression.check("gone@example.org", "") is not None
