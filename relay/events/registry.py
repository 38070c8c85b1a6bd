"""Webhook modules by upstream type, imported only when an upstream enables events."""

from __future__ import annotations

import importlib
from typing import Any

from relay.config import Config, ConfigError, UpstreamConfig, build
from relay.events.base import ProviderWebhook, WebhookContext

EVENT_TYPES: dict[str, str] = {
    "ses": "relay.events.ses:SESWebhook",
    "sendgrid": "relay.events.sendgrid:SendGridWebhook",
    "mailgun": "relay.events.mailgun:MailgunWebhook",
    "sparkpost": "relay.events.sparkpost:SparkPostWebhook",
    "postmark": "relay.events.postmark:PostmarkWebhook",
}


def webhook_class(upstream: UpstreamConfig, key: str) -> Any:
    target = EVENT_TYPES.get(upstream.type)
    if target is None:
        known = ", ".join(sorted(EVENT_TYPES))
        raise ConfigError(
            f"{key}.events: upstream type {upstream.type!r} sends no event webhooks"
            f" (types that do: {known})"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def validate_webhook(upstream: UpstreamConfig, key: str) -> Any:
    """Check an events-enabled upstream's `webhook` settings; the built Settings."""
    return build(webhook_class(upstream, key).Settings, upstream.webhook, f"{key}.webhook")


def create_webhook(upstream: UpstreamConfig, key: str, context: WebhookContext) -> ProviderWebhook:
    cls = webhook_class(upstream, key)
    settings = build(cls.Settings, upstream.webhook, f"{key}.webhook")
    hook: ProviderWebhook = cls.from_config(upstream, settings, context)
    return hook


class ProviderHooks:
    """The event endpoints of the upstreams that take events, by upstream name: built from
    a config, and replaced whole by a reload (a new signing key, an upstream that now
    takes events) while requests are served: a request uses the set it found."""

    def __init__(self, context: WebhookContext) -> None:
        self.context = context
        self.hooks: dict[str, ProviderWebhook] = {}

    def build(self, config: Config) -> dict[str, ProviderWebhook]:
        """The endpoints `config` asks for (ConfigError naming the key when one can't be
        made); nothing running changes."""
        return {
            up.name: create_webhook(up, f"upstream[{i}]", self.context)
            for i, up in enumerate(config.upstream)
            if up.events
        }

    def swap(self, hooks: dict[str, ProviderWebhook]) -> list[ProviderWebhook]:
        """Put `hooks` in force; the replaced ones, for the caller to close."""
        old, self.hooks = self.hooks, hooks
        return [hook for hook in old.values() if hook not in hooks.values()]

    def get(self, name: str) -> ProviderWebhook | None:
        return self.hooks.get(name)

    async def close(self) -> None:
        for hook in self.swap({}):
            await hook.close()
