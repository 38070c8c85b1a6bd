"""Mailgun's JSON event webhooks: bodies built as Mailgun sends them, signed with a real
HMAC-SHA256 over timestamp + token, read into ProviderEvents; forged, wrong-key, stale and
replayed requests refused before the event is read."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.checks import check
from relay.config import ConfigError, UpstreamConfig, build
from relay.events.base import Malformed, Unauthenticated, WebhookContext, WebhookRequest
from relay.events.mailgun import MailgunWebhook, MailgunWebhookSettings
from relay.events.registry import create_webhook
from relay.events.verify import hmac_sha256_hex
from tests.conftest import RelayFactory, relay_config
from tests.events.conftest import NOW, request

T = int(NOW.timestamp())
SIGNING_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
MG_MESSAGE_ID = "20240501115900.1.ABCDEF0123456789@mg.example.com"


@pytest.fixture
def hook(context: WebhookContext) -> MailgunWebhook:
    upstream = UpstreamConfig(name="mailgun", type="mailgun", events=True)
    settings = build(MailgunWebhookSettings, {"signing_key": SIGNING_KEY})
    return MailgunWebhook.from_config(upstream, settings, context)


def signed(
    event_data: dict[str, Any],
    *,
    key: str = SIGNING_KEY,
    timestamp: int = T - 5,
    token: str = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
) -> WebhookRequest:
    """The POST Mailgun makes: the signature over the timestamp's text + the token."""
    signature = {
        "timestamp": str(timestamp),
        "token": token,
        "signature": hmac_sha256_hex(key, f"{timestamp}{token}"),
    }
    body = json.dumps({"signature": signature, "event-data": event_data}).encode()
    return request(body, {"Content-Type": "application/json"})


def mg_event(event: str, n: int = 1, /, **fields: Any) -> dict[str, Any]:
    """An event-data object with the fields Mailgun's documented examples carry."""
    doc: dict[str, Any] = {
        "id": f"CPgfbmQMTCKtHW6uIWtuV{n}",
        "timestamp": T - 60 + n + 0.908181,
        "log-level": "info",
        "event": event,
        "recipient": "alice@example.org",
        "recipient-domain": "example.org",
        "tags": [],
        "campaigns": [],
        "envelope": {
            "transport": "smtp",
            "sender": "bounces@example.com",
            "sending-ip": "209.61.154.250",
            "targets": "alice@example.org",
        },
        "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
        "message": {
            "headers": {
                "to": "Alice <alice@example.org>",
                "message-id": MG_MESSAGE_ID,
                "from": "Billing <billing@example.com>",
                "subject": "Invoice 42",
            },
            "attachments": [],
            "size": 4711,
        },
        "user-variables": {"relay_id": "01HXRELAYID"},
    }
    doc.update(fields)
    return doc


def status(
    code: int, message: str = "", description: str = "", *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "description": description,
        "attempt-no": 1,
        "session-seconds": 0.43,
        **(extra or {}),
    }


