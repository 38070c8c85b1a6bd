"""What every provider's webhook module offers: verify a request, read its events.

A module per provider type defines `Settings` (its keys under `[[upstream]] webhook = {..}`,
checked by `relay.config.build`; secrets `env:`/`file:`) and a class with
`from_config(upstream, settings, context)` and `async handle(request) -> WebhookResult`.
The web endpoint (relay.web.webhooks) knows nothing of any provider: it reads the body,
calls `handle`, and answers by the result or the WebhookError's status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.events.model import ProviderEvent


class WebhookError(Exception):
    """A request the relay will not act on; `status` is the HTTP answer."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Malformed(WebhookError):
    """Not a body this provider sends (400): it changes nothing."""

    status = 400


class Unauthenticated(WebhookError):
    """No credentials, or a signature that does not verify, or a stale or replayed one."""

    status = 401


class Forbidden(WebhookError):
    """Authentic, but not for us (an SNS topic not on the allowlist)."""

    status = 403


class Unavailable(WebhookError):
    """Could not verify now (a signing certificate that can't be fetched): retry later."""

    status = 503


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """What a verifier sees of the HTTP request: everything a signature may cover."""

    headers: Mapping[str, str]  # case-insensitive (a CIMultiDictProxy in the server)
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    remote: str | None = None


@dataclass(slots=True)
class WebhookResult:
    """The events of a verified request; `answer` is a JSON reply that replaces the usual
    one (an SNS subscription confirmed) and then there are no events."""

    events: list[ProviderEvent] = field(default_factory=list)
    answer: dict[str, Any] | None = None
    # The replay-guard key this request took (`first_use`), given back when its events
    # can't be recorded now: the provider then retries the same signed request.
    nonce: str | None = None


class ReplayGuard(Protocol):
    """`Queue.first_use`: True the first time a key is seen, on every host."""

    def __call__(self, key: str, *, now: float, expires: float) -> Awaitable[bool]: ...


@dataclass(frozen=True)
class WebhookContext:
    """What a provider module may use besides its settings."""

    clock: Callable[[], float]
    first_use: ReplayGuard
    # Gives a `first_use` key back (Queue.forget_use).
    forget_use: Callable[[str], Awaitable[None]] | None = None
    # Fetches an SNS signing certificate or visits a SubscribeURL (tests swap it).
    fetch: Callable[[str], Awaitable[bytes]] | None = None


class ProviderWebhook(Protocol):
    name: str  # the upstream's name

    async def handle(self, request: WebhookRequest) -> WebhookResult: ...

    async def close(self) -> None: ...
