"""What every inbound destination shares: the `Destination` interface the inbound worker
calls, the partial-delivery errors, and the per-recipient bookkeeping used by the maildir,
directory and SMTP/LMTP destinations."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from relay.inbound.parse import ParsedMessage, safe_filename
from relay.outcomes import PermanentError, RecipientRefusal, TransientError, UpstreamError


class Destination(abc.ABC):
    """Somewhere inbound mail is delivered. Created from config; `start()` before use."""

    type_name: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Create directories or sessions; called once before the first delivery."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() created; called once at shutdown."""

    @abc.abstractmethod
    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        """Deliver the message for `recipients`; `sender` is the original envelope sender
        (SES `mail.source`), `delivery_id` a stable id (the work's dedupe key) that
        receivers can use to drop a redelivery. Returns what was done, for the timeline."""


class PartialDelivery(UpstreamError):
    """Raised after some recipients were served: retry (or fail) only the rest."""

    def __init__(
        self, reason: str, *, delivered: Sequence[str], refused: Mapping[str, RecipientRefusal]
    ) -> None:
        super().__init__(reason)
        self.delivered = tuple(delivered)
        self.refused = dict(refused)


class PartialTransient(PartialDelivery, TransientError):
    """Some recipients got the message; at least one failure is worth retrying."""


class PartialPermanent(PartialDelivery, PermanentError):
    """Some recipients got the message; the others never will."""


def raise_for_refusals(
    what: str, delivered: Sequence[str], refused: Mapping[str, RecipientRefusal]
) -> None:
    """Turn per-recipient refusals into the right error; return if there were none."""
    if not refused:
        return
    detail = "; ".join(f"{r}: {v.reason}" for r, v in refused.items())
    transient = any(not v.permanent for v in refused.values())
    if not delivered:
        if transient:
            raise TransientError(f"{what}: every recipient deferred: {detail}")
        raise PermanentError(f"{what}: every recipient refused: {detail}")
    cls = PartialTransient if transient else PartialPermanent
    raise cls(
        f"{what}: {len(refused)} of {len(refused) + len(delivered)} recipients failed: {detail}",
        delivered=delivered,
        refused=refused,
    )


class FolderDestination(Destination):
    """A destination that writes files under `path`, one folder per recipient when
    `per_recipient` (Maildir, directory)."""

    def __init__(self, name: str, path: Path, *, per_recipient: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self.per_recipient = per_recipient


def recipient_dir(base: Path, recipient: str) -> Path:
    return base / safe_filename(recipient.strip().lower(), default="unknown-recipient")
