"""SparkPost's event webhooks: batches built as SparkPost sends them (an array of msys
objects), authenticated by HTTP Basic and/or the token header, read into ProviderEvents;
wrong or missing credentials refused before the body is read."""

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
from relay.events.registry import create_webhook
from relay.events.sparkpost import TOKEN_HEADER, SparkPostWebhook, SparkPostWebhookSettings
from tests.conftest import RelayFactory, relay_config
from tests.events.conftest import NOW, request

T = int(NOW.timestamp())
USER, PASSWORD = "sparkpost", "correct horse battery staple"
TRANSMISSION_ID = "84000000000000001"


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def hook(context: WebhookContext) -> SparkPostWebhook:
    upstream = UpstreamConfig(name="sparkpost", type="sparkpost", events=True)
    settings = build(SparkPostWebhookSettings, {"user": USER, "password": PASSWORD})
    return SparkPostWebhook.from_config(upstream, settings, context)


def posted(batch: list[Any], headers: dict[str, str] | None = None) -> WebhookRequest:
    """The POST SparkPost makes, with the Basic credentials unless others are given."""
    head = {"Content-Type": "application/json", "X-MessageSystems-Batch-ID": "77c2b630-d3ad"}
    head.update(basic() if headers is None else headers)
    return request(json.dumps(batch).encode(), head)


def sp_event(kind: str, n: int, group: str = "message_event", **fields: Any) -> dict[str, Any]:
    """One msys item with the fields SparkPost's documented samples carry."""
    doc: dict[str, Any] = {
        "type": kind,
        "event_id": f"9235692769381385{n}",
        "timestamp": str(T - 60 + n),
        "transmission_id": TRANSMISSION_ID,
        "message_id": "000443ee14578172be22",
        "customer_id": "1",
        "rcpt_to": "alice@example.org",
        "raw_rcpt_to": "Alice@Example.org",
        "rcpt_type": "to",
        "rcpt_meta": {"relay_id": "01HXRELAYID"},
        "rcpt_tags": [],
        "msg_from": "bounces@example.com",
        "friendly_from": "billing@example.com",
        "subject": "Invoice 42",
        "routing_domain": "example.org",
        "ip_pool": "default",
        "sending_ip": "127.0.0.1",
    }
    doc.update(fields)
    return {"msys": {group: doc}}


async def test_each_event_type_is_read_as_documented(hook: SparkPostWebhook) -> None:
    batch = [
        sp_event("injection", 1, msg_size="1337"),
        sp_event("delay", 2, reason="452 4.2.2 Mailbox full", num_retries="1"),
        sp_event("delivery", 3, queue_time="3213", num_retries="0"),
        sp_event(
            "bounce",
            4,
            bounce_class="10",
            error_code="550",
            reason="550 5.1.1 <alice@example.org>... User unknown",
            raw_reason="550 5.1.1 <Alice@Example.org>... User unknown",
        ),
        sp_event("bounce", 5, bounce_class="22", reason="552 5.2.2 Mailbox full"),
        sp_event("bounce", 6, bounce_class="51", reason="554 5.7.1 Spam blocked"),
        sp_event("out_of_band", 7, bounce_class="30", reason="550 no such user"),
        sp_event("spam_complaint", 8, fbtype="abuse", report_by="server.mbp.com"),
        sp_event(
            "policy_rejection",
            9,
            error_code="554",
            reason="554 5.7.1 Sending limit exceeded",
            remote_addr="127.0.0.1",
        ),
        sp_event(
            "policy_rejection",
            10,
            bounce_class="25",
            reason="550 5.7.1 Recipient address was suppressed due to customer policy",
        ),
        sp_event("generation_failure", 11, group="gen_event", reason="Message generation failed"),
        sp_event("generation_rejection", 12, group="gen_event", reason="rejected"),
        sp_event("list_unsubscribe", 13, group="unsubscribe_event", mailfrom="a@b.example"),
        sp_event("link_unsubscribe", 14, group="unsubscribe_event", user_agent="Mozilla/5.0"),
        sp_event("open", 15, group="track_event", user_agent="Mozilla/5.0"),
        sp_event("click", 16, group="track_event", target_link_url="https://example.com"),
        sp_event("relay_delivery", 17, group="relay_event"),
        sp_event("some_future_event", 18, group="future_event"),
    ]
    result = await hook.handle(posted(batch))
    assert result.answer is None
    got = [(e.event, e.provider_event, e.bounce, e.provider_fault, e.reason) for e in result.events]
    assert got == [
        ("processed", "injection", None, False, ""),
        ("deferred", "delay", None, False, "452 4.2.2 Mailbox full"),
        ("delivered", "delivery", None, False, ""),
        (
            "bounced",
            "bounce/10",
            "hard",
            False,
            "550 5.1.1 <Alice@Example.org>... User unknown",  # raw_reason, as given
        ),
        ("bounced", "bounce/22", "soft", False, "552 5.2.2 Mailbox full"),
        ("bounced", "bounce/51", "soft", False, "554 5.7.1 Spam blocked"),
        ("bounced", "out_of_band/30", "hard", False, "550 no such user"),
        ("complained", "spam_complaint", None, False, ""),
        ("rejected", "policy_rejection", None, True, "554 5.7.1 Sending limit exceeded"),
        (
            "rejected",
            "policy_rejection",
            None,
            False,  # SparkPost's suppression list: not re-sent elsewhere
            "550 5.7.1 Recipient address was suppressed due to customer policy",
        ),
        ("rejected", "generation_failure", None, True, "Message generation failed"),
        ("rejected", "generation_rejection", None, True, "rejected"),
        ("unsubscribed", "list_unsubscribe", None, False, ""),
        ("unsubscribed", "link_unsubscribe", None, False, ""),
    ]
    first = result.events[0]
    assert first.key == "sparkpost:92356927693813851"
    assert first.recipient == "Alice@Example.org"  # as we sent it (raw_rcpt_to)
    assert first.relay_id == "01HXRELAYID"
    assert first.provider_id == TRANSMISSION_ID  # the results.id the send API answered
    assert first.sender == "bounces@example.com"
    assert first.at == T - 59
    assert len({e.key for e in result.events}) == len(result.events)