async def test_a_delivery_is_read_with_every_field(hook: MailgunWebhook) -> None:
    data = mg_event("delivered", 3, **{"delivery-status": status(250, "OK", extra={"tls": True})})
    result = await hook.handle(signed(data))
    assert result.answer is None
    (event,) = result.events
    assert event.event == "delivered"
    assert event.key == "mailgun:CPgfbmQMTCKtHW6uIWtuV3"
    assert event.recipient == "alice@example.org"
    assert event.at == pytest.approx(T - 57.091819)
    assert event.relay_id == "01HXRELAYID"
    assert event.provider_id == MG_MESSAGE_ID  # as the send API answered it, without <>
    assert event.sender == "bounces@example.com"
    assert event.provider_event == "delivered"
    assert event.reason == "250 OK"
    assert (event.bounce, event.provider_fault) == (None, False)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (mg_event("accepted", method="http"), ("processed", None, False, "accepted", "")),
        (
            mg_event(
                "failed",
                severity="temporary",
                reason="generic",
                **{
                    "delivery-status": status(
                        452,
                        "4.2.2 The email account that you tried to reach is over quota.",
                        extra={"retry-seconds": 600},
                    )
                },
            ),
            (
                "deferred",
                None,
                False,
                "failed/temporary/generic",
                "452 4.2.2 The email account that you tried to reach is over quota.",
            ),
        ),
        (
            mg_event(
                "failed",
                severity="permanent",
                reason="bounce",
                **{
                    "delivery-status": status(
                        550, "5.1.1 The email account that you tried to reach does not exist."
                    )
                },
            ),
            (
                "bounced",
                "hard",
                False,
                "failed/permanent/bounce",
                "550 5.1.1 The email account that you tried to reach does not exist.",
            ),
        ),
        (
            mg_event(
                "failed",
                severity="permanent",
                reason="suppress-bounce",
                **{
                    "delivery-status": status(
                        605, description="Not delivering to previously bounced address"
                    )
                },
            ),
            (
                "bounced",
                "hard",
                False,
                "failed/permanent/suppress-bounce",
                "Not delivering to previously bounced address",
            ),
        ),
        (
            mg_event(
                "failed",
                severity="permanent",
                reason="suppress-complaint",
                **{"delivery-status": status(607, description="Not delivering to a complainer")},
            ),
            (
                "bounced",
                "hard",
                False,
                "failed/permanent/suppress-complaint",
                "Not delivering to a complainer",
            ),
        ),
        (
            mg_event(
                "failed",
                severity="permanent",
                reason="old",
                **{"delivery-status": status(421, "4.7.0 Try again later")},
            ),
            ("bounced", "soft", False, "failed/permanent/old", "421 4.7.0 Try again later"),
        ),
        (
            mg_event(
                "failed",
                severity="permanent",
                reason="generic",
                **{"delivery-status": status(0, description="Unable to send: internal error")},
            ),
            (
                "dropped",
                None,
                True,
                "failed/permanent/generic",
                "Unable to send: internal error",
            ),
        ),
        (mg_event("complained"), ("complained", None, False, "complained", "")),
        (mg_event("unsubscribed"), ("unsubscribed", None, False, "unsubscribed", "")),
    ],
    ids=[
        "accepted",
        "temporary",
        "hard",
        "suppress-bounce",
        "suppress-complaint",
        "gave-up",
        "never-attempted",
        "complained",
        "unsubscribed",
    ],
)
async def test_each_event_type_is_read_as_documented(
    hook: MailgunWebhook, data: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    (event,) = (await hook.handle(signed(data))).events
    assert (
        event.event,
        event.bounce,
        event.provider_fault,
        event.provider_event,
        event.reason,
    ) == expected
    assert (event.relay_id, event.provider_id) == ("01HXRELAYID", MG_MESSAGE_ID)


@pytest.mark.parametrize("kind", ["opened", "clicked", "stored", "some_future_event"])
async def test_events_that_are_not_about_delivery_are_skipped(
    hook: MailgunWebhook, kind: str
) -> None:
    result = await hook.handle(signed(mg_event(kind)))
    assert result.events == [] and result.answer is None


async def test_an_event_without_our_id_or_event_id_is_still_read(hook: MailgunWebhook) -> None:
    data = mg_event("delivered")
    del data["user-variables"], data["id"], data["message"]
    (first,) = (await hook.handle(signed(data, token="t" * 50))).events
    (again,) = (await hook.handle(signed(data, token="u" * 50))).events
    assert first.relay_id is None and first.provider_id is None
    assert first.key.startswith("mailgun:") and first.key == again.key  # the same event twice


async def test_a_forged_signature_is_refused(hook: MailgunWebhook) -> None:
    forged = json.loads(signed(mg_event("delivered")).body)
    forged["signature"]["signature"] = hmac_sha256_hex(SIGNING_KEY, "something else")
    with pytest.raises(Unauthenticated, match="signing key"):
        await hook.handle(request(json.dumps(forged).encode()))


async def test_a_signature_made_with_another_key_is_refused(hook: MailgunWebhook) -> None:
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(signed(mg_event("delivered"), key="the-api-key-instead"))


async def test_the_timestamp_is_signed_too(hook: MailgunWebhook) -> None:
    moved = json.loads(signed(mg_event("delivered"), timestamp=T - 3600).body)
    moved["signature"]["timestamp"] = str(T)  # made fresh again, signature kept
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(request(json.dumps(moved).encode()))


@pytest.mark.parametrize(
    ("timestamp", "message"), [(T - 601, "601s old"), (T + 301, "301s in the future")]
)
async def test_stale_and_future_timestamps_are_refused(
    hook: MailgunWebhook, timestamp: int, message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await hook.handle(signed(mg_event("delivered"), timestamp=timestamp))
    # Within the allowed window both ways, the same event is taken.
    assert (await hook.handle(signed(mg_event("delivered"), timestamp=T - 599))).events


async def test_a_replayed_token_is_refused(hook: MailgunWebhook) -> None:
    replayed = signed(mg_event("delivered"))
    assert len((await hook.handle(replayed)).events) == 1
    with pytest.raises(Unauthenticated, match="used before"):
        await hook.handle(replayed)
    # A new request from Mailgun (a new token) is taken.
    assert (await hook.handle(signed(mg_event("delivered"), token="b" * 50))).events


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "'signature' object"),
        (
            b"timestamp=1&token=x&signature=y&event=delivered&recipient=a%40example.org",
            "not JSON",
        ),
        (json.dumps({"signature": {"timestamp": str(T)}}).encode(), "needs string"),
    ],
)
async def test_a_body_that_is_not_mailguns_is_malformed(
    hook: MailgunWebhook, body: bytes, message: str
) -> None:
    with pytest.raises(Malformed, match=message):
        await hook.handle(request(body))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "'event-data' is missing"),
        ({"recipient": "a@example.org"}, "has no 'event'"),
        (mg_event("failed"), "severity temporary or permanent"),
        (mg_event("delivered", recipient=""), "has no 'recipient'"),
        (mg_event("delivered", timestamp="yesterday"), "timestamp"),
    ],
)
async def test_a_verified_body_without_a_readable_event_is_malformed(
    hook: MailgunWebhook, data: Any, message: str
) -> None:
    with pytest.raises(Malformed, match=message):
        await hook.handle(signed(data))


