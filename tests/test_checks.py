"""relay.checks: the config sections that relay.config leaves to the packages defining them."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

import relay.config
from relay.app import Relay
from relay.checks import check, load_checked
from relay.config import ConfigError
from tests.conftest import relay_config

BAD_KEY = "-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"upstream": [{"name": "x", "type": "carrier-pigeon"}]},
            "upstream[0].type: unknown upstream type 'carrier-pigeon'",
        ),
        (
            {"upstream": [{"name": "x", "type": "ses", "regoin": "eu-west-1"}]},
            "upstream[0].regoin: unknown key",
        ),
        (
            {"dkim": [{"domain": "example.com", "selector": "s1", "private_key": BAD_KEY}]},
            "dkim: dkim key for domain 'example.com'",
        ),
        (
            {"inbound": {"sns": {"topics": ["arn:aws:sns:eu-west-1:1:t"]}}},
            "inbound.route: at least one",
        ),
    ],
)
def test_check_names_the_key_parse_leaves_raw(
    tmp_path: Path, sections: dict[str, Any], message: str
) -> None:
    cfg = relay_config(tmp_path, **sections)  # parse() alone accepts it
    with pytest.raises(ConfigError, match=re.escape(message)):
        check(cfg)


def test_an_in_process_relay_checks_its_config(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path, upstream=[{"name": "x", "type": "smtp", "port": 25}])
    with pytest.raises(ConfigError, match=re.escape("upstream[0].host: required key")):
        Relay(cfg)


def test_load_checked_checks(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[[upstream]]\nname = 'x'\ntype = 'carrier-pigeon'\n")
    relay.config.load(path)
    with pytest.raises(ConfigError, match="carrier-pigeon"):
        load_checked(path)


def test_config_imports_no_relay_module() -> None:
    """The packages relay.config configures import it: importing any of them back is a circle."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(Path(relay.config.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add("relay" if node.level else node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {name for name in imported if name.partition(".")[0] == "relay"} == set()