@pytest.mark.parametrize(
    ("bounce_class", "bounce"),
    [
        ("1", "soft"),
        ("10", "hard"),
        ("20", "soft"),
        ("21", "soft"),
        ("24", "soft"),
        ("25", "soft"),
        ("30", "hard"),
        ("40", "soft"),
        ("50", "soft"),
        ("54", "soft"),
        ("60", "soft"),
        ("70", "soft"),
        ("90", "hard"),
        ("100", "soft"),
        (None, "soft"),
    ],
)
async def test_bounce_classes_say_hard_or_soft(
    hook: SparkPostWebhook, bounce_class: str | None, bounce: str
) -> None:
    item = sp_event("bounce", 1, reason="5xx something")
    if bounce_class is None:
        item["msys"]["message_event"].pop("bounce_class", None)
    else:
        item["msys"]["message_event"]["bounce_class"] = bounce_class
    (event,) = (await hook.handle(posted([item]))).events
    assert (event.event, event.bounce) == ("bounced", bounce)


async def test_the_test_ping_is_taken_with_no_events(hook: SparkPostWebhook) -> None:
    result = await hook.handle(posted([{"msys": {}}]))
    assert result.events == [] and result.answer is None


async def test_an_event_without_our_id_or_event_id_is_still_read(hook: SparkPostWebhook) -> None:
    item = sp_event("delivery", 1, rcpt_meta={})
    del item["msys"]["message_event"]["event_id"], item["msys"]["message_event"]["raw_rcpt_to"]
    (event,) = (await hook.handle(posted([item]))).events
    (again,) = (await hook.handle(posted([item]))).events
    assert event.relay_id is None and event.recipient == "alice@example.org"
    assert event.key.startswith("sparkpost:") and event.key == again.key


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "no HTTP Basic credentials"),
        (basic(password="wrong"), "do not match"),
        (basic(user="other"), "do not match"),
        ({"Authorization": "Bearer " + PASSWORD}, "no HTTP Basic credentials"),
        ({"Authorization": "Basic not-base64!"}, "no HTTP Basic credentials"),
    ],
)
async def test_wrong_or_missing_basic_credentials_are_refused(
    hook: SparkPostWebhook, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await hook.handle(posted([sp_event("delivery", 1)], headers))


async def test_credentials_are_checked_before_the_body_is_read(hook: SparkPostWebhook) -> None:
    with pytest.raises(Unauthenticated):
        await hook.handle(request(b"not json", basic(password="wrong")))


async def test_a_token_alone_or_with_basic_must_be_right(context: WebhookContext) -> None:
    upstream = UpstreamConfig(name="sparkpost", type="sparkpost", events=True)
    token_only = SparkPostWebhook.from_config(
        upstream, build(SparkPostWebhookSettings, {"token": "s3cr3t-token"}), context
    )
    both = SparkPostWebhook.from_config(
        upstream,
        build(
            SparkPostWebhookSettings,
            {"user": USER, "password": PASSWORD, "token": "s3cr3t-token"},
        ),
        context,
    )
    batch = [sp_event("delivery", 1)]
    assert (await token_only.handle(posted(batch, {TOKEN_HEADER: "s3cr3t-token"}))).events
    with pytest.raises(Unauthenticated, match=f"no {TOKEN_HEADER}"):
        await token_only.handle(posted(batch, {}))
    with pytest.raises(Unauthenticated, match=re.escape("does not match webhook.token")):
        await token_only.handle(posted(batch, {TOKEN_HEADER: "s3cr3t-tokeN"}))
    # Both configured: both needed.
    assert (await both.handle(posted(batch, {**basic(), TOKEN_HEADER: "s3cr3t-token"}))).events
    with pytest.raises(Unauthenticated, match=f"no {TOKEN_HEADER}"):
        await both.handle(posted(batch))
    with pytest.raises(Unauthenticated, match="no HTTP Basic"):
        await both.handle(posted(batch, {TOKEN_HEADER: "s3cr3t-token"}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"msys": {}}', "JSON array"),
        (b"[1]", "item 0 is not an object"),
        (b'[{"msys": []}]', "item 0 is not an object with an 'msys'"),
        (b'[{"msys": {"message_event": "x"}}]', "item 0: the event is not an object"),
        (b'[{"msys": {"message_event": {"rcpt_to": "a@example.org"}}}]', "no 'type'"),
    ],
)
async def test_a_body_that_is_not_sparkposts_is_malformed(
    hook: SparkPostWebhook, body: bytes, message: str
) -> None:
    with pytest.raises(Malformed, match=message):
        await hook.handle(request(body, basic()))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rcpt_to": None, "raw_rcpt_to": None}, "item 1: the delivery event has no 'rcpt_to'"),
        ({"timestamp": "soon"}, "item 1: timestamp"),
    ],
)
async def test_an_event_missing_what_it_is_about_is_malformed(
    hook: SparkPostWebhook, fields: dict[str, Any], message: str
) -> None:
    batch = [sp_event("delivery", 1), sp_event("delivery", 2, **fields)]
    with pytest.raises(Malformed, match=message):
        await hook.handle(posted(batch))


