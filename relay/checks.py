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

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from relay.config import Config, ConfigError, load, summary, take_warnings
from relay.upstreams.registry import validate_upstream


def check(cfg: Config) -> tuple[str, ...]:
    """Raise ConfigError naming the key (`upstream[1].region: ...`) if any section is
    wrong; every section is checked, and all the problems are in the one error. Returns
    the warnings of these sections (a literal secret)."""
    problems: list[str] = []
    take_warnings()

    def collect(run: Callable[[], object]) -> None:
        try:
            run()
        except ConfigError as exc:
            problems.extend(_lines(str(exc)))

    for i, up in enumerate(cfg.upstream):
        collect(functools.partial(validate_upstream, up, f"upstream[{i}]", cfg))
        if up.events:
            from relay.events.registry import validate_webhook

            collect(functools.partial(validate_webhook, up, f"upstream[{i}]"))
    if cfg.dkim:
        from relay.dkim import DKIMSigner

        def dkim() -> None:
            try:
                DKIMSigner.from_configs(cfg.dkim)
            except ValueError as exc:
                raise ConfigError(f"dkim: {exc}") from None

        collect(dkim)
    if cfg.inbound:
        from relay.inbound.settings import parse_inbound

        collect(lambda: parse_inbound(cfg.inbound, cfg))
    if problems:
        raise ConfigError(summary(problems))
    warnings = take_warnings()
    if not cfg.web.tokens:
        warnings += (
            "web.tokens: none configured, so the status page and the API answer 403;"
            " `relay token new` makes one",
        )
    return warnings


def _lines(message: str) -> list[str]:
    """The problems in a ConfigError (one, or "N problems:" and one per line)."""
    first, _, rest = message.partition("\n")
    return [line.strip() for line in rest.splitlines()] if rest else [first]


def load_checked(path: str | Path) -> Config:
    """`relay.config.load()` followed by `check()`: a config ready to run."""
    cfg = load(path)
    extra = check(cfg)
    return dataclasses.replace(cfg, warnings=cfg.warnings + extra) if extra else cfg
