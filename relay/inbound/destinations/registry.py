"""Destination types by config name: a route's `destination` table → that type's settings
dataclass (checked with `relay.config.build`) → the destination object. Adding a type
means one module and its entries here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.config import ConfigError, build
from relay.inbound.destinations.base import Destination
from relay.inbound.destinations.directory import DirectoryDestination, DirectoryDestinationConfig
from relay.inbound.destinations.maildir import MaildirDestination, MaildirDestinationConfig
from relay.inbound.destinations.smtp import (
    LMTPDestination,
    SMTPDestination,
    SMTPDestinationConfig,
)
from relay.inbound.destinations.webhook import WebhookDestination, WebhookDestinationConfig

DestinationConfig = (
    MaildirDestinationConfig
    | SMTPDestinationConfig
    | WebhookDestinationConfig
    | DirectoryDestinationConfig
)


DESTINATION_SETTINGS: dict[str, type[Any]] = {
    "maildir": MaildirDestinationConfig,
    "smtp": SMTPDestinationConfig,
    "lmtp": SMTPDestinationConfig,
    "webhook": WebhookDestinationConfig,
    "directory": DirectoryDestinationConfig,
}


def build_destination_config(data: Any, key: str = "destination") -> DestinationConfig:
    """Validate a destination table (`type` plus that type's keys) into its dataclass."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a table, got {type(data).__name__}")
    kind = data.get("type")
    if kind not in DESTINATION_SETTINGS:
        known = ", ".join(sorted(DESTINATION_SETTINGS))
        raise ConfigError(f"{key}.type: unknown destination type {kind!r} (known: {known})")
    options = {k: v for k, v in data.items() if k != "type"}
    if kind == "lmtp":
        options.setdefault("protocol", "lmtp")
        options.setdefault("tls", "none")
        if options["protocol"] != "lmtp":
            raise ConfigError(f'{key}.protocol: type lmtp implies protocol "lmtp"')
    settings: DestinationConfig = build(DESTINATION_SETTINGS[kind], options, key)
    return settings


def create_destination(
    settings: DestinationConfig, *, name: str = "", base_dir: Path | None = None
) -> Destination:
    """The destination object for validated settings; relative paths resolve against
    `base_dir` (the config file's directory), as elsewhere in the config."""

    def resolve(path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or base_dir is None else base_dir / p

    if isinstance(settings, MaildirDestinationConfig):
        return MaildirDestination(
            name, resolve(settings.path), per_recipient=settings.per_recipient
        )
    if isinstance(settings, DirectoryDestinationConfig):
        return DirectoryDestination(
            name, resolve(settings.path), per_recipient=settings.per_recipient
        )
    if isinstance(settings, WebhookDestinationConfig):
        return WebhookDestination(name, settings)
    if settings.protocol == "lmtp":
        return LMTPDestination(name, settings)
    return SMTPDestination(name, settings)
