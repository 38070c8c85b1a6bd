"""Upstream types by config name, imported only when a config uses them.

Each upstream module defines a class with a `Settings` dataclass (its type-specific keys,
checked by `relay.config.build`) and a `from_config(common, settings, relay_config)`
classmethod. Adding a provider means one module and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from relay.config import COMMON_UPSTREAM_KEYS, ConfigError, build

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig
    from relay.upstreams.base import Upstream

UPSTREAM_TYPES: dict[str, str] = {
    "maildir": "relay.upstreams.maildir:MaildirUpstream",
    "smtp": "relay.upstreams.smtp:SMTPUpstream",
    "ses": "relay.upstreams.ses:SESUpstream",
    "sendgrid": "relay.upstreams.sendgrid:SendGridUpstream",
    "mailgun": "relay.upstreams.mailgun:MailgunUpstream",
    "sparkpost": "relay.upstreams.sparkpost:SparkPostUpstream",
    "postmark": "relay.upstreams.postmark:PostmarkUpstream",
}


def upstream_class(type_name: str, key: str = "upstream") -> Any:
    target = UPSTREAM_TYPES.get(type_name)
    if target is None:
        known = ", ".join(sorted(UPSTREAM_TYPES))
        raise ConfigError(f"{key}.type: unknown upstream type {type_name!r} (known: {known})")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def validate_upstream(common: UpstreamConfig, key: str, relay_config: Config) -> Any:
    """Check the type-specific keys; returns the built Settings object."""
    cls = upstream_class(common.type, key)
    return build(cls.Settings, common.options, key, also_known=frozenset(COMMON_UPSTREAM_KEYS))


def create_upstream(common: UpstreamConfig, key: str, relay_config: Config) -> Upstream:
    cls = upstream_class(common.type, key)
    settings = build(cls.Settings, common.options, key)
    upstream: Upstream = cls.from_config(common, settings, relay_config)
    return upstream
