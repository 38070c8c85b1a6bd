"""The contract between the dispatcher and every upstream (provider, smarthost, maildir).

An upstream knows nothing of the queue: it gets an envelope and the exact bytes to hand
over, and either returns `Accepted` or raises one of the two typed errors below. The
dispatcher turns those into queue state; routing turns `upstream_wide` errors into breaker
trips. New providers plug in by subclassing `Upstream` and registering in `registry.py`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

from relay.message import Envelope


@dataclass(frozen=True, slots=True)
class RecipientRefusal:
    """One recipient the upstream would not take while it took the others."""

    permanent: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The upstream took the message for every recipient not listed in `refused`."""

    provider_id: str | None = None
    refused: dict[str, RecipientRefusal] = field(default_factory=dict)
    detail: str = ""


class UpstreamError(Exception):
    """Base of the two outcomes an upstream may raise. `reason` is what operators read."""

    def __init__(
        self,
        reason: str,
        *,
        upstream_wide: bool = False,
        ambiguous: bool = False,
        sender_scoped: bool = False,
    ):
        super().__init__(reason)
        self.reason = reason
        # True when the fault is the provider's or our account's (auth, quota, outage),
        # not this message's: routing opens the breaker instead of blaming the message.
        self.upstream_wide = upstream_wide
        # True when the request left us and no answer came back: the provider may have
        # accepted it, so a retry elsewhere may duplicate. Recorded as such on the timeline.
        self.ambiguous = ambiguous
        # True when this upstream refuses the message's identities (a sender it has not
        # verified, a recipient outside SES's sandbox list): another upstream may take it,
        # and the upstream stays healthy for everyone else, so no breaker counts it.
        self.sender_scoped = sender_scoped


class TransientError(UpstreamError):
    """Try again: another upstream now, or this one after `retry_after` seconds."""

    def __init__(
        self,
        reason: str,
        *,
        retry_after: float | None = None,
        upstream_wide: bool = False,
        ambiguous: bool = False,
        sender_scoped: bool = False,
    ):
        super().__init__(
            reason, upstream_wide=upstream_wide, ambiguous=ambiguous, sender_scoped=sender_scoped
        )
        self.retry_after = retry_after


class PermanentError(UpstreamError):
    """This message can't be delivered by any upstream: no retry, a DSN to the sender.

    With `upstream_wide=True` it means the upstream itself is unusable (bad API key, account
    suspended): routing opens the breaker and the dispatcher treats it like a transient
    error for the message, which may still go out through another upstream.
    """


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