def mailgun_upstream(webhook: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "mailgun",
        "type": "mailgun",
        "api_key": "env:TEST_MG_API_KEY",
        "domain": "mg.example.com",
        "base_url": "http://127.0.0.1:9",
        "events": True,
        "webhook": webhook,
    }


def test_config_with_the_signing_key_from_the_environment_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, context: WebhookContext
) -> None:
    monkeypatch.setenv("TEST_MG_API_KEY", "key-api")
    monkeypatch.setenv("TEST_MG_SIGNING_KEY", SIGNING_KEY)
    cfg = relay_config(
        tmp_path,
        upstream=[mailgun_upstream({"signing_key": "env:TEST_MG_SIGNING_KEY", "max_age": "5m"})],
    )
    warnings = check(cfg)
    assert not [w for w in warnings if "upstream" in w]
    hook = create_webhook(cfg.upstream[0], "upstream[0]", context)
    assert isinstance(hook, MailgunWebhook)
    assert (hook.name, hook.signing_key, hook.max_age) == ("mailgun", SIGNING_KEY, 300.0)


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({}, "upstream[0].webhook.signing_key: required key is missing"),
        ({"signing_key": "env:TEST_MG_EMPTY"}, "upstream[0].webhook: signing_key is empty"),
        ({"signing_key": "env:TEST_MG_NOT_SET"}, "upstream[0].webhook.signing_key: environment"),
        (
            {"signing_key": "env:TEST_MG_API_KEY", "max_age": "0s"},
            "upstream[0].webhook: max_age must be a positive",
        ),
        (
            {"signing_key": "env:TEST_MG_API_KEY", "signing_secret": "x"},
            "upstream[0].webhook.signing_secret: unknown key",
        ),
    ],
)
def test_config_without_a_usable_signing_key_fails_check_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("TEST_MG_API_KEY", "key-api")
    monkeypatch.setenv("TEST_MG_EMPTY", "")
    monkeypatch.delenv("TEST_MG_NOT_SET", raising=False)
    cfg = relay_config(tmp_path, upstream=[mailgun_upstream(webhook)])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)


async def test_the_relays_endpoint_takes_a_signed_event_and_refuses_a_forged_one(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the relay's own web server: 200 for a signed event (of a message the relay
    does not know: still taken), 401 for a forgery, 400 for a body that is not Mailgun's."""
    monkeypatch.setenv("TEST_MG_API_KEY", "key-api")
    monkeypatch.setenv("TEST_MG_SIGNING_KEY", SIGNING_KEY)
    relay = await make_relay(
        upstream=[mailgun_upstream({"signing_key": "env:TEST_MG_SIGNING_KEY"})]
    )
    url = f"http://127.0.0.1:{relay.web_port}/webhooks/mailgun"
    good = signed(mg_event("delivered"), timestamp=int(time.time()))
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=good.body, headers=dict(good.headers)) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["unmatched"] == 1
        forged = signed(mg_event("delivered"), key="not-the-key", timestamp=int(time.time()))
        async with session.post(url, data=forged.body, headers=dict(forged.headers)) as response:
            assert response.status == 401
            assert "does not verify" in (await response.json())["message"]
        async with session.post(url, data=b"{}") as response:
            assert response.status == 400
