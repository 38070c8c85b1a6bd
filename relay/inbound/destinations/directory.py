"""The `directory` destination: attachments only, as files for a document system: safe
names, written under a hidden temporary name and then linked into place, never overwriting."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.durable import fsync_dir, write_new
from relay.inbound.destinations.base import (
    FolderDestination,
    raise_for_refusals,
    recipient_dir,
)
from relay.inbound.parse import ParsedMessage
from relay.outcomes import PermanentError, RecipientRefusal, TransientError


@dataclass(frozen=True)
class DirectoryDestinationConfig:
    path: str
    # A subdirectory per recipient (path/<address>/), or every file in `path` itself.
    per_recipient: bool = False


def _numbered(name: str, n: int, max_bytes: int = 255) -> str:
    """`report.pdf` -> `report-2.pdf`, trimmed so the result still fits `max_bytes`."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    else:
        ext = "." + ext
    suffix = f"-{n}{ext}"
    budget = max_bytes - len(suffix.encode("utf-8"))
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return stem + suffix


_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _place_file(directory: Path, name: str, data: bytes) -> str:
    """Write `data` as `name` in `directory` without ever replacing an existing file.

    The bytes go to a hidden temporary file first (watchers ignore dot files), are
    fsynced, then hard-linked to the final name: link() fails instead of overwriting, and
    the file appears complete or not at all. File systems without hard links get an
    O_EXCL create instead (still no overwrite, but the file is visible while written).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = f".relay-tmp-{secrets.token_hex(8)}"
    write_new(directory / tmp, data)
    try:
        candidate = name
        for n in range(1, 10_000):
            try:
                os.link(directory / tmp, directory / candidate)
            except FileExistsError:
                candidate = _numbered(name, n)
                continue
            except OSError as exc:
                if exc.errno not in _LINK_UNSUPPORTED:
                    raise
                return _place_file_excl(directory, name, data)
            fsync_dir(directory)
            return candidate
        raise FileExistsError(errno.EEXIST, "no free file name", name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / tmp)


def _place_file_excl(directory: Path, name: str, data: bytes) -> str:
    candidate = name
    for n in range(1, 10_000):
        try:
            write_new(directory / candidate, data)
        except FileExistsError:
            candidate = _numbered(name, n)
            continue
        fsync_dir(directory)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free file name", name)


class DirectoryDestination(FolderDestination):
    """Attachments as files for a document system. The message itself is not kept."""

    type_name = "directory"

    async def start(self) -> None:
        await asyncio.to_thread(self.path.mkdir, parents=True, exist_ok=True)

    def _write_all(self, folder: Path, parsed: ParsedMessage) -> list[str]:
        return [_place_file(folder, a.filename, a.data) for a in parsed.attachments]

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not parsed.attachments:
            return f"directory {self.path}: no attachments to write"
        folders = (
            [recipient_dir(self.path, r) for r in recipients] if self.per_recipient else [self.path]
        )
        if not folders:
            raise PermanentError("directory per_recipient: the message has no recipients")
        written: list[str] = []
        delivered: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        for i, folder in enumerate(folders):
            try:
                names = await asyncio.to_thread(self._write_all, folder, parsed)
            except OSError as exc:
                if not self.per_recipient:
                    raise TransientError(
                        f"directory {folder}: {exc.strerror or exc}", upstream_wide=True
                    ) from exc
                refused[recipients[i]] = RecipientRefusal(False, f"{folder}: {exc.strerror or exc}")
                continue
            if self.per_recipient:
                delivered.append(recipients[i])
            written.extend(str((folder / n).relative_to(self.path)) for n in names)
        raise_for_refusals(f"directory {self.path}", delivered, refused)
        return f"directory {self.path}: " + ", ".join(written)
