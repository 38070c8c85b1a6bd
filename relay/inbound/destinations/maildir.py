"""The `maildir` destination: write in tmp/, fsync, rename into new/, fsync the directory
(`relay.durable`), into one Maildir or one per recipient."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.durable import deliver_to_maildir, make_maildir
from relay.inbound.destinations.base import (
    FolderDestination,
    raise_for_refusals,
    recipient_dir,
)
from relay.inbound.parse import ParsedMessage
from relay.outcomes import PermanentError, RecipientRefusal, TransientError


@dataclass(frozen=True)
class MaildirDestinationConfig:
    path: str
    # One Maildir per recipient (path/<address>/), or every message in `path` itself.
    per_recipient: bool = False


class MaildirDestination(FolderDestination):
    """Maildir delivery: readers never see a half-written file, a crash leaves none in new/."""

    type_name = "maildir"

    async def start(self) -> None:
        if not self.per_recipient:
            await asyncio.to_thread(make_maildir, self.path)

    @staticmethod
    def _deliver_one(maildir: Path, raw: bytes) -> str:
        make_maildir(maildir)  # recipients' Maildirs appear as mail first arrives
        return deliver_to_maildir(maildir, raw)

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not self.per_recipient:
            try:
                unique = await asyncio.to_thread(self._deliver_one, self.path, raw)
            except OSError as exc:
                raise TransientError(
                    f"maildir {self.path}: {exc.strerror or exc}", upstream_wide=True
                ) from exc
            return f"maildir {self.path}/new/{unique}"
        if not recipients:
            raise PermanentError("maildir per_recipient: the message has no recipients")
        delivered: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        names: list[str] = []
        for rcpt in recipients:
            folder = recipient_dir(self.path, rcpt)
            try:
                unique = await asyncio.to_thread(self._deliver_one, folder, raw)
            except OSError as exc:
                refused[rcpt] = RecipientRefusal(False, f"{folder}: {exc.strerror or exc}")
                continue
            delivered.append(rcpt)
            names.append(f"{folder.name}/new/{unique}")
        raise_for_refusals(f"maildir {self.path}", delivered, refused)
        return f"maildir {self.path}: " + ", ".join(names)
