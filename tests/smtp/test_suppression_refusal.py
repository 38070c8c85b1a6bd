"""A suppressed recipient is refused at RCPT TO (550 5.1.1 naming the entry and the way to
lift it) while the other recipients of the transaction go through, on the relay's own
listener; `action = "bounce"` and `enabled = false` let it in."""

from __future__ import annotations

import logging
import time

import pytest

from relay.app import Relay
from relay.queue.base import Suppression
from tests.conftest import RelayFactory
from tests.smtp.test_bad_input import RawSession


async def suppress(relay: Relay, address: str, scope: str = "") -> None:
    assert relay.suppression is not None
    await relay.suppression.add(
        [Suppression(address, scope, "hard_bounce", "sendgrid:ev-1", time.time())]
    )


async def session(relay: Relay, sender: str) -> RawSession:
    smtp = await RawSession.open(relay.smtp_ports()[0])
    assert (await smtp.cmd("EHLO client.test")).startswith("250")
    assert (await smtp.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
    return smtp


async def send_data(relay: Relay, smtp: RawSession) -> list[str]:
    """DATA for the accepted recipients; the recipients the queue holds."""
    assert (await smtp.cmd("DATA")).startswith("354")
    reply = await smtp.cmd(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    row = await relay.queue.get(reply.rsplit(" ", 1)[-1])
    assert row is not None
    await smtp.close()
    return list(row.meta["rcpts_original"])


async def test_suppressed_recipient_refused_others_accepted(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay()
    await suppress(relay, "gone@example.org")
    smtp = await session(relay, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<ok@example.org>")).startswith("250")
    with caplog.at_level(logging.INFO, "relay.smtp"):
        reply = await smtp.cmd("RCPT TO:<Gone@Example.org>")
    assert reply.startswith(
        "550 5.1.1 <Gone@Example.org>: recipient is on the suppression list (hard bounce on "
    ), reply
    assert "via sendgrid:ev-1" in reply
    assert "`relay suppression remove gone@example.org`" in reply
    refusals = [r.getMessage() for r in caplog.records if "NOQUEUE" in r.getMessage()]
    assert len(refusals) == 1
    assert "RCPT from [127.0.0.1]:" in refusals[0] and "to=<Gone@Example.org>" in refusals[0]
    assert await send_data(relay, smtp) == ["ok@example.org"]


async def test_only_recipient_suppressed_leaves_nothing_to_send(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await suppress(relay, "gone@example.org")
    smtp = await session(relay, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<gone@example.org>")).startswith("550 5.1.1")
    assert (await smtp.cmd("DATA")).startswith("503")  # no valid recipients
    await smtp.close()
    assert await relay.queue.counts() == {}


async def test_sender_domain_scope_refuses_that_domain_only(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await suppress(relay, "r@example.org", scope="example.com")
    smtp = await session(relay, "news@example.com")
    reply = await smtp.cmd("RCPT TO:<r@example.org>")
    assert reply.startswith("550 5.1.1") and "for mail from example.com" in reply
    assert "remove r@example.org --scope example.com" in reply
    await smtp.close()
    smtp = await session(relay, "app@other.example")
    assert (await smtp.cmd("RCPT TO:<r@example.org>")).startswith("250")
    assert await send_data(relay, smtp) == ["r@example.org"]


async def test_removed_address_is_accepted_again_at_once(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    await suppress(relay, "back@example.org")
    assert relay.suppression is not None
    assert await relay.suppression.remove("back@example.org") == 1
    smtp = await session(relay, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<back@example.org>")).startswith("250")
    assert await send_data(relay, smtp) == ["back@example.org"]


@pytest.mark.parametrize(
    "setting", [{"action": "bounce"}, {"enabled": False}], ids=["bounce", "disabled"]
)
async def test_not_refused_at_the_door(
    make_relay: RelayFactory, setting: dict[str, object]
) -> None:
    relay = await make_relay(suppression=setting)
    await suppress(relay, "gone@example.org")
    smtp = await session(relay, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<gone@example.org>")).startswith("250")
    assert await send_data(relay, smtp) == ["gone@example.org"]


async def test_a_host_of_a_cluster_refuses_what_another_suppressed(
    make_relay: RelayFactory, pg_dsn: str
) -> None:
    """Two relays on one PostgreSQL queue: an address one of them suppresses is refused by
    the other once it has followed the list (its poll, called here instead of waited for)."""
    first = await make_relay(server={"queue": pg_dsn})
    second = await make_relay(server={"queue": pg_dsn})
    await suppress(first, "gone@example.org")
    smtp = await session(second, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<gone@example.org>")).startswith("250")  # not yet seen
    await smtp.close()
    assert second.suppression is not None
    assert await second.suppression.refresh() is True
    smtp = await session(second, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<gone@example.org>")).startswith("550 5.1.1")
    await smtp.close()
    assert first.suppression is not None
    await first.suppression.remove("gone@example.org")
    await second.suppression.refresh()
    smtp = await session(second, "app@example.com")
    assert (await smtp.cmd("RCPT TO:<gone@example.org>")).startswith("250")
    await smtp.close()
