"""Reading DATA: blocks, not lines, with memory bounded however large the message.

The content is read in blocks and searched for the one true end marker `<CRLF>.<CRLF>`
(`relay.wire`: one memchr per line in C, bytes methods without it; either far faster than
a line loop). Complete lines are checked and unstuffed in one pass as they arrive and
go to a `Spool`: memory up to `data_spool_threshold`, then an unlinked temporary file,
so 200 sessions each sending 5 MB hold about 200 small buffers, not 1 GB.

Line endings (RFC 5321 2.3.8): a bare CR is always refused, because it is how SMTP
smuggling hides a second message (`<CR>.<CR><LF>`); a bare LF is refused or turned into
CRLF, as the listener says. Either way only `<CRLF>.<CRLF>` in the bytes as sent ends the
message (`<LF>.<CRLF>` and `<LF>.<LF>` never do), and a refused message is read to its
real end before the one reply, so nothing is split and the session stays in sync.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import IO

from relay.smtp import replies
from relay.wire import find_end, unstuff

READ_SIZE = 64 * 1024
# Complete lines are processed once this much is pending (a small message is processed
# once, at its end, like the whole-message reader this replaced).
PROCESS_AT = 128 * 1024
# A "line" this long without any LF is processed mid-line, so memory stays bounded.
MAX_PENDING = 1024 * 1024
_LONE_LF = re.compile(rb"(?<!\r)\n")


class DataError(Exception):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class Spool:
    """The message content: in memory up to `threshold` bytes, then in a temporary file.

    The file is unlinked from the start (`TemporaryFile`), so nothing is left behind by a
    crash; the queue takes `bytes`, so `read()` brings the content back only at hand-off.
    """

    def __init__(self, *, threshold: int, directory: Path | None) -> None:
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None and self.size <= self.threshold:
            self._chunks.append(data)
            return
        if self._file is None:
            # Page-cache writes of at most a few hundred KB: not worth a thread hop.
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix="data-")  # noqa: SIM115 (closed by close())
            self._file.writelines(self._chunks)
            self._chunks = []
        self._file.write(data)

    def read(self) -> bytes:
        if self._file is None:
            return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None


class _Lines:
    """Checks and unstuffs complete lines into a spool; remembers why it stopped."""

    def __init__(self, spool: Spool, *, limit: int, normalize: bool) -> None:
        self.spool, self.limit, self.normalize = spool, limit, normalize
        self.size = -2  # the synthetic CRLF in front of the content
        self.bare_line_ending = False
        self._first = True

    @property
    def refusal(self) -> str | None:
        """The reply that refuses the message, or None. Its size comes first, as the
        whole-message reader had it: a client can fix a bare line ending only if it may
        send the message at all."""
        if self.size > self.limit:
            return replies.MESSAGE_TOO_BIG.format(limit=self.limit)
        return replies.BARE_LINE_ENDING if self.bare_line_ending else None

    def feed(self, pending: bytearray, end: int) -> None:
        """`pending[:end]` starts at a line's CRLF (or mid-line) and never ends inside a
        CRLF. Checked, unstuffed and copied out in one pass (`relay.wire.unstuff`)."""
        self.size += end
        if self.refusal is not None:
            self.spool.close()
            return
        # The synthetic CRLF in front of the first block is left out here, not sliced off
        # a copy (and with it the first line's stuffed dot: its CRLF is out of sight).
        start = 0
        if self._first:
            start = 3 if end > 2 and pending[2] == 0x2E else 2
        block = unstuff(pending, start, end)
        if block is None:
            block = self._normalized(bytes(pending[:end]))
            if block is None:
                self.bare_line_ending = True
                self.spool.close()
                return
            if self._first:
                block = block[2:]
        self._first = False
        if block:
            self.spool.write(block)

    def _normalized(self, block: bytes) -> bytes | None:
        """A block with bare LFs made CRLF and unstuffed, when the listener normalises;
        None for a bare CR (or any bare line ending when it does not)."""
        if not self.normalize or block.count(b"\r") != block.count(b"\r\n"):
            return None
        block = _LONE_LF.sub(b"\r\n", block)
        return unstuff(block, 0, len(block))  # every line ends in CRLF now


def _cut(pending: bytearray) -> int:
    """Where complete lines end: before the last line end that cannot be part of a marker
    still arriving, never between a CR and its LF; 0 when there is nothing to process."""
    if len(pending) <= 5:
        return 0
    cut = pending.rfind(b"\n", 0, len(pending) - 4)
    if cut > 0 and pending[cut - 1] == 0x0D:
        cut -= 1
    if cut <= 0 and len(pending) > MAX_PENDING:
        cut = len(pending) - 4
        while cut > 0 and pending[cut - 1] == 0x0D:
            cut -= 1
    return max(cut, 0)


async def read_data(
    reader: asyncio.StreamReader, spool: Spool, *, limit: int, normalize: bool
) -> None:
    """Read DATA up to the end marker into `spool` (unstuffed); raise DataError to refuse.

    A synthetic CRLF in front makes an empty message (".") and a first line that is the end
    marker found by the same search. What the client pipelined after the marker goes back
    into the reader for the next command.
    """
    lines = _Lines(spool, limit=limit, normalize=normalize)
    pending = bytearray(b"\r\n")
    searched = 0
    while True:
        end = find_end(pending, max(searched - 4, 0))
        if end >= 0:
            break
        searched = len(pending)
        if len(pending) >= PROCESS_AT:
            cut = _cut(pending)
            if cut:
                lines.feed(pending, cut)
                del pending[:cut]
                searched -= cut
        block = await reader.read(READ_SIZE)
        if not block:
            raise asyncio.IncompleteReadError(bytes(pending), None)
        pending += block
    lines.feed(pending, end + 2)  # keep the last line's CRLF, drop ".\r\n"
    reader._buffer[0:0] = pending[end + 5 :]  # type: ignore[attr-defined]
    if lines.refusal is not None:
        raise DataError(lines.refusal)
