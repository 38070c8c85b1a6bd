"""SES upstream against a real moto server: raw bytes and the envelope reach SES intact."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from relay.config import Config, ConfigError, Duration, UpstreamConfig
from relay.message import Envelope
from relay.outcomes import PermanentError, TransientError
from relay.upstreams.registry import create_upstream
from relay.upstreams.ses import SESUpstream, classify
from tests.fakes.moto_server import REGION, MotoEndpoint

MESSAGE = (
    b"From: Billing <billing@example.com>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Cc: carol@dest.test\r\n"
    b"Subject: Invoice 42\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Please find the invoice attached.\r\n"
)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake keys from the environment, so no test reads ~/.aws or instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def sent_messages(endpoint: MotoEndpoint) -> dict[str, dict[str, Any]]:
    """What moto's SES recorded, by message id, read over its HTTP API."""
    with urllib.request.urlopen(f"{endpoint.url}/moto-api/data.json") as response:
        data = json.load(response)
    return {m["id"]: m for m in data["ses"]["RawMessage"]}


@pytest.fixture
async def ses(moto: MotoEndpoint) -> AsyncIterator[SESUpstream]:
    moto.client("sesv2").create_email_identity(EmailIdentity="example.com")
    upstream = SESUpstream(
        "ses",
        REGION,
        endpoint_url=moto.url,
        configuration_set="",
        tags={"app": "billing"},
        max_concurrency=4,
    )
    await upstream.start()
    yield upstream
    await upstream.close()


def capture_requests(upstream: SESUpstream) -> list[dict[str, Any]]:
    """The parameters of each SendEmail call, as boto3 was given them."""
    calls: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        calls.append(params)

    upstream._client.meta.events.register("provide-client-params.sesv2.SendEmail", hook)
    return calls


async def test_raw_bytes_and_every_envelope_recipient_reach_ses(
    ses: SESUpstream, moto: MotoEndpoint
) -> None:
    calls = capture_requests(ses)
    # dave is Bcc: in the envelope only. Carol is in Cc: but was never RCPT TO.
    envelope = Envelope("billing@example.com", ("bob@dest.test", "dave@hidden.test"))

    accepted = await ses.send(envelope, MESSAGE)

    assert accepted.provider_id
    assert not accepted.refused
    recorded = sent_messages(moto)[accepted.provider_id]
    assert recorded["raw_data"].encode() == MESSAGE
    assert recorded["source"] == "billing@example.com"
    assert {"bob@dest.test", "dave@hidden.test"} <= set(recorded["destinations"])
    # The request names exactly the envelope (moto adds header addresses on its own;
    # real SES sends only to Destination when it is given).
    (call,) = calls
    assert call["Destination"] == {"ToAddresses": ["bob@dest.test", "dave@hidden.test"]}
    assert call["FromEmailAddress"] == "billing@example.com"
    assert call["Content"]["Raw"]["Data"] == MESSAGE
    assert call["EmailTags"] == [{"Name": "app", "Value": "billing"}]
    assert "ConfigurationSetName" not in call


async def test_unverified_sender_fails_over_without_blaming_ses(ses: SESUpstream) -> None:
    envelope = Envelope("someone@unverified.test", ("bob@dest.test",))
    data = MESSAGE.replace(b"billing@example.com", b"someone@unverified.test")

    with pytest.raises(TransientError) as caught:
        await ses.send(envelope, data)

    # This sender's identity, not SES's health: fail over, keep SES for verified senders.
    assert caught.value.sender_scoped and not caught.value.upstream_wide
    assert not caught.value.ambiguous
    assert "MessageRejected" in caught.value.reason


async def test_null_sender_sends_without_from_email_address(
    ses: SESUpstream, moto: MotoEndpoint
) -> None:
    calls = capture_requests(ses)
    accepted = await ses.send(Envelope("", ("bob@dest.test",)), MESSAGE)
    assert "FromEmailAddress" not in calls[0]
    assert accepted.provider_id in sent_messages(moto)


