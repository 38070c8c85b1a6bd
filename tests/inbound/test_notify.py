"""Notification shapes → InboundWork: SES (raw and SNS-wrapped), S3 events, the test event."""

from __future__ import annotations

import json

import pytest

from relay.inbound.notify import InboundWork, NotificationError, parse_notification
from tests.fakes.ses_inbound import S3_TEST_EVENT, s3_event, ses_received, sns_envelope


def test_ses_received_with_s3_action() -> None:
    doc = ses_received(
        "bucket-a",
        "inbound/abc123",
        message_id="abc123",
        recipients=["docs@example.com", "Ops@Example.com"],
        spam="FAIL",
        virus="PASS",
    )
    [work] = parse_notification(json.dumps(doc))
    assert work == InboundWork(
        bucket="bucket-a",
        key="inbound/abc123",
        origin="ses",
        recipients=("docs@example.com", "Ops@Example.com"),
        message_id="abc123",
        source="scanner@partner.example",
        spam_verdict="FAIL",
        virus_verdict="PASS",
        spf_verdict="PASS",
        dkim_verdict="PASS",
        dmarc_verdict="PASS",
    )
    assert work.is_spam and not work.has_virus
    assert work.dedupe_key == "ses:abc123"


def test_sns_wrapped_ses_notification_as_delivered_through_sqs() -> None:
    inner = ses_received("bucket-a", "inbound/xyz", message_id="xyz")
    wrapped = sns_envelope(json.dumps(inner), subject="Amazon SES Email Receipt Notification")
    [work] = parse_notification(json.dumps(wrapped).encode())
    assert (work.bucket, work.key, work.message_id) == ("bucket-a", "inbound/xyz", "xyz")


def test_same_message_twice_has_the_same_dedupe_key() -> None:
    a = parse_notification(ses_received("b", "p/m1", message_id="m1"))
    b = parse_notification(
        json.dumps(sns_envelope(json.dumps(ses_received("b", "p/m1", message_id="m1"))))
    )
    assert a[0].dedupe_key == b[0].dedupe_key


def test_s3_event_key_is_url_decoded() -> None:
    [work] = parse_notification(s3_event("bucket-b", "inbound/my scan+1 é.eml", etag="e1"))
    assert work.key == "inbound/my scan+1 é.eml"
    assert work.origin == "s3"
    assert work.recipients == ()
    assert work.etag == "e1"
    assert work.dedupe_key == "s3:bucket-b/inbound/my scan+1 é.eml@e1"


def test_s3_event_wrapped_in_sns() -> None:
    wrapped = sns_envelope(json.dumps(s3_event("bucket-b", "k")))
    [work] = parse_notification(wrapped)
    assert work.bucket == "bucket-b"


def test_s3_removal_events_are_ignored() -> None:
    assert parse_notification(s3_event("b", "k", event="ObjectRemoved:Delete")) == []


def test_s3_test_event_is_ignored() -> None:
    assert parse_notification(json.dumps(S3_TEST_EVENT)) == []
    assert parse_notification(sns_envelope(json.dumps(S3_TEST_EVENT))) == []


def test_work_round_trips_through_json() -> None:
    [work] = parse_notification(ses_received("b", "p/m1", message_id="m1"))
    assert InboundWork.from_dict(json.loads(json.dumps(work.to_dict()))) == work


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[]",
        json.dumps({"hello": "world"}),
        json.dumps({"notificationType": "Bounce", "mail": {}, "receipt": {}}),
        json.dumps({"Records": [{"eventSource": "aws:sqs"}]}),
        json.dumps(
            {
                "Records": [
                    {
                        "eventSource": "aws:s3",
                        "eventName": "ObjectCreated:Put",
                        "s3": {"bucket": {"name": "b"}, "object": {}},
                    }
                ]
            }
        ),
    ],
)
def test_unusable_payloads_raise(payload: str) -> None:
    with pytest.raises(NotificationError):
        parse_notification(payload)


def test_ses_notification_without_s3_action_says_why() -> None:
    doc = ses_received("b", "k", message_id="m")
    doc["receipt"]["action"] = {"type": "SNS", "topicArn": "arn:aws:sns:x", "encoding": "UTF8"}
    with pytest.raises(NotificationError, match="not S3"):
        parse_notification(doc)


def test_ses_notification_missing_bucket() -> None:
    doc = ses_received("b", "k", message_id="m")
    del doc["receipt"]["action"]["bucketName"]
    with pytest.raises(NotificationError, match="bucketName"):
        parse_notification(doc)
