"""Upstream that writes each message into a local Maildir: the embedded default.

It lets `make run` relay real mail with no cloud account, and tests read exactly what was
handed over. Delivery follows the Maildir protocol (write in tmp/, fsync, rename into
new/), so a reader never sees a half-written file and a crash leaves nothing in new/.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.message import Envelope
from relay.upstreams.base import Accepted, TransientError, Upstream

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
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._counter = 0

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
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        self._counter += 1
        unique = f"{time.time_ns()}.P{os.getpid()}Q{self._counter}.{self._host}"
        if self.envelope_headers:
            head = f"X-Relay-Envelope-From: <{envelope.mail_from}>\r\n" + "".join(
                f"X-Relay-Envelope-To: <{r}>\r\n" for r in envelope.rcpt_tos
            )
            data = head.encode() + data
        try:
            await asyncio.to_thread(self._deliver, unique, data)
        except OSError as exc:
            raise TransientError(
                f"maildir {self.path}: {exc.strerror or exc}", upstream_wide=True
            ) from exc
        return Accepted(provider_id=unique)

    def _deliver(self, unique: str, data: bytes) -> None:
        tmp = self.path / "tmp" / unique
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / "new" / unique)
        dir_fd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
