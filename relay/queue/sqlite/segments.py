"""Message bodies in append-only segment files beside a shard's database.

Why not in SQLite: a 100 KB body written as a blob is copied into the WAL, copied again into
the database at checkpoint, read back through its overflow pages at claim and walked once
more when its row is deleted. Appended to a file, it is written once, read once with one
pread, and freed in bulk when its whole segment is unlinked.

Layout: `<queue>/<shard db name>.seg/<seq>.seg`. The shard's `bodies` row records (seg, off,
len). Only the process that serves the shard appends (`SegmentWriter`, in its writer thread);
anyone may read (`SegmentFiles`). Durability follows the group commit: the writer appends
every body of a batch, `sync()`s the segment, and only then commits the rows, so a row never
points to bytes that are not on disk; a crash can only leave bytes no row points to, which
are reclaimed with their segment.

Sequence numbers are microseconds since the epoch (and above every existing one), so a
segment name is never reused while a reader might still hold an older row naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from relay.queue.base import StoreError

SUFFIX = ".seg"
#: A new segment is started once the active one is this large.
ROTATE_AT = 64 * 1024 * 1024


class SegmentMissing(StoreError):
    """A row names a segment (or bytes of one) that is not on disk."""


def segment_dir(db_path: Path) -> Path:
    """Where a shard keeps its segments: `queue.db` -> `queue.db.seg/`."""
    return db_path.parent / (db_path.name + SUFFIX)


#: A segment being made (see SegmentWriter._start_segment); a crash may leave one, empty.
STAGING_SUFFIX = ".new"


def segment_seqs(directory: Path) -> list[int]:
    """The sequence numbers of the segment files present, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    # Only names this module writes: a stray "1-old.seg" must not stop the writer thread.
    return sorted(
        int(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit()
    )


class SegmentFiles:
    """Read access to one shard's segments, for any process and any connection.

    Each read opens, preads and closes: readers outside the writer are the operator's (a
    body shown, an export), rare enough that keeping descriptors would only hold unlinked
    files' space."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, seq: int) -> Path:
        return self.directory / f"{seq}{SUFFIX}"

    def read(self, seq: int, offset: int, length: int) -> bytes:
        path = self.path(seq)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentMissing(
                f"message body segment {path} is missing: the queue directory was altered"
                " or damaged; restore the file from a backup or delete the message"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot open message body segment {path}: {exc}") from exc
        try:
            return _pread_exact(fd, path, offset, length)
        finally:
            os.close(fd)


def _pread_exact(fd: int, path: Path, offset: int, length: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise StoreError(f"cannot read message body segment {path}: {exc}") from exc
    if len(data) != length:
        raise SegmentMissing(
            f"message body segment {path} is short: {length} bytes wanted at offset {offset},"
            f" {len(data)} there (truncated or damaged); restore it from a backup or delete"
            " the message"
        )
    return data


class SegmentWriter(SegmentFiles):
    """The shard owner's side: append, sync, rotate, unlink. Used by one thread only.

    The active segment is held with an exclusive flock, so that another writer of the same
    shard (an old worker still draining during a restart) never reclaims it."""

    def __init__(self, directory: Path, *, rotate_at: int = ROTATE_AT) -> None:
        super().__init__(directory)
        self.rotate_at = rotate_at
        self.active = 0
        self.size = 0
        self._fd = -1
        self._dirty = False
        self._failed = False
        self._readers: dict[int, int] = {}  # seq -> read descriptor (the writer's own reads)

    def open(self) -> None:
        """Start a fresh active segment. A previous incarnation's active one may end in
        bytes no row points to (a crash before its COMMIT): it is never appended to again,
        only reclaimed as a whole."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        self._start_segment()

    def _remove_stale_staging(self) -> None:
        """Empty files a crash left between making a segment and naming it (a live writer's
        exists for microseconds: only ones older than a minute go)."""
        cutoff = time.time() - 60
        for name in os.listdir(self.directory):
            if name.endswith(STAGING_SUFFIX):
                path = self.directory / name
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()

    def close(self) -> None:
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def _start_segment(self) -> None:
        existing = segment_seqs(self.directory)
        seq = max(time.time_ns() // 1000, existing[-1] + 1 if existing else 0)
        # Made under a private name, locked, then linked to its real one: a segment name
        # never exists unlocked, so another writer's reclaim (a rolling restart shares the
        # shard) cannot take a new, still empty segment for garbage and unlink it.
        while True:
            staging = self.directory / f"{seq}{STAGING_SUFFIX}"
            try:
                fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                seq += 1
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows this name: at once
                os.link(staging, self.path(seq))
            except FileExistsError:
                os.close(fd)
                os.unlink(staging)
                seq += 1
                continue
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                raise
            os.unlink(staging)
            break
        # The new name must survive a crash before any row names it: sync the directory.
        dfd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        old = self._fd
        self._fd, self.active, self.size, self._dirty, self._failed = fd, seq, 0, False, False
        if old >= 0:
            os.close(old)

    def append(self, data: bytes) -> tuple[int, int]:
        """Write a body at the end of the active segment: (seq, offset). Not durable until
        `sync()`; rotation happens here, before the write, so one body never spans two."""
        try:
            if self.size >= self.rotate_at or self._failed:
                if not self._failed:  # after a failed sync its fd proves nothing more
                    self.sync()
                self._start_segment()
            offset = self.size
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], offset + written)
        except OSError as exc:
            # The caller's savepoint drops the row; bytes written so far name nothing.
            path = self.path(self.active)
            raise StoreError(f"cannot write message body segment {path}: {exc}") from exc
        self.size += len(data)
        self._dirty = True
        return self.active, offset

    def sync(self) -> None:
        """fdatasync the active segment if anything was appended since the last sync (a
        rotation syncs the segment it leaves)."""
        if self._dirty:
            try:
                os.fdatasync(self._fd)
            except OSError:
                # What was written since the last good sync may be gone without the pages
                # saying so: the rows of this batch are not committed, and later bodies
                # go to a fresh segment.
                self._failed = True
                raise
            self._dirty = False

    def read(self, seq: int, offset: int, length: int) -> bytes:
        if seq == self.active:
            fd = self._fd
        else:
            cached = self._readers.get(seq)
            if cached is None:
                try:
                    cached = os.open(self.path(seq), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return super().read(seq, offset, length)  # the same clear error
                self._readers[seq] = cached
            fd = cached
        return _pread_exact(fd, self.path(seq), offset, length)

    def reclaimable(self, seq: int) -> bool:
        """Not the active segment and not another live writer's active one."""
        if seq == self.active:
            return False
        try:
            fd = os.open(self.path(seq), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def file_size(self, seq: int) -> int:
        try:
            return self.path(seq).stat().st_size
        except FileNotFoundError:
            return 0

    def forget_missing(self, present: list[int]) -> None:
        """Close the descriptors of segments another writer of the shard unlinked (during
        a rolling restart both reclaim), so their space is freed."""
        for seq in set(self._readers) - set(present):
            os.close(self._readers.pop(seq))

    def unlink(self, seq: int) -> None:
        """Remove a segment no row points to any more (after the COMMIT that made it so)."""
        fd = self._readers.pop(seq, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path(seq).unlink()


def rotate_at_from_env() -> int:
    """ROTATE_AT, or RELAY_SEGMENT_ROTATE_BYTES when set: tests and benchmarks use small
    segments to make rotation and compaction happen within seconds."""
    raw = os.environ.get("RELAY_SEGMENT_ROTATE_BYTES", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else ROTATE_AT
