"""The parts of running SMTP listeners that a reload changes in place.

A listener's socket, TLS mode and AUTH mode stay as they were bound (a restart changes
them); who may log in, which senders each user may use, which networks relay without
AUTH and the certificate served on the next handshake change for every session at its
next command, without closing any.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import SMTPConfig
from relay.smtp.auth import Authenticator
from relay.smtp.handler import RelayHandler


@dataclass
class LiveSMTP:
    """Filled in by `start_listeners`: what its listeners share, kept for reloads."""

    authenticator: Authenticator | None = None
    handlers: list[RelayHandler] = field(default_factory=list)
    # The one context every TLS listener uses (STARTTLS and implicit), and its files.
    tls: ssl.SSLContext | None = None
    tls_files: tuple[Path, Path] | None = None

    def apply(self, smtp: SMTPConfig) -> None:
        """A reload's users, allowed senders, trusted networks and recipient limit."""
        if self.authenticator is not None:
            self.authenticator.replace(smtp.users)
        for handler in self.handlers:
            handler.replace_policy(smtp)
