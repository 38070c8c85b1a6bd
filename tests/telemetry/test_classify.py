"""SMTP replies to the result label of relay_messages_received_total."""

from __future__ import annotations

import pytest

from relay.smtp import replies
from relay.telemetry.classify import reply_result


@pytest.mark.parametrize(
    ("reply", "result"),
    [
        (replies.QUEUED.format(id="x"), "accepted"),
        (replies.QUEUE_FULL, "deferred"),
        (replies.QUEUE_ERROR, "deferred"),
        (replies.MESSAGE_TOO_BIG.format(limit=10), "refused_size"),
        (replies.BARE_LINE_ENDING, "refused_content"),
        (replies.AUTH_REQUIRED, "refused_policy"),
        (replies.RELAY_DENIED.format(ip="192.0.2.1"), "refused_policy"),
        (replies.SENDER_NOT_ALLOWED.format(sender="a@b", user="u", allowed="*"), "refused_policy"),
        (replies.SENDER_SYNTAX, "refused_address"),
        (replies.NEED_RCPT, "refused_protocol"),
        ("554 Transaction failed", "refused_other"),
        ("550 5.99.1 strange", "refused_other"),
    ],
)
def test_reply_result(reply: str, result: str) -> None:
    assert reply_result(reply) == result
