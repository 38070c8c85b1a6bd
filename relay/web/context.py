"""What the web side is given to serve: the parts it uses, never the relay object.

The page, the API and /metrics all read the same things (the queue and its shared
routing and stats state), so they see the whole relay: every worker process and, with a
PostgreSQL queue, every host.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from relay.config import Config
from relay.message import NewMessage
from relay.queue.admin import QueueAdmin
from relay.queue.base import Queue

if TYPE_CHECKING:
    from relay.events.registry import ProviderHooks
    from relay.events.service import EventService
    from relay.inbound.service import InboundService
    from relay.suppression import SuppressionList
    from relay.telemetry.core import Telemetry

Readiness = Callable[[], Awaitable[list[str]]]
Submit = Callable[[NewMessage], Awaitable[None]]


@dataclass
class WebContext:
    config: Config
    queue: Queue
    # Makes a new message durable (raises StoreFull/StoreError): the SMTP listener's path.
    submit: Submit
    readiness: Readiness
    inbound: InboundService | None = None
    clock: Callable[[], float] = time.time
    # This process's counters (of every worker, in multiprocess mode), for /metrics.
    telemetry: Telemetry | None = None
    # This process's router adopting an operator's upstream change at once (a pause is
    # then in force when the button's answer arrives; other processes follow within
    # their sync interval).
    routing_changed: Callable[[], Awaitable[None]] | None = None
    # The providers' events (POST /webhooks/<upstream>), when any upstream takes them.
    events: EventService | None = None
    # The upstreams' event endpoints in force (replaced by a reload).
    provider_hooks: ProviderHooks | None = None
    # This process's copy of the suppression list: submission refuses from it, the API
    # and the page change it through it (so the change is in force here at once).
    suppressions: SuppressionList | None = None
    admin: QueueAdmin = field(init=False)

    def __post_init__(self) -> None:
        self.admin = QueueAdmin(self.queue, clock=self.clock, routing_changed=self.routing_changed)


CONTEXT: web.AppKey[WebContext] = web.AppKey("context")
