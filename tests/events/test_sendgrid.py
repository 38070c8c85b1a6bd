"""SendGrid's Signed Event Webhook: requests built as SendGrid sends them (a JSON array,
ECDSA P-256 over timestamp + body with a key made here), read into ProviderEvents; every
forgery, wrong key and stale timestamp refused before the body is read."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay.checks import check
from relay.config import ConfigError, UpstreamConfig, build
from relay.events.base import Malformed, Unauthenticated, WebhookContext, WebhookRequest
from relay.events.registry import create_webhook
from relay.events.sendgrid import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SendGridWebhook,
    SendGridWebhookSettings,
)
from tests.conftest import relay_config
from tests.events.conftest import NOW, request

T = int(NOW.timestamp())
SG_ID = "W0ZiYc5dQpCQo7I8yE6BsA"
SG_MESSAGE_ID = f"{SG_ID}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0"


def spki_base64(key: ec.EllipticCurvePrivateKey) -> str:
    """The verification key as SendGrid's settings page shows it."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def hook(key: ec.EllipticCurvePrivateKey, context: WebhookContext) -> SendGridWebhook:
    upstream = UpstreamConfig(name="sendgrid", type="sendgrid", events=True)
    settings = build(SendGridWebhookSettings, {"public_key": spki_base64(key)})
    return SendGridWebhook.from_config(upstream, settings, context)


def signed(
    body: bytes, key: ec.EllipticCurvePrivateKey, *, timestamp: int = T - 5
) -> WebhookRequest:
    """The request SendGrid makes: the signature over the timestamp's text + raw body."""
    signature = key.sign(str(timestamp).encode() + body, ec.ECDSA(hashes.SHA256()))
    return request(
        body,
        {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: base64.b64encode(signature).decode(),
            TIMESTAMP_HEADER: str(timestamp),
        },
    )


def sg_event(event: str, n: int, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "email": "alice@example.org",
        "timestamp": T - 60 + n,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
        "event": event,
        "category": ["newsletter"],
        "sg_event_id": f"sg-event-{n}",
        "sg_message_id": SG_MESSAGE_ID,
        "relay_id": "01HXRELAYID",
    }
    doc.update(fields)
    return doc


async def test_each_event_type_is_read_as_documented(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey
) -> None:
    batch = [
        sg_event("processed", 1, pool={"name": "new_MY_test", "id": 210}),
        sg_event("deferred", 2, response="400 try again later", attempt="5"),
        sg_event("delivered", 3, response="250 OK", ip="168.1.1.1", tls=1),
        sg_event(
            "bounce",
            4,
            reason="500 unknown recipient",
            status="5.0.0",
            type="bounce",
            bounce_classification="Invalid Address",
        ),
        sg_event("bounce", 5, reason="550 blocked by policy", status="5.7.1", type="blocked"),
        sg_event("dropped", 6, reason="Bounced Address", status="5.0.0"),
        sg_event("dropped", 7, reason="Spam Content (if spam checker app enabled)"),
        sg_event("spamreport", 8),
        sg_event("unsubscribe", 9),
        sg_event("group_unsubscribe", 10, asm_group_id=10),
        sg_event("open", 11, useragent="Mozilla/4.0", ip="255.255.255.255"),
        sg_event("click", 12, url="http://www.sendgrid.com/"),
        sg_event("group_resubscribe", 13, asm_group_id=10),
        sg_event("some_future_event", 14),
    ]
    result = await hook.handle(signed(json.dumps(batch).encode(), key))
    assert result.answer is None
    got = [(e.event, e.provider_event, e.bounce, e.provider_fault, e.reason) for e in result.events]
    assert got == [
        ("processed", "processed", None, False, ""),
        ("deferred", "deferred", None, False, "400 try again later"),
        ("delivered", "delivered", None, False, "250 OK"),
        ("bounced", "bounce/bounce", "hard", False, "500 unknown recipient"),
        ("bounced", "bounce/blocked", "soft", False, "550 blocked by policy"),
        ("dropped", "dropped", None, False, "Bounced Address"),
        ("dropped", "dropped", None, True, "Spam Content (if spam checker app enabled)"),
        ("complained", "spamreport", None, False, ""),
        ("unsubscribed", "unsubscribe", None, False, ""),
        ("unsubscribed", "group_unsubscribe", None, False, ""),
    ]
    first = result.events[0]
    assert first.key == "sendgrid:sg-event-1"
    assert first.recipient == "alice@example.org"
    assert first.relay_id == "01HXRELAYID"
    assert first.provider_id == SG_ID  # the X-Message-Id the send API answered
    assert first.at == T - 59
    assert len({e.key for e in result.events}) == len(result.events)


@pytest.mark.parametrize(
    ("reason", "providers_fault"),
    [
        ("Bounced Address", False),
        ("Spam Reporting Address", False),
        ("Unsubscribed Address", False),
        ("Invalid", False),
        ("Spam Content (if spam checker app enabled)", True),
        ("Exceeded Limit", True),
        ("Invalid SMTPAPI header", True),
        ("Recipient List over Package Quota", True),
        ("", True),
    ],
)
async def test_a_drop_is_the_providers_fault_unless_the_address_is_the_problem(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey, reason: str, providers_fault: bool
) -> None:
    body = json.dumps([sg_event("dropped", 1, reason=reason)]).encode()
    (event,) = (await hook.handle(signed(body, key))).events
    assert event.event == "dropped"
    assert event.provider_fault is providers_fault


async def test_an_event_without_our_id_or_provider_id_is_still_read(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey
) -> None:
    doc = sg_event("delivered", 1)
    del doc["relay_id"], doc["sg_message_id"]
    (event,) = (await hook.handle(signed(json.dumps([doc]).encode(), key))).events
    assert event.relay_id is None and event.provider_id is None


