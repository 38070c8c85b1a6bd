"""relay.suppression: the per-process copy of the list and its policy, on a real shared.db
with two lists standing for two processes of one host."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import Duration, SuppressionConfig
from relay.queue.base import StoreError, Suppression
from relay.queue.sqlite.shared import SharedDB
from relay.queue.sqlite.suppression import SQLiteSuppressions
from relay.suppression import SuppressionList, refusal_reply


class WatchedStore(SQLiteSuppressions):
    """The real store, telling the test each time it is polled, and failing on demand."""

    def __init__(self, shared: SharedDB) -> None:
        super().__init__(shared)
        self.broken = False
        self.polls = 0
        self._polled = asyncio.Condition()

    async def changes(self, after: int) -> tuple[list[Suppression], list[tuple[str, str]], int]:
        try:
            if self.broken:
                raise StoreError("database is gone")
            return await super().changes(after)
        finally:
            async with self._polled:
                self.polls += 1
                self._polled.notify_all()

    async def polled(self, *, times: int) -> None:
        """Until `changes` was called `times` more times."""
        target = self.polls + times
        async with asyncio.timeout(10), self._polled:
            await self._polled.wait_for(lambda: self.polls >= target)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedDB]:
    db = SharedDB(tmp_path / "shared.db")
    yield db
    db.close()


def make_list(shared: SharedDB, clock: Clock, **config: object) -> SuppressionList:
    return SuppressionList(
        SQLiteSuppressions(shared),
        SuppressionConfig(**config),  # type: ignore[arg-type]
        clock=clock,
        poll_interval=0.01,
    )


async def test_an_add_is_seen_at_once_here_and_after_a_refresh_elsewhere(
    shared: SharedDB, clock: Clock
) -> None:
    here, there = make_list(shared, clock), make_list(shared, clock)
    await here.start()
    await there.start()
    entry = here.entry(
        "hard_bounce", "Bob@Example.org", sender="app@shop.example", source="t", now=clock()
    )
    await here.add([entry])
    assert here.check("BOB@example.org", "anyone@else.example") is entry
    assert there.check("bob@example.org", "app@shop.example") is None
    assert await there.refresh() is True
    assert there.check("bob@example.org", "app@shop.example") is not None
    assert await there.refresh() is False  # nothing new

    await there.remove("bob@example.org")
    assert there.check("bob@example.org", "app@shop.example") is None
    await here.refresh()
    assert here.check("bob@example.org", "app@shop.example") is None


async def test_run_follows_the_store(shared: SharedDB, clock: Clock) -> None:
    store = WatchedStore(shared)
    follower = SuppressionList(store, SuppressionConfig(), clock=clock, poll_interval=0.01)
    await follower.start()
    task = asyncio.create_task(follower.run())
    try:
        await SQLiteSuppressions(shared).add(
            [Suppression("c@example.org", "", "complaint", "t", clock())]
        )
        await store.polled(times=2)  # the add committed before the second poll began
        assert follower.check("c@example.org", "") is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_sender_domain_scope_and_expiry(shared: SharedDB, clock: Clock) -> None:
    sup = make_list(
        shared, clock, scope="sender_domain", expire_after={"hard_bounce": Duration(86400)}
    )
    await sup.start()
    entry = sup.entry(
        "hard_bounce", "r@example.org", sender="news@Shop.Example", source="t", now=clock()
    )
    assert entry.scope == "shop.example" and entry.expires == clock() + 86400
    await sup.add([entry])
    assert sup.check("r@example.org", "billing@shop.example") is entry
    assert sup.check("r@example.org", "app@other.example") is None
    assert sup.check("r@example.org", "") is None
    clock.now += 86400
    assert sup.check("r@example.org", "billing@shop.example") is None
    # A complaint has no expiry configured: it lasts.
    complaint = sup.entry("complaint", "r@example.org", sender="", source="t", now=clock())
    assert complaint.scope == "" and complaint.expires is None


async def test_disabled_list_suppresses_nothing(shared: SharedDB, clock: Clock) -> None:
    sup = make_list(shared, clock, enabled=False)
    await sup.start()
    await sup.add([Suppression("r@example.org", "", "manual", "t", clock())])
    assert sup.check("r@example.org", "a@b.example") is None
    assert not sup.refuses
    assert not sup.reason_applies("hard_bounce")


def test_reason_applies_follows_on(shared: SharedDB, clock: Clock) -> None:
    sup = make_list(shared, clock, on=("complaint",))
    assert sup.reason_applies("complaint")
    assert not sup.reason_applies("hard_bounce")
    assert not sup.reason_applies("unsubscribe")


def test_refusal_reply_names_the_entry_and_the_fix() -> None:
    entry = Suppression(
        "r@example.org", "shop.example", "hard_bounce", "sendgrid:ev-1", 1_800_000_000.0
    )
    reply = refusal_reply("R@example.org", entry)
    assert reply.startswith("550 5.1.1 <R@example.org>: recipient is on the suppression list")
    assert "hard bounce on 2027-01-15 via sendgrid:ev-1, for mail from shop.example" in reply
    assert "relay suppression remove r@example.org --scope shop.example" in reply


async def test_a_store_that_fails_keeps_the_copy_answering(
    shared: SharedDB, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = WatchedStore(shared)
    sup = SuppressionList(store, SuppressionConfig(), clock=clock, poll_interval=0.01)
    await sup.start()
    await sup.add([Suppression("r@example.org", "", "manual", "t", clock())])
    store.broken = True
    task = asyncio.create_task(sup.run())
    try:
        with caplog.at_level(logging.WARNING, "relay.suppression"):
            await store.polled(times=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "suppression list: cannot read the store: database is gone" in caplog.text
    assert sup.check("r@example.org", "") is not None