def sparkpost_upstream(webhook: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "sparkpost",
        "type": "sparkpost",
        "api_key": "env:TEST_SP_API_KEY",
        "base_url": "http://127.0.0.1:9",
        "events": True,
        "webhook": webhook,
    }


def test_config_with_credentials_from_the_environment_passes_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, context: WebhookContext
) -> None:
    monkeypatch.setenv("TEST_SP_API_KEY", "sp-api-key")
    monkeypatch.setenv("TEST_SP_HOOK_PASSWORD", PASSWORD)
    cfg = relay_config(
        tmp_path,
        upstream=[sparkpost_upstream({"user": USER, "password": "env:TEST_SP_HOOK_PASSWORD"})],
    )
    warnings = check(cfg)
    assert [w for w in warnings if "upstream" in w] == [
        "upstream[0].webhook.user: a literal secret in the config file; write env:NAME or"
        " file:PATH so it stays out of backups and version control"
    ]
    hook = create_webhook(cfg.upstream[0], "upstream[0]", context)
    assert isinstance(hook, SparkPostWebhook)
    assert (hook.name, hook.user, hook.password, hook.token) == ("sparkpost", USER, PASSWORD, "")


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({}, "upstream[0].webhook: SparkPost does not sign its webhooks"),
        ({"user": "env:TEST_SP_USER"}, "upstream[0].webhook: user and password go together"),
        ({"token": "env:TEST_SP_NOT_SET"}, "upstream[0].webhook.token: environment"),
        ({"tokne": "env:TEST_SP_USER"}, "upstream[0].webhook.tokne: unknown key"),
    ],
)
def test_config_without_a_credential_fails_check_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, webhook: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("TEST_SP_API_KEY", "sp-api-key")
    monkeypatch.setenv("TEST_SP_USER", USER)
    monkeypatch.delenv("TEST_SP_NOT_SET", raising=False)
    cfg = relay_config(tmp_path, upstream=[sparkpost_upstream(webhook)])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)


async def test_the_relays_endpoint_takes_a_batch_and_refuses_wrong_credentials(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the relay's own web server: the ping and a batch are 200, a request with the
    wrong password 401, a body that is not SparkPost's 400."""
    monkeypatch.setenv("TEST_SP_API_KEY", "sp-api-key")
    monkeypatch.setenv("TEST_SP_HOOK_USER", USER)
    monkeypatch.setenv("TEST_SP_HOOK_PASSWORD", PASSWORD)
    relay = await make_relay(
        upstream=[
            sparkpost_upstream(
                {"user": "env:TEST_SP_HOOK_USER", "password": "env:TEST_SP_HOOK_PASSWORD"}
            )
        ]
    )
    url = f"http://127.0.0.1:{relay.web_port}/webhooks/sparkpost"
    async with aiohttp.ClientSession() as session:
        batches: list[list[Any]] = [
            [{"msys": {}}],
            [sp_event("delivery", 1), sp_event("bounce", 2)],
        ]
        answers = []
        for batch in batches:
            async with session.post(url, json=batch, headers=basic()) as response:
                assert response.status == 200, await response.text()
                answers.append(await response.json())
        # Read and handed on; no message of this relay has that transmission id.
        assert [a["unmatched"] for a in answers] == [0, 2]
        wrong = basic(password="guess")
        async with session.post(url, json=[sp_event("delivery", 3)], headers=wrong) as response:
            assert response.status == 401
            assert "do not match" in (await response.json())["message"]
        async with session.post(url, data=b"{}", headers=basic()) as response:
            assert response.status == 400
