"""SES event publishing: events built as SES writes them (AWS developer guide, "Examples
of event data that Amazon SES publishes to Amazon SNS"), delivered SNS-wrapped and signed
with the test CA's SNS certificate (fetched over https from a loopback
`sns.eu-west-1.amazonaws.com`), or raw behind HTTP Basic; every forgery refused."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.checks import check
from relay.config import ConfigError, UpstreamConfig, build
from relay.events.base import (
    Forbidden,
    Malformed,
    Unauthenticated,
    Unavailable,
    WebhookContext,
    WebhookError,
)
from relay.events.ses import SESWebhook, SESWebhookSettings
from relay.inbound.sns import HTTPSFetcher
from tests.conftest import relay_config
from tests.events.conftest import NOW, MemoryReplayGuard, request
from tests.fakes.ses_inbound import (
    ACCOUNT,
    REGION,
    SNSCertServer,
    SNSSigner,
    sns_envelope,
    sns_timestamp,
)

TOPIC = f"arn:aws:sns:{REGION}:{ACCOUNT}:ses-events"
SES_ID = "0102018f3a7b1c2d-5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9-000000"
RELAY_ID = "01HXRELAYID"
USER, PASSWORD = "ses-events", "raw-pass:word"


def iso(seconds_before_now: float) -> str:
    return sns_timestamp(NOW - dt.timedelta(seconds=seconds_before_now))


def mail(*destination: str) -> dict[str, Any]:
    return {
        "timestamp": iso(120),
        "source": "Billing <billing@example.com>",
        "sourceArn": f"arn:aws:ses:{REGION}:{ACCOUNT}:identity/example.com",
        "sendingAccountId": ACCOUNT,
        "messageId": SES_ID,
        "destination": list(destination or ("alice@example.org",)),
        "headersTruncated": False,
        "tags": {
            "ses:configuration-set": ["relay"],
            "ses:source-ip": ["192.0.2.10"],
            "ses:from-domain": ["example.com"],
            "ses:caller-identity": ["relay"],
            "relay_id": [RELAY_ID],
        },
    }


def bounce(bounce_type: str, sub_type: str, *recipients: str) -> dict[str, Any]:
    return {
        "eventType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub_type,
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": f"smtp; 550 5.1.1 <{r}>: user unknown",
                }
                for r in recipients
            ],
            "timestamp": iso(60),
            "feedbackId": "0102018f3a7b1c2d-feedback-000000",
            "reportingMTA": "dsn; a1-2.smtp-out.eu-west-1.amazonses.com",
        },
        "mail": mail(*recipients),
    }


COMPLAINT: dict[str, Any] = {
    "eventType": "Complaint",
    "complaint": {
        "feedbackId": "0102018f-complaint-000000",
        "complaintSubType": None,
        "complainedRecipients": [{"emailAddress": "alice@example.org"}],
        "timestamp": iso(30),
        "userAgent": "Mozilla/5.0",
        "complaintFeedbackType": "abuse",
        "arrivalDate": iso(40),
    },
    "mail": mail(),
}
DELIVERY: dict[str, Any] = {
    "eventType": "Delivery",
    "delivery": {
        "timestamp": iso(100),
        "processingTimeMillis": 546,
        "recipients": ["alice@example.org", "bob@example.org"],
        "smtpResponse": "250 2.6.0 Message received",
        "reportingMTA": "a8-70.smtp-out.amazonses.com",
    },
    "mail": mail("alice@example.org", "bob@example.org"),
}
REJECT: dict[str, Any] = {
    "eventType": "Reject",
    "reject": {"reason": "Bad content"},
    "mail": mail(),
}
RENDERING_FAILURE: dict[str, Any] = {
    "eventType": "Rendering Failure",
    "failure": {
        "errorMessage": "Attribute 'attributeName' is not present in the rendering data.",
        "templateName": "MyTemplate",
    },
    "mail": mail(),
}
DELAY: dict[str, Any] = {
    "eventType": "DeliveryDelay",
    "deliveryDelay": {
        "timestamp": iso(50),
        "delayType": "TransientCommunicationFailure",
        "expirationTime": iso(-3600),
        "delayedRecipients": [
            {
                "emailAddress": "alice@example.org",
                "status": "4.4.1",
                "diagnosticCode": "smtp; 421 4.4.1 Unable to connect to remote host",
            }
        ],
    },
    "mail": mail(),
}
SEND: dict[str, Any] = {
    "eventType": "Send",
    "send": {},
    "mail": mail("alice@example.org", "bob@example.org"),
}


@pytest.fixture
async def fetcher(sns_cert_server: SNSCertServer) -> AsyncIterator[HTTPSFetcher]:
    f = sns_cert_server.fetcher()
    try:
        yield f
    finally:
        await f.close()


def make_hook(fetcher: HTTPSFetcher, **webhook: Any) -> SESWebhook:
    settings = build(SESWebhookSettings, webhook, "upstream[0].webhook")
    context = WebhookContext(clock=NOW.timestamp, first_use=MemoryReplayGuard(), fetch=fetcher)
    return SESWebhook.from_config(UpstreamConfig(name="ses", type="ses"), settings, context)


@pytest.fixture
async def hook(fetcher: HTTPSFetcher) -> AsyncIterator[SESWebhook]:
    h = make_hook(fetcher, topics=[TOPIC])
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def raw_hook(fetcher: HTTPSFetcher, monkeypatch: pytest.MonkeyPatch) -> SESWebhook:
    monkeypatch.setenv("TEST_SES_EVENTS_PASSWORD", PASSWORD)
    return make_hook(fetcher, user=USER, password="env:TEST_SES_EVENTS_PASSWORD")


def sns_body(
    signer: SNSSigner,
    event: dict[str, Any],
    *,
    topic: str = TOPIC,
    version: str = "1",
    age: float = 5,
    message_id: str | None = None,
) -> bytes:
    doc = sns_envelope(
        json.dumps(event), topic_arn=topic, timestamp=iso(age), message_id=message_id
    )
    return json.dumps(signer.sign(doc, version=version)).encode()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


Row = tuple[str, str, str, str | None, bool, str]


def rows(result_events: list[Any]) -> list[Row]:
    return [
        (e.event, e.recipient, e.provider_event, e.bounce, e.provider_fault, e.reason)
        for e in result_events
    ]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            bounce("Permanent", "General", "alice@example.org", "bob@example.org"),
            [
                (
                    "bounced",
                    "alice@example.org",
                    "Bounce/Permanent/General",
                    "hard",
                    False,
                    "smtp; 550 5.1.1 <alice@example.org>: user unknown",
                ),
                (
                    "bounced",
                    "bob@example.org",
                    "Bounce/Permanent/General",
                    "hard",
                    False,
                    "smtp; 550 5.1.1 <bob@example.org>: user unknown",
                ),
            ],
        ),
        (
            bounce("Transient", "MailboxFull", "alice@example.org"),
            [
                (
                    "bounced",
                    "alice@example.org",
                    "Bounce/Transient/MailboxFull",
                    "soft",
                    False,
                    "smtp; 550 5.1.1 <alice@example.org>: user unknown",
                )
            ],
        ),
        (
            bounce("Undetermined", "Undetermined", "alice@example.org"),
            [
                (
                    "bounced",
                    "alice@example.org",
                    "Bounce/Undetermined/Undetermined",
                    "soft",
                    False,
                    "smtp; 550 5.1.1 <alice@example.org>: user unknown",
                )
            ],
        ),
        (
            COMPLAINT,
            [("complained", "alice@example.org", "Complaint/abuse", None, False, "abuse")],
        ),
        (
            DELIVERY,
            [
                (
                    "delivered",
                    "alice@example.org",
                    "Delivery",
                    None,
                    False,
                    "250 2.6.0 Message received",
                ),
                (
                    "delivered",
                    "bob@example.org",
                    "Delivery",
                    None,
                    False,
                    "250 2.6.0 Message received",
                ),
            ],
        ),
        (REJECT, [("rejected", "alice@example.org", "Reject", None, True, "Bad content")]),
        (
            RENDERING_FAILURE,
            [
                (
                    "rejected",
                    "alice@example.org",
                    "RenderingFailure",
                    None,
                    True,
                    "Attribute 'attributeName' is not present in the rendering data."
                    " (template MyTemplate)",
                )
            ],
        ),
        (
            DELAY,
            [
                (
                    "deferred",
                    "alice@example.org",
                    "DeliveryDelay/TransientCommunicationFailure",
                    None,
                    False,
                    "smtp; 421 4.4.1 Unable to connect to remote host",
                )
            ],
        ),
        (
            SEND,
            [
                ("processed", "alice@example.org", "Send", None, False, ""),
                ("processed", "bob@example.org", "Send", None, False, ""),
            ],
        ),
        ({"eventType": "Open", "open": {"ipAddress": "192.0.2.1"}, "mail": mail()}, []),
        ({"eventType": "Click", "click": {"link": "https://x"}, "mail": mail()}, []),
        ({"eventType": "Subscription", "subscription": {}, "mail": mail()}, []),
        ({"notificationType": "AmazonSnsSubscriptionSucceeded", "message": "ok"}, []),
    ],
    ids=lambda v: v.get("eventType", v.get("notificationType")) if isinstance(v, dict) else "",
)
async def test_each_event_type_signed_through_sns_is_read_as_documented(
    hook: SESWebhook, sns_signer: SNSSigner, event: dict[str, Any], expected: list[Row]
) -> None:
    result = await hook.handle(request(sns_body(sns_signer, event, version="2")))
    assert result.answer is None
    assert rows(result.events) == expected
    for e in result.events:
        assert e.relay_id == RELAY_ID
        assert e.provider_id == SES_ID
        assert e.sender == "billing@example.com"
        assert e.key.startswith("ses:") and f":{e.recipient}" in e.key


async def test_times_and_keys_come_from_the_event(hook: SESWebhook, sns_signer: SNSSigner) -> None:
    event = bounce("Permanent", "General", "alice@example.org")
    (got,) = (await hook.handle(request(sns_body(sns_signer, event)))).events
    assert got.at == pytest.approx(NOW.timestamp() - 60)
    assert got.key == "ses:0102018f3a7b1c2d-feedback-000000:bounce:alice@example.org"
    (delivered, _) = (await hook.handle(request(sns_body(sns_signer, DELIVERY)))).events
    assert delivered.key == f"ses:{SES_ID}:delivery:alice@example.org"
    assert delivered.at == pytest.approx(NOW.timestamp() - 100)
    (rejected,) = (await hook.handle(request(sns_body(sns_signer, REJECT)))).events
    assert rejected.at == pytest.approx(NOW.timestamp() - 120)  # Reject has only mail's time


async def test_a_redelivered_notification_gives_the_same_keys(
    hook: SESWebhook, sns_signer: SNSSigner
) -> None:
    """SNS retries with the same event inside; a second SNS message id changes nothing."""
    event = bounce("Permanent", "General", "alice@example.org", "bob@example.org")
    first = await hook.handle(request(sns_body(sns_signer, event, message_id="m-1")))
    again = await hook.handle(request(sns_body(sns_signer, event, message_id="m-2", age=1)))
    assert [e.key for e in first.events] == [e.key for e in again.events]
    assert len({e.key for e in first.events}) == 2


async def test_a_second_delay_report_for_a_recipient_is_a_second_event(
    hook: SESWebhook, sns_signer: SNSSigner
) -> None:
    later = copy.deepcopy(DELAY)
    later["deliveryDelay"]["timestamp"] = iso(10)
    (first,) = (await hook.handle(request(sns_body(sns_signer, DELAY)))).events
    (second,) = (await hook.handle(request(sns_body(sns_signer, later)))).events
    assert first.key != second.key


async def test_the_older_identity_notification_form_is_read(
    hook: SESWebhook, sns_signer: SNSSigner
) -> None:
    event = bounce("Permanent", "NoEmail", "alice@example.org")
    event["notificationType"] = event.pop("eventType")
    del event["mail"]["tags"]  # identity notifications carry no message tags
    (got,) = (await hook.handle(request(sns_body(sns_signer, event)))).events
    assert (got.event, got.bounce, got.relay_id, got.provider_id) == (
        "bounced",
        "hard",
        None,
        SES_ID,
    )


async def test_subscription_confirmation_is_confirmed(
    hook: SESWebhook, sns_signer: SNSSigner, sns_cert_server: SNSCertServer
) -> None:
    doc = sns_envelope(
        "You have chosen to subscribe to the topic...",
        topic_arn=TOPIC,
        msg_type="SubscriptionConfirmation",
        timestamp=iso(2),
    )
    result = await hook.handle(request(json.dumps(sns_signer.sign(doc)).encode()))
    assert result.answer == {"status": "confirmed", "topic": TOPIC}
    assert result.events == []
    assert sns_cert_server.confirmations == [doc["Token"]]


async def test_unsubscribe_confirmation_is_acknowledged_only(
    hook: SESWebhook, sns_signer: SNSSigner, sns_cert_server: SNSCertServer
) -> None:
    doc = sns_envelope(
        "You have chosen to deactivate...",
        topic_arn=TOPIC,
        msg_type="UnsubscribeConfirmation",
        timestamp=iso(2),
    )
    result = await hook.handle(request(json.dumps(sns_signer.sign(doc)).encode()))
    assert result.answer == {"status": "ignored", "topic": TOPIC}
    assert sns_cert_server.confirmations == []


# -- SNS refusals ---------------------------------------------------------------------------


async def test_a_topic_not_allowed_is_forbidden_before_any_fetch(
    hook: SESWebhook, sns_signer: SNSSigner, sns_cert_server: SNSCertServer
) -> None:
    other = f"arn:aws:sns:{REGION}:{ACCOUNT}:someone-elses-topic"
    with pytest.raises(Forbidden, match="not in upstream 'ses'"):
        await hook.handle(request(sns_body(sns_signer, DELIVERY, topic=other)))
    assert sns_cert_server.requests == []


async def test_sns_without_topics_configured_is_forbidden_saying_what_to_set(
    raw_hook: SESWebhook, sns_signer: SNSSigner
) -> None:
    with pytest.raises(Forbidden, match="no topics are allowed: add it to topics"):
        await raw_hook.handle(request(sns_body(sns_signer, DELIVERY)))


async def test_a_tampered_message_is_refused(hook: SESWebhook, sns_signer: SNSSigner) -> None:
    doc = json.loads(sns_body(sns_signer, DELIVERY))
    doc["Message"] = doc["Message"].replace("Delivery", "Bounce")
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(request(json.dumps(doc).encode()))


async def test_a_message_signed_by_another_key_is_refused(hook: SESWebhook) -> None:
    with pytest.raises(Unauthenticated, match="does not verify"):
        await hook.handle(request(sns_body(SNSSigner(), DELIVERY)))


async def test_an_unsigned_sns_message_is_refused(hook: SESWebhook) -> None:
    doc = sns_envelope(json.dumps(DELIVERY), topic_arn=TOPIC, timestamp=iso(5))
    with pytest.raises(Unauthenticated, match="not signed"):
        await hook.handle(request(json.dumps(doc).encode()))


async def test_a_stale_sns_message_is_refused(hook: SESWebhook, sns_signer: SNSSigner) -> None:
    with pytest.raises(Unauthenticated, match="stale"):
        await hook.handle(request(sns_body(sns_signer, DELIVERY, age=3601)))


async def test_a_certificate_url_off_amazon_is_refused(
    hook: SESWebhook, sns_signer: SNSSigner, sns_cert_server: SNSCertServer
) -> None:
    doc = sns_envelope(json.dumps(DELIVERY), topic_arn=TOPIC, timestamp=iso(5))
    signed = sns_signer.sign(doc, cert_url="https://attacker.example/cert.pem")
    with pytest.raises(Unauthenticated, match="SigningCertURL host"):
        await hook.handle(request(json.dumps(signed).encode()))
    assert sns_cert_server.requests == []


async def test_a_certificate_that_cannot_be_fetched_is_unavailable(
    hook: SESWebhook, sns_signer: SNSSigner, sns_cert_server: SNSCertServer
) -> None:
    sns_cert_server.fail_cert = True
    with pytest.raises(Unavailable) as caught:
        await hook.handle(request(sns_body(sns_signer, DELIVERY)))
    assert caught.value.status == 503


# -- the raw form ---------------------------------------------------------------------------


async def test_a_raw_event_with_the_configured_credentials_is_read(raw_hook: SESWebhook) -> None:
    body = json.dumps(bounce("Permanent", "General", "alice@example.org")).encode()
    (got,) = (await raw_hook.handle(request(body, basic(USER, PASSWORD)))).events
    assert (got.event, got.bounce, got.relay_id) == ("bounced", "hard", RELAY_ID)


async def test_an_eventbridge_event_is_read(raw_hook: SESWebhook) -> None:
    wrapped = {
        "version": "0",
        "id": "9e5b3c4e-7f1a-4c2b-8d3e-0a1b2c3d4e5f",
        "detail-type": "Email Delivered",
        "source": "aws.ses",
        "account": ACCOUNT,
        "time": iso(90),
        "region": REGION,
        "resources": [f"arn:aws:ses:{REGION}:{ACCOUNT}:configuration-set/relay"],
        "detail": DELIVERY,
    }
    body = json.dumps(wrapped).encode()
    events = (await raw_hook.handle(request(body, basic(USER, PASSWORD)))).events
    assert [e.event for e in events] == ["delivered", "delivered"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        {"Authorization": "Bearer " + PASSWORD},
    ],
    ids=["none", "wrong-password", "wrong-user", "not-basic"],
)
async def test_a_raw_event_without_the_right_credentials_is_refused(
    raw_hook: SESWebhook, headers: dict[str, str]
) -> None:
    body = json.dumps(DELIVERY).encode()
    with pytest.raises(Unauthenticated):
        await raw_hook.handle(request(body, headers))


async def test_a_raw_event_without_credentials_configured_says_how_to_configure(
    hook: SESWebhook,
) -> None:
    body = json.dumps(DELIVERY).encode()
    with pytest.raises(Unauthenticated, match="set user and password") as caught:
        await hook.handle(request(body, basic(USER, PASSWORD)))
    assert caught.value.status == 401


# -- malformed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("not json at all", "the SNS Message is not JSON"),
        (["a list"], "is a JSON object"),
        ({"mail": mail()}, "eventType"),
        ({"eventType": "Bounce", "mail": mail()}, "'bounce' is missing"),
        ({"eventType": "Delivery", "delivery": {"timestamp": iso(1)}}, "'mail' is missing"),
        (
            {"eventType": "Bounce", "bounce": {"bounceType": "Permanent"}, "mail": mail()},
            "'bouncedRecipients' is missing",
        ),
        (
            {
                "eventType": "Complaint",
                "complaint": {"complainedRecipients": [{"email": "x"}]},
                "mail": mail(),
            },
            "'emailAddress' is missing",
        ),
        (
            {"eventType": "Delivery", "delivery": {"recipients": "alice"}, "mail": mail()},
            "not a list of addresses",
        ),
    ],
)
async def test_a_signed_body_that_is_not_an_ses_event_is_malformed(
    hook: SESWebhook, sns_signer: SNSSigner, event: Any, message: str
) -> None:
    message_text = event if isinstance(event, str) else json.dumps(event)
    doc = sns_envelope(message_text, topic_arn=TOPIC, timestamp=iso(5))
    with pytest.raises(Malformed, match=re.escape(message)):
        await hook.handle(request(json.dumps(sns_signer.sign(doc)).encode()))


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b'"text"'])
async def test_a_body_that_is_not_a_json_object_is_malformed(hook: SESWebhook, body: bytes) -> None:
    with pytest.raises(WebhookError) as caught:
        await hook.handle(request(body))
    assert isinstance(caught.value, Malformed) and caught.value.status == 400


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({}, "nothing could ever be accepted: set topics"),
        ({"user": "u"}, "user and password go together"),
        ({"user": "u", "password": "literal"}, "upstream[0].webhook.password: write env:NAME"),
        ({"topics": ["arn:aws:sns:eu-west-1:1:x"]}, "is not an SNS topic ARN"),
        ({"topics": [TOPIC], "max_age": "soon"}, "upstream[0].webhook.max_age"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_key(
    webhook: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(SESWebhookSettings, webhook, "upstream[0].webhook")


async def test_rendering_failure_is_read_in_either_spelling(
    hook: SESWebhook, sns_signer: SNSSigner
) -> None:
    event = dict(RENDERING_FAILURE, eventType="RenderingFailure")
    (got,) = (await hook.handle(request(sns_body(sns_signer, event)))).events
    assert (got.event, got.provider_fault) == ("rejected", True)
    assert got.key == f"ses:{SES_ID}:renderingfailure:alice@example.org"


def test_an_ses_upstream_with_events_is_checked_with_its_webhook_settings(
    tmp_path: Path,
) -> None:
    upstream = {"name": "ses", "type": "ses", "region": REGION, "events": True}
    check(relay_config(tmp_path, upstream=[dict(upstream, webhook={"topics": [TOPIC]})]))
    with pytest.raises(ConfigError, match=re.escape("upstream[0].webhook: nothing could")):
        check(relay_config(tmp_path, upstream=[upstream]))
