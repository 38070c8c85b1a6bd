"""How many sessions one relay process serves at once, and giving memory back after.

Every session costs buffers; without a ceiling a burst of clients (or one misbehaving
scanner) can take all of the host's memory. Past `max_connections` in total or
`max_connections_per_ip` from one address, a new connection gets `421 4.7.0` and is
closed at once (RFC 5321 3.8: the client tries again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections import Counter
from collections.abc import AsyncIterator

from relay.smtp import replies

# glibc's mallopt parameter: allocations at least this big are mmap()ed.
_M_MMAP_THRESHOLD = -3
# Large message buffers go straight to mmap and back to the kernel when freed, instead of
# staying in the heap (glibc's adaptive threshold climbs to 32 MiB after the first free).
MMAP_THRESHOLD = 256 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError):
        return ctypes.CDLL(name)
    return None


class MemoryReturn:
    """After a burst of large messages, hand freed heap pages back to the kernel.

    CPython frees the bytes, but glibc keeps the pages of its heap for reuse: the issue saw
    RSS stay at 1 GB 18 minutes after the sessions ended. Without glibc this does nothing.
    """

    def __init__(self) -> None:
        self._libc = _libc()
        if self._libc is not None:
            with contextlib.suppress(AttributeError):
                self._libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)

    def trim(self) -> None:
        if self._libc is not None:
            with contextlib.suppress(AttributeError):
                self._libc.malloc_trim(0)


class ConnectionLimits:
    """Counts this process's sessions, in total and per client address."""

    def __init__(self, *, total: int, per_ip: int, hostname: str) -> None:
        self.total, self.per_ip, self.hostname = total, per_ip, hostname
        self.active = 0
        self.by_ip: Counter[str] = Counter()

    def acquire(self, ip: str) -> str | None:
        """None when the session may go on, else the reply that refuses it."""
        if self.active >= self.total:
            return replies.TOO_MANY_CONNECTIONS.format(host=self.hostname)
        if self.by_ip[ip] >= self.per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM.format(host=self.hostname, ip=ip)
        self.active += 1
        self.by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.active -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


class LargeMessages:
    """Spooled messages read back into memory for the queue, a few at a time.

    The queue takes a message as `bytes`, so a message spooled to disk is whole in memory
    (twice, briefly, with its Received header) from hand-off until it is committed. Without
    a gate, 200 sessions finishing 25 MB messages together would need 10 GB.
    """

    def __init__(self, slots: int = 4) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._busy = 0
        self.memory = MemoryReturn()

    @contextlib.asynccontextmanager
    async def handoff(self) -> AsyncIterator[None]:
        async with self._slots:
            self._busy += 1
            try:
                yield
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self.memory.trim()
