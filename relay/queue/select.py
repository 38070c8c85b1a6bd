"""Choosing messages the way operators do, and the queue's shape by age and domain.

`Selection` is what `postsuper -d ALL deferred` and `-d -` express: explicit ids, or all
messages matching filters (state, sender, recipient, age). `shape` is Postfix's `qshape`:
messages per recipient domain and age bucket, to see at a glance which destination piles up.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from relay.queue.base import MessageRow

# qshape's buckets, in minutes: 0-5, 5-10, 10-20, ... doubling; the last is open-ended.
AGE_BUCKETS_MIN = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


def normalise_id(text: str) -> str:
    """Ids are Crockford base32 in upper case; accept them in any case."""
    return text.strip().upper()


@dataclass(frozen=True)
class Selection:
    ids: tuple[str, ...] = ()  # empty: every message the filters let through
    state: str | None = None
    kind: str | None = None
    sender: str | None = None  # substring, case-insensitive
    recipient: str | None = None  # substring of any original recipient, case-insensitive
    older_than: float | None = None  # seconds since arrival

    @property
    def filters_rows(self) -> bool:
        """Whether rows must be read to apply it (beyond what the queue's search takes)."""
        return bool(self.ids or self.sender or self.recipient or self.older_than is not None)

    def matches(self, row: MessageRow, *, now: float) -> bool:
        if self.ids and row.id not in self.ids:
            return False
        if self.state and row.state != self.state:
            return False
        if self.kind and row.kind != self.kind:
            return False
        if self.sender and self.sender.lower() not in row.mail_from.lower():
            return False
        if self.recipient:
            wanted = self.recipient.lower()
            if not any(wanted in r.lower() for r in recipients(row)):
                return False
        return self.older_than is None or now - row.created >= self.older_than


def recipients(row: MessageRow) -> list[str]:
    """Everyone the message was addressed to (a sent message has no pending ones left)."""
    original = row.meta.get("rcpts_original")
    return list(original) if isinstance(original, list) else list(row.rcpts)


@dataclass
class Shape:
    buckets: tuple[str, ...]
    rows: list[tuple[str, int, list[int]]] = field(default_factory=list)  # domain, total, per
    total: list[int] = field(default_factory=list)


def shape(rows: Iterable[MessageRow], *, now: float | None = None, top: int = 20) -> Shape:
    """Pending recipients per domain and age bucket (a message counts once per domain)."""
    now = time.time() if now is None else now
    labels = (
        *(f"{a}-{b}m" for a, b in zip((0, *AGE_BUCKETS_MIN[:-1]), AGE_BUCKETS_MIN, strict=True)),
        f"{AGE_BUCKETS_MIN[-1]}m+",
    )
    per_domain: dict[str, list[int]] = {}
    for row in rows:
        minutes = (now - row.created) / 60
        index = next((i for i, edge in enumerate(AGE_BUCKETS_MIN) if minutes < edge), -1)
        domains = Counter(r.rpartition("@")[2].lower() or "(none)" for r in row.rcpts or [""])
        for domain in domains:
            per_domain.setdefault(domain, [0] * len(labels))[index] += 1
    ranked = sorted(per_domain.items(), key=lambda item: (-sum(item[1]), item[0]))
    result = Shape(buckets=labels)
    result.total = [sum(counts[i] for _, counts in ranked) for i in range(len(labels))]
    result.rows = [(domain, sum(counts), counts) for domain, counts in ranked[:top]]
    return result
