"""Postmark's webhooks: records built as Postmark sends them (one JSON object per POST,
HTTP Basic credentials from the webhook URL), read into ProviderEvents; wrong or missing
credentials refused before the body is read."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.checks import check
from relay.config import ConfigError, UpstreamConfig, build
from relay.events.base import Malformed, Unauthenticated, WebhookContext, WebhookRequest
from relay.events.postmark import PostmarkWebhook, PostmarkWebhookSettings
from relay.events.registry import create_webhook
from tests.conftest import RelayFactory, relay_config
from tests.events.conftest import NOW, request

USER, PASSWORD = "postmark", "correct horse battery staple"
PM_MESSAGE_ID = "883953f4-6105-42a2-a16a-77a8eac79483"
AT = "2024-05-01T11:59:54.9070259Z"  # Postmark's 7 fractional digits
AT_EPOCH = NOW.timestamp() - 5.092975


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def hook(context: WebhookContext) -> PostmarkWebhook:
    upstream = UpstreamConfig(name="postmark", type="postmark", events=True)
    settings = build(PostmarkWebhookSettings, {"user": USER, "password": PASSWORD})
    return PostmarkWebhook.from_config(upstream, settings, context)


def posted(record: dict[str, Any], headers: dict[str, str] | None = None) -> WebhookRequest:
    head = {"Content-Type": "application/json"}
    head.update(basic() if headers is None else headers)
    return request(json.dumps(record).encode(), head)


def delivery(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "RecordType": "Delivery",
        "ServerID": 23,
        "MessageStream": "outbound",
        "MessageID": PM_MESSAGE_ID,
        "Recipient": "alice@example.org",
        "Tag": "",
        "DeliveredAt": AT,
        "Details": "smtp;250 2.0.0 OK 1714564794 a1si123",
        "Metadata": {"relay_id": "01HXRELAYID"},
    }
    doc.update(fields)
    return doc


def bounce(kind: str, type_code: int, record_type: str = "Bounce", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "RecordType": record_type,
        "MessageStream": "outbound",
        "ID": 4323372036854775807,
        "Type": kind,
        "TypeCode": type_code,
        "Name": kind,
        "Tag": "",
        "MessageID": PM_MESSAGE_ID,
        "Metadata": {"relay_id": "01HXRELAYID"},
        "ServerID": 23,
        "Description": "The server was unable to deliver your message.",
        "Details": f"smtp;550 {kind} details",
        "Email": "alice@example.org",
        "From": "bounces@example.com",
        "BouncedAt": AT,
        "DumpAvailable": True,
        "Inactive": kind in ("HardBounce", "SpamComplaint"),
        "CanActivate": True,
        "Subject": "Invoice 42",
    }
    doc.update(fields)
    return doc


def subscription_change(suppress: bool, reason: str | None) -> dict[str, Any]:
    return {
        "RecordType": "SubscriptionChange",
        "MessageID": PM_MESSAGE_ID,
        "ServerID": 23,
        "MessageStream": "outbound",
        "ChangedAt": AT,
        "Recipient": "alice@example.org",
        "Origin": "Recipient",
        "SuppressSending": suppress,
        "SuppressionReason": reason,
        "Tag": "",
        "Metadata": {"relay_id": "01HXRELAYID"},
    }


async def test_a_delivery_is_read_with_every_field(hook: PostmarkWebhook) -> None:
    (event,) = (await hook.handle(posted(delivery()))).events
    assert event.event == "delivered"
    assert event.key == f"postmark:Delivery:{PM_MESSAGE_ID}:alice@example.org"
    assert event.recipient == "alice@example.org"
    assert event.at == pytest.approx(AT_EPOCH)
    assert event.relay_id == "01HXRELAYID"
    assert event.provider_id == PM_MESSAGE_ID  # the MessageID the send API answered
    assert event.provider_event == "Delivery"
    assert event.reason == "smtp;250 2.0.0 OK 1714564794 a1si123"
    assert (event.bounce, event.provider_fault, event.sender) == (None, False, None)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (bounce("HardBounce", 1), ("bounced", "hard", "Bounce/HardBounce")),
        (bounce("BadEmailAddress", 100000), ("bounced", "hard", "Bounce/BadEmailAddress")),
        (bounce("ManuallyDeactivated", 100002), ("bounced", "hard", "Bounce/ManuallyDeactivated")),
        (bounce("SoftBounce", 4096), ("bounced", "soft", "Bounce/SoftBounce")),
        (bounce("Transient", 2), ("bounced", "soft", "Bounce/Transient")),
        (bounce("DnsError", 256), ("bounced", "soft", "Bounce/DnsError")),
        (bounce("Blocked", 100006), ("bounced", "soft", "Bounce/Blocked")),
        (bounce("Unknown", 2048), ("bounced", "soft", "Bounce/Unknown")),
        (bounce("SpamNotification", 512), ("complained", None, "Bounce/SpamNotification")),
        (bounce("Unsubscribe", 16), ("unsubscribed", None, "Bounce/Unsubscribe")),
        (
            bounce("SpamComplaint", 100001, record_type="SpamComplaint"),
            ("complained", None, "SpamComplaint"),
        ),
        (
            subscription_change(True, "ManualSuppression"),
            ("unsubscribed", None, "SubscriptionChange/ManualSuppression"),
        ),
    ],
    ids=lambda v: v[2] if isinstance(v, tuple) else None,
)
async def test_each_record_type_is_read_as_documented(
    hook: PostmarkWebhook, record: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    (event,) = (await hook.handle(posted(record))).events
    assert (event.event, event.bounce, event.provider_event) == expected
    assert (event.recipient, event.relay_id, event.provider_id) == (
        "alice@example.org",
        "01HXRELAYID",
        PM_MESSAGE_ID,
    )
    assert event.at == pytest.approx(AT_EPOCH)
    assert event.provider_fault is False


async def test_a_bounce_keeps_the_remote_servers_words_and_its_id(hook: PostmarkWebhook) -> None:
    (event,) = (await hook.handle(posted(bounce("HardBounce", 1)))).events
    assert event.reason == "smtp;550 HardBounce details"
    assert event.key == "postmark:Bounce:4323372036854775807:alice@example.org"
    assert event.sender == "bounces@example.com"
    record = bounce("HardBounce", 1, Details="")
    (event,) = (await hook.handle(posted(record))).events
    assert event.reason == "The server was unable to deliver your message."


@pytest.mark.parametrize(
    "record",
    [
        bounce("AutoResponder", 64),
        bounce("AddressChange", 128),
        bounce("ChallengeVerification", 16384),
        subscription_change(True, "HardBounce"),  # the Bounce record reports it
        subscription_change(True, "SpamComplaint"),
        subscription_change(False, None),  # reactivated
        {"RecordType": "Open", "MessageID": PM_MESSAGE_ID, "Recipient": "alice@example.org"},
        {"RecordType": "Click", "MessageID": PM_MESSAGE_ID, "Recipient": "alice@example.org"},
        {"RecordType": "SomethingNew"},
    ],
)
async def test_records_that_are_not_about_delivery_are_skipped(
    hook: PostmarkWebhook, record: dict[str, Any]
) -> None:
    result = await hook.handle(posted(record))
    assert result.events == [] and result.answer is None


async def test_a_record_without_our_id_is_still_read(hook: PostmarkWebhook) -> None:
    (event,) = (await hook.handle(posted(delivery(Metadata={})))).events
    assert event.relay_id is None and event.provider_id == PM_MESSAGE_ID


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "no HTTP Basic credentials"),
        (basic(password="wrong"), "do not match"),
        (basic(user="other"), "do not match"),
        ({"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()}, "no HTTP Basic"),
    ],
)
async def test_wrong_or_missing_credentials_are_refused(
    hook: PostmarkWebhook, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await hook.handle(posted(delivery(), headers))


async def test_credentials_are_checked_before_the_body_is_read(hook: PostmarkWebhook) -> None:
    with pytest.raises(Unauthenticated):
        await hook.handle(request(b"not json", {}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "one Postmark webhook object"),
        (b"{}", "no RecordType"),
        (json.dumps(bounce("", 1)).encode(), "needs its Type"),
        (json.dumps(delivery(Recipient=None)).encode(), "Delivery record has no Recipient"),
        (json.dumps(bounce("HardBounce", 1, Email="")).encode(), "Bounce record has no Email"),
        (json.dumps(delivery(DeliveredAt="2024-05-01 11:59")).encode(), "DeliveredAt"),
        (json.dumps(bounce("HardBounce", 1, BouncedAt=None)).encode(), "BouncedAt"),
    ],
)
async def test_a_body_that_is_not_postmarks_is_malformed(
    hook: PostmarkWebhook, body: bytes, message: str
) -> None:
    with pytest.raises(Malformed, match=message):
        await hook.handle(request(body, basic()))


def postmark_upstream(webhook: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "postmark",
        "type": "postmark",
        "api_key": "env:TEST_PM_SERVER_TOKEN",
        "base_url": "http://127.0.0.1:9",
        "events": True,
        "webhook": webhook,
    }


def test_config_with_credentials_from_the_environment_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, context: WebhookContext
) -> None:
    monkeypatch.setenv("TEST_PM_SERVER_TOKEN", "pm-server-token")
    monkeypatch.setenv("TEST_PM_HOOK_USER", USER)
    monkeypatch.setenv("TEST_PM_HOOK_PASSWORD", PASSWORD)
    cfg = relay_config(
        tmp_path,
        upstream=[
            postmark_upstream(
                {"user": "env:TEST_PM_HOOK_USER", "password": "env:TEST_PM_HOOK_PASSWORD"}
            )
        ],
    )
    warnings = check(cfg)
    assert not [w for w in warnings if "upstream" in w]
    hook = create_webhook(cfg.upstream[0], "upstream[0]", context)
    assert isinstance(hook, PostmarkWebhook)
    assert (hook.name, hook.user, hook.password) == ("postmark", USER, PASSWORD)


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({}, "upstream[0].webhook.user: required key is missing"),
        ({"user": "env:TEST_PM_HOOK_USER"}, "upstream[0].webhook.password: required key"),
        (
            {"user": "env:TEST_PM_HOOK_USER", "password": "env:TEST_PM_EMPTY"},
            "upstream[0].webhook: password is empty",
        ),
        (
            {"user": "env:TEST_PM_HOOK_USER", "password": "env:TEST_PM_NOT_SET"},
            "upstream[0].webhook.password: environment",
        ),
    ],
)
def test_config_without_credentials_fails_check_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("TEST_PM_SERVER_TOKEN", "pm-server-token")
    monkeypatch.setenv("TEST_PM_HOOK_USER", USER)
    monkeypatch.setenv("TEST_PM_EMPTY", "")
    monkeypatch.delenv("TEST_PM_NOT_SET", raising=False)
    cfg = relay_config(tmp_path, upstream=[postmark_upstream(webhook)])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)


async def test_the_relays_endpoint_takes_a_record_and_refuses_wrong_credentials(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the relay's own web server, with the credentials in the URL as Postmark is
    configured: 200 for a record, 401 for a wrong password, 400 for a body that is not
    Postmark's."""
    monkeypatch.setenv("TEST_PM_SERVER_TOKEN", "pm-server-token")
    monkeypatch.setenv("TEST_PM_HOOK_USER", USER)
    monkeypatch.setenv("TEST_PM_HOOK_PASSWORD", PASSWORD)
    relay = await make_relay(
        upstream=[
            postmark_upstream(
                {"user": "env:TEST_PM_HOOK_USER", "password": "env:TEST_PM_HOOK_PASSWORD"}
            )
        ]
    )
    port = relay.web_port
    async with aiohttp.ClientSession() as session:
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/webhooks/postmark"
        async with session.post(url, json=bounce("HardBounce", 1)) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["unmatched"] == 1
        async with session.post(url, data=b"[]") as response:
            assert response.status == 400
        wrong = f"http://{USER}:guess@127.0.0.1:{port}/webhooks/postmark"
        async with session.post(wrong, json=delivery()) as response:
            assert response.status == 401
            assert "do not match" in (await response.json())["message"]
