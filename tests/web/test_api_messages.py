"""Reading and acting through /api/v1: roles, search and paging, the timeline with the
actor of each action, bulk retry, upstream pause/resume across a restart, stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.app import Relay
from tests.conftest import RelayFactory, mailgun_upstream, wait_states
from tests.fakes.providers import FakeMailgun
from tests.web.api import call, simple_message
from tests.web.conftest import base_url, token_entries

SOME_ID = "06H2N0J423TZ1T8NJZVR"
# (method, path, the role it needs)
ENDPOINTS = [
    ("POST", "/messages", "submit"),
    ("GET", "/messages", "read"),
    ("GET", f"/messages/{SOME_ID}", "read"),
    ("GET", f"/messages/{SOME_ID}/events", "read"),
    ("GET", f"/messages/{SOME_ID}/raw", "admin"),
    ("POST", f"/messages/{SOME_ID}/retry", "admin"),
    ("POST", f"/messages/{SOME_ID}/hold", "admin"),
    ("POST", f"/messages/{SOME_ID}/release", "admin"),
    ("DELETE", f"/messages/{SOME_ID}", "admin"),
    ("POST", "/messages/retry", "admin"),
    ("POST", "/queue/flush", "admin"),
    ("GET", "/upstreams", "read"),
    ("POST", "/upstreams/outbox/pause", "admin"),
    ("POST", "/upstreams/outbox/resume", "admin"),
    ("GET", "/stats", "read"),
]
ROLE_OF = {"ops": "admin", "viewer": "read", "app": "submit"}
ALLOWED = {"read": {"ops", "viewer"}, "submit": {"ops", "app"}, "admin": {"ops"}}


@pytest.mark.parametrize(("method", "path", "need"), ENDPOINTS)
async def test_each_endpoint_lets_in_exactly_the_roles_it_names(
    web_relay: Relay, method: str, path: str, need: str
) -> None:
    status, body = await call(web_relay, method, path, token=None)
    assert (status, body["error"]) == (401, "unauthorized"), body
    for token in ROLE_OF:
        status, body = await call(web_relay, method, path, token=token, json={})
        if token in ALLOWED[need]:
            assert status not in (401, 403), (token, body)
        else:
            assert (status, body["error"]) == (403, "forbidden"), (token, body)
            assert repr(ROLE_OF[token]) in body["message"]
    assert await web_relay.queue.counts() == {}


async def test_with_no_token_configured_the_api_says_how_to_add_one(relay: Relay) -> None:
    status, body = await call(relay, "GET", "/messages", token=None)
    assert (status, body["error"]) == (403, "no_tokens")
    assert "relay token new" in body["message"] and "[[web.tokens]]" in body["message"]
    status, index = await call(relay, "GET", "", token=None)
    listed = [(e["method"], e["path"]) for e in index["endpoints"]]
    assert status == 200 and ("GET", "/api/v1/stats") in listed


async def submit(relay: Relay, **fields: object) -> str:
    status, body = await call(
        relay, "POST", "/messages", token="app", json=simple_message(**fields)
    )
    assert status == 202, body
    return str(body["id"])


async def paused(relay: Relay) -> Relay:
    status, _ = await call(relay, "POST", "/upstreams/outbox/pause")
    assert status == 200
    await relay.router.sync()
    return relay


async def test_search_filters_and_the_cursor_walk_every_match_newest_first(
    web_relay: Relay,
) -> None:
    relay = await paused(web_relay)
    ids = [
        await submit(
            relay, to=[f"user{i}@{'example.org' if i % 2 else 'other.test'}"], subject=f"Report {i}"
        )
        for i in range(5)
    ]
    status, page = await call(relay, "GET", "/messages", token="viewer")
    assert [m["id"] for m in page["messages"]] == ids[::-1] and page["next_cursor"] is None

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"before": cursor} if cursor else {})}
        status, page = await call(relay, "GET", "/messages", token="viewer", params=params)
        assert status == 200 and len(page["messages"]) <= 2
        seen += [m["id"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    async def found(**params: str) -> list[str]:
        status, page = await call(relay, "GET", "/messages", token="viewer", params=params)
        assert status == 200, page
        return [m["id"] for m in page["messages"]]

    assert await found(recipient="EXAMPLE.ORG") == [ids[3], ids[1]]
    assert await found(subject="report 2") == [ids[2]]
    assert await found(sender="APP@") == ids[::-1]
    assert await found(sender="nobody@") == []
    assert await found(kind="inbound") == []
    assert await found(state="sent") == []
    status, detail = await call(relay, "GET", f"/messages/{ids[2]}", token="viewer")
    created = detail["created"]
    assert await found(since=str(created)) == ids[:1:-1]
    assert await found(until=str(created)) == ids[1::-1]

    for params, field in [
        ({"state": "lost"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"before": "not-an-id"}, "before"),
        ({"recipent": "typo"}, "recipent"),
    ]:
        status, body = await call(relay, "GET", "/messages", token="viewer", params=params)
        assert (status, body["field"]) == (400, field), body


async def test_actions_are_on_the_timeline_with_the_token_as_actor(web_relay: Relay) -> None:
    relay = await paused(web_relay)
    msg_id = await submit(relay)
    for action in ("hold", "release", "retry"):
        # Released and retried messages are due at once: dispatch tries (and defers) them.
        await relay.wait_for(lambda: _settled(relay, msg_id))
        status, body = await call(relay, "POST", f"/messages/{msg_id}/{action}")
        assert status == 200 and body["action"] == action, body
    await relay.wait_for(lambda: _state_is(relay, msg_id, "deferred"))
    status, body = await call(relay, "POST", f"/messages/{msg_id}/release")
    assert (status, body["error"]) == (409, "conflict") and "not held" in body["message"]

    status, events = await call(relay, "GET", f"/messages/{msg_id}/events", token="viewer")
    assert status == 200
    acted = [(e["type"], e.get("by")) for e in events["events"] if e.get("by")]
    assert acted == [("held", "web:ops"), ("released", "web:ops"), ("retry", "web:ops")]

    status, body = await call(relay, "DELETE", f"/messages/{msg_id}")
    assert status == 200 and body["deleted"] is True
    for path in (f"/messages/{msg_id}", f"/messages/{msg_id}/events", f"/messages/{msg_id}/raw"):
        status, body = await call(relay, "GET", path)
        assert (status, body["error"]) == (404, "not_found"), path
    status, body = await call(relay, "POST", f"/messages/{msg_id}/retry")
    assert status == 404


async def test_the_raw_bytes_are_gone_once_sent(web_relay: Relay) -> None:
    msg_id = await submit(web_relay)
    await wait_states(web_relay, sent=1)
    status, body = await call(web_relay, "GET", f"/messages/{msg_id}/raw")
    assert (status, body["error"]) == (410, "body_gone")
    status, detail = await call(web_relay, "GET", f"/messages/{msg_id}")
    assert detail["state"] == "sent" and detail["recipients"][0]["state"] == "sent"
    # The header summary kept at arrival outlives the body: what the operator matches a
    # complaint against ("my Message-ID ... never arrived").
    headers = detail["headers"]
    assert headers["From"] == "app@example.com" and headers["To"] == "rcpt@example.org"
    assert headers["Subject"] == "hello" and headers["Message-ID"].endswith(">")
    assert headers["Date"] and headers["Cc"] is None and detail["body_stored"] is False
    assert detail["recipients"][0]["upstream"] == "outbox" and detail["upstream"] == "outbox"


async def test_bulk_retry_requeues_the_failed_messages_a_filter_matches(
    make_relay: RelayFactory, tmp_path: Path, mailgun: FakeMailgun
) -> None:
    relay = await make_relay(
        web={"tokens": token_entries(tmp_path)},
        upstream=[mailgun_upstream(mailgun)],
    )
    mailgun.fail(400, times=3, message="'to' parameter is not a valid address")
    ids = [await submit(relay, subject=f"bulk {i}") for i in range(3)]
    await wait_states(relay, failed=3)
    status, body = await call(relay, "POST", "/messages/retry", json={"subject": "bulk 1"})
    assert status == 200 and body["retried"] == [ids[1]] and body["more"] is False, body
    await wait_states(relay, failed=2, sent=1)
    status, body = await call(relay, "POST", "/messages/retry", json={"upstream": "mailgun"})
    assert status == 200 and sorted(body["retried"]) == sorted([ids[0], ids[2]]), body
    await wait_states(relay, sent=3)
    status, events = await call(relay, "GET", f"/messages/{ids[0]}/events")
    assert ("retry", "web:ops") in [(e["type"], e.get("by")) for e in events["events"]]
    status, body = await call(relay, "POST", "/messages/retry", json={"state": "sent"})
    assert (status, body["field"]) == (400, "state")
    status, body = await call(relay, "POST", "/messages/retry", json={"colour": "red"})
    assert (status, body["field"]) == (400, "colour")
    # JSON may spell a lone surrogate ("\udf79"): not text the queue can search for.
    raw = b'{"subject": "x\\udf79"}'
    headers = {"Content-Type": "application/json"}
    status, body = await call(relay, "POST", "/messages/retry", data=raw, headers=headers)
    assert (status, body["field"]) == (400, "subject"), body


async def test_a_paused_upstream_shows_paused_and_stays_paused_after_a_restart(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    web = {"tokens": token_entries(tmp_path)}
    first = await make_relay(web=web)
    status, body = await call(first, "POST", "/upstreams/outbox/pause")
    assert status == 200 and body["upstream"]["paused"] is True
    status, body = await call(first, "POST", "/upstreams/nowhere/pause")
    assert (status, body["error"]) == (404, "not_found") and "outbox" in body["message"]
    await first.stop()

    second = await make_relay(web=web)
    status, body = await call(second, "GET", "/upstreams", token="viewer")
    (outbox,) = body["upstreams"]
    assert outbox["name"] == "outbox" and outbox["paused"] is True
    assert set(outbox["windows"]) == {"5m", "1h"}
    msg_id = await submit(second)
    await second.wait_for(lambda: _state_is(second, msg_id, "deferred"))
    status, body = await call(second, "POST", "/upstreams/outbox/resume")
    assert status == 200 and body["upstream"]["paused"] is False
    await wait_states(second, timeout=10.0, sent=1)  # due at once, not at its 30 s retry
    timeline = await second.queue.timeline(msg_id)
    assert [e["by"] for e in timeline if e["type"] == "flushed"] == ["web:ops"]


async def _settled(relay: Relay, msg_id: str) -> bool:
    """Not queued or being tried: an action now does not race the dispatcher."""
    row = await relay.queue.get(msg_id)
    return row is not None and row.state in ("deferred", "held")


async def _state_is(relay: Relay, msg_id: str, state: str) -> bool:
    row = await relay.queue.get(msg_id)
    return row is not None and row.state == state


async def test_stats_answer_each_window(web_relay: Relay) -> None:
    await submit(web_relay)
    await wait_states(web_relay, sent=1)
    for window in ("1h", "24h", "7d"):
        status, body = await call(
            web_relay, "GET", "/stats", token="viewer", params={"window": window}
        )
        assert status == 200 and body["window"] == window, body
        assert body["counts"] == {"sent": 1} and body["oldest_age"] is None
        assert body["series"] and set(body["queue_time"]) == {"p50", "p95", "p99", "max"}
    status, body = await call(web_relay, "GET", "/stats", token="viewer", params={"window": "2h"})
    assert (status, body["field"]) == (400, "window")
    twice = [("window", "1h"), ("window", "x")]  # once a 500 (found by the OpenAPI fuzzer)
    status, body = await call(web_relay, "GET", "/stats", token="viewer", params=twice)
    assert (status, body["field"]) == (400, "window"), body


async def test_a_pause_is_in_force_in_this_process_when_the_answer_arrives(
    web_relay: Relay,
) -> None:
    """No window in which the serving process still sends through a paused upstream."""
    [state] = web_relay.router.states
    for action, expected in (("pause", True), ("resume", False)):
        status, _ = await call(web_relay, "POST", f"/upstreams/outbox/{action}")
        assert status == 200 and state.paused is expected


# Header values the email package's parser raises on (IndexError, AttributeError,
# UnboundLocalError in CPython 3.11) rather than recording a defect. Mail from the
# internet (inbound) can carry any of them.
BROKEN_HEADERS = (
    b"From: \xff@[ \r\n",
    b'To: "a:)"\\=?utf-8?q?@\r\n',
    b"Message-ID: <@>[(=?utf-8?q?\r\n",
    b"Cc: @[,=?a@[\xff\r\n",
)


def test_a_header_the_parser_fails_on_is_shown_as_stored() -> None:
    from relay.message import header_summary

    for line in BROKEN_HEADERS:
        summary = header_summary(line + b"Subject: still read\r\n\r\nbody\r\n")
        name = line.partition(b":")[0].decode()
        assert summary["Subject"] == "still read"
        shown = summary[name]
        assert shown is not None and shown.encode("utf-8")  # text a page can write
        assert shown == line.partition(b": ")[2].strip().decode("utf-8", "replace")


async def test_a_message_with_headers_the_parser_fails_on_can_be_opened(
    web_relay: Relay,
) -> None:
    from tests.web.test_pages import client, log_in

    status, _ = await call(web_relay, "POST", "/upstreams/outbox/pause")
    assert status == 200  # the body stays stored, so its headers are shown
    raw = b"".join(BROKEN_HEADERS) + b"Subject: broken\r\n\r\nbody\r\n"
    status, body = await call(
        web_relay,
        "POST",
        "/messages",
        data=raw,
        params={"from": "app@example.com", "to": "a@example.org"},
        headers={"Content-Type": "message/rfc822"},
    )
    assert status == 202, body
    status, detail = await call(web_relay, "GET", f"/messages/{body['id']}")
    assert status == 200, detail
    assert detail["headers"]["Subject"] == "broken"
    async with client() as session:
        await log_in(session, web_relay, "viewer")
        async with session.get(f"{base_url(web_relay)}/messages/{body['id']}") as r:
            assert r.status == 200 and "broken" in await r.text()
