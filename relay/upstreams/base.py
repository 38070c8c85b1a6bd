"""The contract between the dispatcher and every upstream (provider, smarthost, maildir).

An upstream knows nothing of the queue: it gets an envelope and the exact bytes to hand
over, and either returns `Accepted` or raises `TransientError` or `PermanentError` (the
attempt outcomes, defined in `relay.outcomes` because inbound destinations share them). The
dispatcher turns those into queue state; routing turns `upstream_wide` errors into breaker
trips. New providers plug in by subclassing `Upstream` and registering in `registry.py`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from relay.message import Envelope
from relay.outcomes import Accepted


class Upstream(abc.ABC):
    """One place a message can be handed to. Instances are created from config by name."""

    #: Config `type` value this class implements.
    type_name: str = ""
    #: Whether DKIM signing before the handoff makes sense (the bytes arrive unchanged).
    #: JSON providers rebuild the message and sign it themselves.
    wants_dkim: bool = True
    #: Headers our DKIM signature must not cover because this upstream rewrites them.
    dkim_skip_headers: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open sessions or connections; called once before the first send."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() opened; called once at shutdown."""

    def refusal(self, envelope: Envelope, data: bytes) -> str | None:
        """Why this upstream cannot take this message at all (too big, not convertible to
        the provider's JSON, ...), or None. Routing skips such an upstream for the message
        without counting a failure: nothing is wrong with the upstream."""
        return None

    def should_dkim_sign(self, data: bytes) -> bool:
        """Whether to add our signature to this message for this upstream."""
        return self.wants_dkim

    @abc.abstractmethod
    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        """Hand the message over. Raise TransientError or PermanentError on failure."""
