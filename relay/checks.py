"""The checks of a config that need the packages it configures: upstreams, DKIM, inbound.

`relay.config` turns the file into dataclasses and checks what it can on its own (types,
units, required keys), but each upstream type's own keys, the DKIM keys and the
`[inbound]` section are defined by the packages that use them, and those packages import
`relay.config`. Checking them from `config.parse()` made a circle; they are checked here
instead, by whoever loads a config for use: `relay.cli` (so `relay check-config` names the
offending key) and `relay.app.Relay` (so a relay built in-process from `config.parse()`
fails at construction, not at its first message).

The DKIM and inbound modules are imported only when the config has those sections, as
`config.parse()` did, so checking a config without them does not load them.
"""

from __future__ import annotations

from pathlib import Path

from relay.config import Config, ConfigError, load
from relay.upstreams.registry import validate_upstream


def check(cfg: Config) -> None:
    """Raise ConfigError naming the key (`upstream[1].region: ...`) if any section is wrong."""
    for i, up in enumerate(cfg.upstream):
        validate_upstream(up, f"upstream[{i}]", cfg)
    if cfg.dkim:
        from relay.dkim import DKIMSigner

        try:
            DKIMSigner.from_configs(cfg.dkim)
        except ValueError as exc:
            raise ConfigError(f"dkim: {exc}") from None
    if cfg.inbound:
        from relay.inbound.settings import parse_inbound

        parse_inbound(cfg.inbound, cfg)  # raises ConfigError naming the inbound key


def load_checked(path: str | Path) -> Config:
    """`relay.config.load()` followed by `check()`: a config ready to run."""
    cfg = load(path)
    check(cfg)
    return cfg