async def test_the_relay_id_travels_as_a_message_tag(ses: SESUpstream, moto: MotoEndpoint) -> None:
    """SES copies a message's tags into every event it publishes: the way back to us."""
    calls = capture_requests(ses)
    envelope = Envelope("billing@example.com", ("bob@dest.test",), queue_id="01J5Z3K8Q9ABCDEFGHJK")

    accepted = await ses.send(envelope, MESSAGE)

    assert accepted.provider_id in sent_messages(moto)
    assert calls[0]["EmailTags"] == [
        {"Name": "app", "Value": "billing"},
        {"Name": "relay_id", "Value": "01J5Z3K8Q9ABCDEFGHJK"},
    ]


async def test_large_envelopes_are_sent_in_batches_of_fifty(
    ses: SESUpstream, moto: MotoEndpoint
) -> None:
    calls = capture_requests(ses)
    rcpts = tuple(f"user{i}@dest.test" for i in range(120))
    # Header recipients would count against moto's limit too; keep them out.
    data = b"From: billing@example.com\r\nSubject: many\r\n\r\nhi\r\n"

    accepted = await ses.send(Envelope("billing@example.com", rcpts), data)

    assert [len(c["Destination"]["ToAddresses"]) for c in calls] == [50, 50, 20]
    assert accepted.provider_id is not None
    ids = accepted.provider_id.split(",")
    recorded = sent_messages(moto)
    assert len(ids) == 3 and all(i in recorded for i in ids)
    assert {r for i in ids for r in recorded[i]["destinations"]} == set(rcpts)


async def test_smtputf8_recipient_is_refused_and_idn_domain_punycoded(ses: SESUpstream) -> None:
    calls = capture_requests(ses)
    envelope = Envelope(
        "billing@example.com", ("jürgen@dest.test", "bob@bücher.test"), smtputf8=True
    )
    accepted = await ses.send(envelope, MESSAGE)
    assert calls[0]["Destination"]["ToAddresses"] == ["bob@xn--bcher-kva.test"]
    refusal = accepted.refused["jürgen@dest.test"]
    assert not refusal.permanent and "SMTPUTF8" in refusal.reason


async def test_unreachable_endpoint_is_transient_and_not_ambiguous() -> None:
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = SESUpstream("ses", REGION, endpoint_url=f"http://127.0.0.1:{port}", timeout=5.0)
    await upstream.start()
    try:
        with pytest.raises(TransientError) as caught:
            await upstream.send(Envelope("a@example.com", ("b@dest.test",)), MESSAGE)
    finally:
        await upstream.close()
    assert caught.value.upstream_wide and not caught.value.ambiguous