async def test_a_pem_public_key_is_taken_too(
    key: ec.EllipticCurvePrivateKey, context: WebhookContext
) -> None:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = build(SendGridWebhookSettings, {"public_key": pem.decode()})
    upstream = UpstreamConfig(name="sg", type="sendgrid", events=True)
    hook = SendGridWebhook.from_config(upstream, settings, context)
    body = json.dumps([sg_event("delivered", 1)]).encode()
    assert len((await hook.handle(signed(body, key))).events) == 1


# -- refused ------------------------------------------------------------------------------


async def test_a_tampered_body_is_refused(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey
) -> None:
    req = signed(json.dumps([sg_event("delivered", 1)]).encode(), key)
    forged = request(req.body.replace(b"delivered", b"bounce"), dict(req.headers))
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(forged)


async def test_a_signature_made_with_another_key_is_refused(hook: SendGridWebhook) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(signed(json.dumps([sg_event("delivered", 1)]).encode(), other))


async def test_the_timestamp_is_signed_too(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey
) -> None:
    req = signed(json.dumps([sg_event("delivered", 1)]).encode(), key)
    headers = dict(req.headers)
    headers[TIMESTAMP_HEADER] = str(T - 4)
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(request(req.body, headers))


@pytest.mark.parametrize(
    ("timestamp", "message"), [(T - 601, "601s old"), (T + 301, "in the future")]
)
async def test_stale_and_future_timestamps_are_refused(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey, timestamp: int, message: str
) -> None:
    body = json.dumps([sg_event("delivered", 1)]).encode()
    with pytest.raises(Unauthenticated, match=message):
        await hook.handle(signed(body, key, timestamp=timestamp))


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "unsigned request"),
        ({TIMESTAMP_HEADER: str(T)}, "unsigned request"),
        ({SIGNATURE_HEADER: "AAAA"}, "unsigned request"),
        ({SIGNATURE_HEADER: "AAAA", TIMESTAMP_HEADER: "yesterday"}, "not epoch seconds"),
        ({SIGNATURE_HEADER: "not base64!", TIMESTAMP_HEADER: str(T)}, "not base64"),
        ({SIGNATURE_HEADER: "AAAA", TIMESTAMP_HEADER: str(T)}, "does not verify"),
    ],
)
async def test_missing_or_broken_signature_headers_are_refused(
    hook: SendGridWebhook, headers: dict[str, str], message: str
) -> None:
    body = json.dumps([sg_event("delivered", 1)]).encode()
    with pytest.raises(Unauthenticated, match=message):
        await hook.handle(request(body, headers))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"event": "delivered"}', "JSON array"),
        (b'["delivered"]', r"event \[0\] is not a JSON object"),
        (b'[{"email": "a@example.org"}]', "no 'event' name"),
        (b'[{"event": "delivered", "sg_event_id": "x", "timestamp": 1}]', "'email'"),
        (b'[{"event": "bounce", "email": "a@b.c", "timestamp": 1}]', "'sg_event_id'"),
        (b'[{"event": "bounce", "email": "a@b.c", "sg_event_id": "x"}]', "timestamp"),
        (
            b'[{"event": "bounce", "email": "a@b.c", "sg_event_id": "x", "timestamp": 1,'
            b' "reason": 5}]',
            "'reason' is not a string",
        ),
    ],
)
async def test_a_verified_body_that_is_not_sendgrids_is_malformed(
    hook: SendGridWebhook, key: ec.EllipticCurvePrivateKey, body: bytes, message: str
) -> None:
    with pytest.raises(Malformed, match=message):
        await hook.handle(signed(body, key))


# -- configuration ------------------------------------------------------------------------


def sendgrid_upstream(webhook: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "sendgrid",
        "type": "sendgrid",
        "api_key": "env:TEST_SG_API_KEY",
        "events": True,
        "webhook": webhook,
    }


def test_config_with_the_public_key_from_the_environment_passes_check(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: ec.EllipticCurvePrivateKey,
    context: WebhookContext,
) -> None:
    monkeypatch.setenv("TEST_SG_API_KEY", "SG.test")
    monkeypatch.setenv("TEST_SG_EVENT_KEY", spki_base64(key))
    cfg = relay_config(
        tmp_path, upstream=[sendgrid_upstream({"public_key": "env:TEST_SG_EVENT_KEY"})]
    )
    warnings = check(cfg)
    assert not [w for w in warnings if "upstream" in w]  # no literal secret, nothing wrong
    hook = create_webhook(cfg.upstream[0], "upstream[0]", context)
    assert isinstance(hook, SendGridWebhook) and hook.name == "sendgrid"


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({}, "upstream[0].webhook.public_key: required key is missing"),
        ({"public_key": "env:TEST_SG_EVENT_KEY"}, "upstream[0].webhook: public_key: not a public"),
        ({"public_key": "env:TEST_SG_NOT_SET"}, "upstream[0].webhook.public_key: environment"),
    ],
)
def test_config_without_a_usable_public_key_fails_check_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("TEST_SG_API_KEY", "SG.test")
    monkeypatch.setenv("TEST_SG_EVENT_KEY", "bm90IGEga2V5")
    monkeypatch.delenv("TEST_SG_NOT_SET", raising=False)
    cfg = relay_config(tmp_path, upstream=[sendgrid_upstream(webhook)])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)


def test_a_key_on_another_curve_is_refused_at_check() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="not an ECDSA P-256 public key"):
        build(SendGridWebhookSettings, {"public_key": spki_base64(p384)}, "upstream[0].webhook")
