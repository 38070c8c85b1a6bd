"""Upstream that writes each message into a local Maildir: the embedded default.

It lets `make run` relay real mail with no cloud account, and tests read exactly what was
handed over. Delivery follows the Maildir protocol (write in tmp/, fsync, rename into
new/), so a reader never sees a half-written file and a crash leaves nothing in new/.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.durable import deliver_to_maildir, make_maildir
from relay.message import Envelope
from relay.outcomes import Accepted, TransientError
from relay.upstreams.base import Upstream

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig


@dataclass(frozen=True)
class MaildirSettings:
    path: str = "var/outbox"
    # Prepend X-Relay-Envelope-* headers? Off by default: the bytes stay as handed over.
    envelope_headers: bool = False


class MaildirUpstream(Upstream):
    type_name = "maildir"
    Settings = MaildirSettings

    def __init__(self, name: str, path: Path, *, envelope_headers: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self.envelope_headers = envelope_headers

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: MaildirSettings, relay_config: Config
    ) -> MaildirUpstream:
        return cls(
            common.name,
            relay_config.resolve(settings.path),
            envelope_headers=settings.envelope_headers,
        )

    async def start(self) -> None:
        make_maildir(self.path)

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        if self.envelope_headers:
            head = f"X-Relay-Envelope-From: <{envelope.mail_from}>\r\n" + "".join(
                f"X-Relay-Envelope-To: <{r}>\r\n" for r in envelope.rcpt_tos
            )
            data = head.encode() + data
        try:
            unique = await asyncio.to_thread(deliver_to_maildir, self.path, data)
        except OSError as exc:
            raise TransientError(
                f"maildir {self.path}: {exc.strerror or exc}", upstream_wide=True
            ) from exc
        return Accepted(provider_id=unique)
