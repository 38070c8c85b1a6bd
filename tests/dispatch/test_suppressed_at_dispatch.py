"""`[suppression] action = "bounce"`: a suppressed recipient is accepted, then failed at
dispatch with a report to the sender, while the others of the message go out."""

from __future__ import annotations

import aiosmtplib

from relay.queue.base import MessageQuery
from tests.conftest import RelayFactory, outbox, wait_states


async def test_a_suppressed_recipient_is_accepted_then_failed_with_a_report(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(
        suppression={"action": "bounce"}, retry={"bounces": True, "schedule": ["30s"]}
    )
    assert relay.suppression is not None
    entry = relay.suppression.entry(
        "hard_bounce", "gone@example.org", sender="", source="test", now=relay.clock()
    )
    await relay.suppression.add([entry])
    await aiosmtplib.send(
        "From: app@example.com\r\nSubject: two\r\n\r\nhello\r\n",
        sender="app@example.com",
        recipients=["gone@example.org", "here@example.org"],
        hostname="127.0.0.1",
        port=relay.smtp_ports()[0],
        start_tls=False,
    )
    # The message fails for the suppressed one (its other recipient is delivered), and the
    # report to the sender is the second message out.
    await wait_states(relay, failed=1, sent=1)
    (row,) = await relay.queue.search(state="failed")
    assert list(row.meta["rcpts_failed"]) == ["gone@example.org"]
    assert "suppression list" in row.meta["rcpts_failed"]["gone@example.org"]
    assert row.meta["rcpts_done"].keys() == {"here@example.org"}
    (report,) = await relay.queue.find(MessageQuery(kind="bounce"))
    assert report.meta["rcpts_original"] == ["app@example.com"]
    delivered = outbox(relay)  # (file times may tie: not in a given order)
    assert len(delivered) == 2
    assert sum(b"multipart/report" in d and b"gone@example.org" in d for d in delivered) == 1
