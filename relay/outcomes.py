"""What a delivery attempt returns: an upstream's `send` or an inbound destination's `deliver`.

Shared by `upstreams/` and the inbound destinations (which produce them), `dispatch/`
(which turns them into queue state and routing health) and the inbound worker (which does
the same for inbound work, so inbound and outbound failures are treated alike). They live
here, not in `upstreams/base.py`, so that dispatch and inbound can speak this vocabulary
without importing the upstream package.

An upstream returns `Accepted` (possibly with some recipients refused); both kinds of
attempt fail by raising `TransientError` (retry later or elsewhere) or `PermanentError`
(no retry), which share the base `UpstreamError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Base of the two errors an attempt may raise. `reason` is what operators read."""

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
