"""One log line per refused command, like Postfix's `NOQUEUE: reject:`, rate-limited.

An operator asked "why did my scanner's mail not arrive?" needs the client address, the
user, the envelope and the exact reply; a client hammering the relay with bad commands
must not fill the disk, so lines beyond a burst are counted and summarised instead.
Values a client chose are made printable first (a bare CR in a log line forges lines).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

log = logging.getLogger("relay.smtp")

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str) -> str:
    """ASCII letters, digits and punctuation only: anything else becomes `?`."""
    return _UNPRINTABLE.sub("?", text)


class RefusalLog:
    """A token bucket of log lines: `burst` at once, then `rate` a second."""

    def __init__(
        self,
        *,
        rate: float = 10.0,
        burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()
        self._suppressed = 0

    def _take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self._suppressed += 1
            return False
        self._tokens -= 1
        return True

    def refused(
        self,
        *,
        command: str,
        peer: str,
        reply: str,
        user: str | None = None,
        sender: str | None = None,
        recipient: str | None = None,
    ) -> None:
        if not log.isEnabledFor(logging.INFO) or not self._take():
            return  # nothing is built for a line nobody will read
        if self._suppressed:
            log.warning("NOQUEUE: %d refusal line(s) not logged (rate limit)", self._suppressed)
            self._suppressed = 0
        fields = [f"{command} from {peer}"]
        if user:
            fields.append(f"user={printable(user)}")
        if sender is not None:
            fields.append(f"from=<{printable(sender)}>")
        if recipient is not None:
            fields.append(f"to=<{printable(recipient)}>")
        log.info(
            "NOQUEUE: reject: %s: %s",
            " ".join(fields),
            printable(reply),
            extra={
                "event": "refused",
                "command": command,
                # `[ip]:port` as the text line has it: the address alone, as elsewhere
                "client": peer[1:].partition("]")[0] if peer.startswith("[") else peer,
                "user": user or None,
                "sender": sender,
                "recipient": recipient,
                "reply": reply,
            },
        )
