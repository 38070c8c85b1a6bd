"""The status page in a real browser (headless Chromium): what an operator does with it,
against a relay with an SMTP smarthost that can be made to refuse recipients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.app import Relay
from tests.conftest import RelayFactory, SMTPSink, smtp_upstream, wait_states
from tests.web.browser.conftest import PHONE, Browser, publish
from tests.web.conftest import send_mail, token_entries

BrowserFor = Callable[[Relay], Browser]


async def start(make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, **extra: Any) -> Relay:
    return await make_relay(
        upstream=[smtp_upstream(sink.port), *extra.pop("upstreams", [])],
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)},
        **extra,
    )


async def newest_id(relay: Relay) -> str:
    rows = await relay.queue.search(limit=1000)
    return max(r.id for r in rows)


async def test_an_operator_follows_a_message_from_smtp_to_its_upstream(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, browser_for: BrowserFor
) -> None:
    relay = await start(make_relay, sink, tmp_path)
    page = browser_for(relay)
    await page.get("/messages")
    assert (await page.path()).startswith("/login")
    await page.shot("login")
    await page.log_in()

    # Drain the smarthost, so the message waits where the operator can act on it.
    await page.get("/upstreams")
    await page.click("#up-smarthost button[type=submit]")
    await page.wait_for_text("smarthost: Paused")
    assert "paused" in await page.text("#up-smarthost")

    await page.get("/")
    await send_mail(relay, "Quarterly report")
    await wait_states(relay, deferred=1)  # tried once: no upstream takes it while paused
    # The overview refreshes itself: no reload between sending and seeing.
    await page.wait_for_text("Quarterly report", "#live")
    await page.shot("overview")

    await page.get("/messages")
    await page.fill("input[name=recipient]", "alice")
    await page.click("form.search button[type=submit]")
    await page.wait_for_text("Quarterly report", "table.messages")
    await page.shot("messages")
    await page.click_link("Quarterly report")
    assert (await page.path()).startswith("/messages/")
    await page.wait_for_text("Timeline", "main")
    assert "alice@example.org" in await page.text()

    await page.click("button[value=hold]")
    await page.wait_for_text("Held: no attempts until it is released.")
    assert "held" in await page.text(".heading")
    assert "by web:ops" in await page.text(".timeline")
    await page.click("button[value=release]")
    await page.wait_for_text("Released: it is queued again.")
    assert "Released" in await page.text(".timeline")

    await page.get("/upstreams")
    await page.click("#up-smarthost button[value=resume]")
    await page.wait_for_text("smarthost: Resumed")
    await page.shot("upstreams")
    await wait_states(relay, sent=1)  # what waited for an upstream goes when one is back

    await page.get("/messages?recipient=alice")
    await page.click_link("Quarterly report")
    await page.wait_for_text("sent", ".heading")
    timeline = await page.text(".timeline")
    assert "via smarthost" in timeline and "accepted" in timeline
    assert "Flushed" in timeline  # made due by the resume, "by web:ops"
    await page.shot("message")

    await page.get("/inbound")
    await page.wait_for_text("No inbound notifications yet.")
    await page.shot("inbound")


async def test_a_failed_message_is_retried_from_its_page(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, browser_for: BrowserFor
) -> None:
    sink.rcpt_replies["bob@example.org"] = "550 5.1.1 <bob@example.org>: no such user"
    relay = await start(make_relay, sink, tmp_path)
    page = browser_for(relay)
    await page.log_in()
    await send_mail(relay, "Invoice 42", to="bob@example.org")
    await wait_states(relay, failed=1)
    await page.wait_for_text("Invoice 42", "#live")
    assert "no such user" in await page.text("#live")
    await page.click_link("Invoice 42")
    await page.wait_for_text("550 5.1.1")
    assert "failed" in await page.text(".heading")

    del sink.rcpt_replies["bob@example.org"]
    await page.click("button[value=retry]")
    await page.wait_for_text("Queued again")
    await wait_states(relay, sent=1)
    await page.wait_for_text("sent", ".heading", reload=True)
    assert "Retry" in await page.text(".timeline")
    assert sink.messages[-1].rcpt_tos == ["bob@example.org"]


async def test_a_test_message_sent_from_the_page_arrives_and_can_be_deleted(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, browser_for: BrowserFor
) -> None:
    relay = await start(make_relay, sink, tmp_path)
    page = browser_for(relay)
    await page.log_in()
    await page.get("/send")
    await page.fill("input[name=from]", "ops@example.com")
    await page.fill("input[name=to]", "carol@example.org")
    await page.fill("input[name=subject]", "Checking the relay")
    await page.click("form.send button[type=submit]")
    await page.wait_for_text("Queued as")
    await page.shot("send")
    await page.click("#sent-link")
    await page.wait_for_text("Checking the relay", "h1")
    msg_id = (await page.path()).removeprefix("/messages/")
    await sink.wait_count(1)
    assert sink.messages[0].rcpt_tos == ["carol@example.org"]
    assert "Checking the relay" in sink.messages[0].parsed["Subject"]

    # Delete asks first: the button that deletes is hidden until "Delete…" is opened.
    confirm = await page.find("details.confirm button.danger")
    assert not await page.run(confirm.is_displayed)
    await page.click("details.confirm summary")
    await page.click("details.confirm button.danger")
    await page.wait_for_text("Deleted.")
    assert await relay.queue.get(msg_id) is None


async def test_a_script_subject_stays_text(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, browser_for: BrowserFor
) -> None:
    relay = await start(make_relay, sink, tmp_path)
    page = browser_for(relay)
    await page.log_in()
    subject = "<script>alert(1)</script>"
    await send_mail(relay, subject)
    await page.wait_for_text(subject, "#live")
    assert not await page.alert_open()
    await page.get("/messages")
    assert subject in await page.text("table.messages")
    await page.click_link("<script>")
    await page.wait_for_text(subject, "h1")
    assert not await page.alert_open()
    await page.shot("script-subject")


async def test_a_busy_relay_reads_well_at_desktop_and_phone_width(
    make_relay: RelayFactory, sink: SMTPSink, tmp_path: Path, browser_for: BrowserFor
) -> None:
    """Traffic with failover and failures, the pages at 1280 and 375 px (no sideways
    scrolling on a phone), and the screenshots the README shows."""
    backup = {"name": "backup", "type": "maildir", "path": str(tmp_path / "backup"), "priority": 2}
    relay = await start(make_relay, sink, tmp_path, upstreams=[backup])
    sink.rcpt_replies["dana@example.org"] = "451 4.3.0 mailbox busy, try later"
    sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 <nobody@example.org>: no such user"
    page = browser_for(relay)
    await page.log_in()
    recipients = ["erin@example.org", "frank@example.org", "dana@example.org", "grace@example.org"]
    for i in range(12):
        await send_mail(relay, f"Order confirmation #{1040 + i}", to=recipients[i % 4])
    await send_mail(relay, "Password reset", to="nobody@example.org")
    await send_mail(relay, "Weekly digest", to="dana@example.org")
    await wait_states(relay, sent=13, failed=1)
    # The charts fill in once the processes' counters reach the stats store.
    await page.wait_for_text("sent 13", "#live", timeout=30)
    await page.shot("overview")
    publish(await page.shot("overview-phone", width=PHONE))
    publish(tmp_path / "screenshots" / "overview.png")

    await page.get("/messages")
    await page.shot("messages")
    await page.click_link("Weekly digest")
    await page.wait_for_text("via backup", ".timeline")
    timeline = await page.text(".timeline")
    assert "via smarthost" in timeline and "451 4.3.0" in timeline
    publish(await page.shot("message"))
    publish(tmp_path / "screenshots" / "messages.png")
    await page.get("/upstreams")
    publish(await page.shot("upstreams"))

    for path in ("/", "/messages", "/upstreams", "/inbound", "/send"):
        await page.get(path)
        await page.set_width(PHONE, 800)
        assert not await page.overflows(), f"{path} scrolls sideways at {PHONE} px"
        await page.set_width(1280)
