"""When to try again, and when to give up.

The schedule counts deferrals, not upstream attempts: one round may try several upstreams
(failover) before the message is deferred, and only then does the next delay apply. After
the last entry the last delay repeats; past `max_age` the message fails for good.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    schedule: tuple[float, ...]
    max_age: float

    def next_attempt(
        self, *, now: float, created: float, deferrals: int, retry_after: float | None = None
    ) -> float | None:
        """The time of the next try, or None when the message is too old to keep trying."""
        delay = self.schedule[min(deferrals, len(self.schedule) - 1)]
        if retry_after is not None:
            delay = max(delay, retry_after)
        at = now + delay
        if now - created >= self.max_age:
            return None
        # The last try happens at max_age, not a full delay after it.
        return min(at, created + self.max_age)

    @staticmethod
    def gave_up(*, now: float, created: float, rounds: int, last_error: str) -> str:
        return (
            f"gave up after {rounds} rounds over {human_duration(now - created)} "
            f"(retry.max_age); last error: {last_error}"
        )


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