@pytest.fixture
def throttling_server() -> Iterator[tuple[str, list[str]]]:
    """An endpoint that answers every request with SES's 429, counting the requests."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            body = b'{"message": "Maximum sending rate exceeded."}'
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-amzn-ErrorType", "TooManyRequestsException")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


async def test_throttling_is_not_retried_inside_boto3(
    throttling_server: tuple[str, list[str]],
) -> None:
    url, hits = throttling_server
    upstream = SESUpstream("ses", REGION, endpoint_url=url)
    await upstream.start()
    try:
        with pytest.raises(TransientError) as caught:
            await upstream.send(Envelope("a@example.com", ("b@dest.test",)), MESSAGE)
    finally:
        await upstream.close()
    # One request: the dispatcher, not boto3, decides whether to wait or fail over.
    assert hits == ["/v2/email/outbound-emails"]
    assert not caught.value.upstream_wide and caught.value.retry_after == 1.0


def test_already_signed_message_is_not_signed_again() -> None:
    upstream = SESUpstream("ses", REGION)
    assert upstream.should_dkim_sign(MESSAGE)
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n b=xyz\r\n" + MESSAGE
    assert not upstream.should_dkim_sign(signed)
    assert not upstream.should_dkim_sign(signed.replace(b"DKIM-Signature", b"dkim-signature"))
    assert {"message-id", "date"} <= upstream.dkim_skip_headers


# -- error classification ----------------------------------------------------------------------


def client_error(code: str, message: str, status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "SendEmail",
    )


@pytest.mark.parametrize(
    ("exc", "kind", "upstream_wide", "ambiguous"),
    [
        (
            client_error("TooManyRequestsException", "Too many requests", 429),
            TransientError,
            False,
            False,
        ),
        (
            client_error("Throttling", "Maximum sending rate exceeded."),
            TransientError,
            False,
            False,
        ),
        (
            client_error("MessageRejected", "Maximum send rate exceeded"),
            TransientError,
            False,
            False,
        ),
        (client_error("Throttling", "Daily message quota exceeded."), TransientError, True, False),
        (
            client_error("LimitExceededException", "Sending quota exceeded"),
            TransientError,
            True,
            False,
        ),
        (client_error("AccountSuspendedException", "suspended"), PermanentError, True, False),
        (client_error("SendingPausedException", "paused"), PermanentError, True, False),
        (client_error("AccountSendingPausedException", "paused"), PermanentError, True, False),
        (
            client_error("MailFromDomainNotVerifiedException", "not verified"),
            PermanentError,
            True,
            False,
        ),
        (
            client_error(
                "MessageRejected",
                "Email address is not verified. The following "
                "identities failed the check in region EU-WEST-1: a@x.test",
            ),
            TransientError,  # sender_scoped: fails over, SES stays up for verified senders
            False,
            False,
        ),
        (client_error("UnrecognizedClientException", "bad token"), PermanentError, True, False),
        (client_error("ExpiredTokenException", "expired"), TransientError, True, False),
        (client_error("MessageRejected", "Illegal header 'Foo'."), PermanentError, False, False),
        (
            client_error("MessageRejected", "Message length is more than 10485760 bytes long"),
            TransientError,
            False,
            False,
        ),
        (
            client_error("BadRequestException", "Missing final '@domain'"),
            PermanentError,
            False,
            False,
        ),
        (client_error("InternalFailure", "oops", 500), TransientError, False, False),
        (client_error("ServiceUnavailable", "down", 503), TransientError, False, False),
        (
            ReadTimeoutError(endpoint_url="https://email.eu-west-1.amazonaws.com"),
            TransientError,
            False,
            True,
        ),
        (
            ConnectTimeoutError(endpoint_url="https://email.eu-west-1.amazonaws.com"),
            TransientError,
            True,
            False,
        ),
        (
            EndpointConnectionError(endpoint_url="https://email.eu-west-1.amazonaws.com"),
            TransientError,
            True,
            False,
        ),
    ],
)
def test_error_mapping(
    exc: Exception, kind: type[Exception], upstream_wide: bool, ambiguous: bool
) -> None:
    error = classify(exc, upstream="ses")
    assert type(error) is kind
    assert error.upstream_wide is upstream_wide
    assert error.ambiguous is ambiguous
    assert error.reason.startswith("ses: ")


def test_throttling_suggests_a_short_wait_and_quota_a_long_one() -> None:
    rate = classify(client_error("Throttling", "Maximum sending rate exceeded."), upstream="s")
    quota = classify(client_error("Throttling", "Daily message quota exceeded."), upstream="s")
    assert isinstance(rate, TransientError) and isinstance(quota, TransientError)
    assert rate.retry_after is not None and quota.retry_after is not None
    assert rate.retry_after < 10 < quota.retry_after


# -- configuration -----------------------------------------------------------------------------


def test_built_from_config_through_the_registry() -> None:
    common = UpstreamConfig(
        name="ses-eu",
        type="ses",
        timeout=Duration(12.0),
        max_concurrency=8,
        options={
            "region": "eu-west-1",
            "configuration_set": "relay",
            "tags": {"env": "prod"},
            "max_attempts": 2,
        },
    )
    upstream = create_upstream(common, "upstream[0]", Config())
    assert isinstance(upstream, SESUpstream)
    assert (upstream.name, upstream.region, upstream.configuration_set) == (
        "ses-eu",
        "eu-west-1",
        "relay",
    )
    assert (upstream.tags, upstream.max_attempts, upstream.timeout) == ({"env": "prod"}, 2, 12.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "upstream[0].region: required key is missing"),
        ({"region": "eu-west-1", "tags": {"bad tag": "x"}}, "tags.bad tag"),
        ({"region": "eu-west-1", "max_attempts": 0}, "max_attempts"),
        ({"region": "eu-west-1", "tags": {"relay_id": "x"}}, "tags.relay_id: the relay sets"),
        ({"region": "eu-west-1", "regoin": "x"}, "regoin: unknown key"),
    ],
)
def test_bad_settings_name_the_key(options: dict[str, Any], message: str) -> None:
    common = UpstreamConfig(name="ses", type="ses", options=options)
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_upstream(common, "upstream[0]", Config())
