"""docker/ checked without Docker: the Dockerfile's shape and its (absence of) pins, the
compose file's services and profiles, the configs the image ships, the entrypoint's
behaviour, the systemd unit, and smoke.sh's syntax."""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from relay.config import ConfigError, ServerConfig, load
from relay.supervisor import STOP_MARGIN
from tests.packaging.pins import DOCKER, PIN, ROOT, normalise, pyproject, runtime_pins

TOKEN = "docker-files-test-token-0123456789"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(DOCKER / "Dockerfile"):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


def config_listen_ports(config: Path) -> set[int]:
    environment = {"RELAY_TOKEN_OPS": TOKEN, "RELAY_QUEUE_DSN": "postgresql://relay@db/relay"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        cfg = load(config)
    return {int(listen.address.rsplit(":", 1)[1]) for listen in cfg.smtp.listen} | {
        int(cfg.web.listen.rsplit(":", 1)[1])
    }


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", text.strip())
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def outlasting_the_drain() -> float:
    """The longest a relay takes to stop by itself: the default shutdown grace, then the
    20 seconds the supervisor gives its workers before killing them."""
    return float(ServerConfig().shutdown_grace) + STOP_MARGIN


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_two_stages_on_python_3_11_slim() -> None:
    arguments = dict(a.split("=", 1) for k, a in instructions(DOCKER / "Dockerfile") if k == "ARG")
    assert arguments["PYTHON_IMAGE"] == "python:3.11-slim"
    build, runtime = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert runtime[0] == ("FROM", "${PYTHON_IMAGE} AS runtime")
    build_runs = " ".join(a for k, a in build if k == "RUN")
    assert "relay-build-wheels /src /wheels" in build_runs
    runtime_runs = " ".join(a for k, a in runtime if k == "RUN")
    # The runtime installs the build stage's wheels, without copying them into a layer.
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in runtime_runs
    assert "relay-install-venv /opt/relay /wheels" in runtime_runs


def test_dockerfile_runs_as_a_non_root_user_with_volumes_ports_and_healthcheck() -> None:
    runtime = dict(stages()[1])
    assert runtime["USER"] == "10001:10001"
    assert "useradd --system --uid 10001" in " ".join(a for k, a in stages()[1] if k == "RUN")
    assert set(re.findall(r'"([^"]+)"', runtime["VOLUME"])) == {"/var/lib/relay", "/etc/relay/tls"}
    assert {int(p) for p in runtime["EXPOSE"].split()} == config_ports_of_image()
    assert runtime["HEALTHCHECK"].endswith('CMD ["relay-entrypoint", "healthcheck"]')
    assert runtime["ENTRYPOINT"] == '["relay-entrypoint"]'
    assert runtime["CMD"] == '["serve"]'
    env = runtime["ENV"]
    assert "RELAY_CONFIG=/etc/relay/config.toml" in env
    assert "RELAY_HEALTH_URL=http://127.0.0.1:8025/readyz" in env


def config_ports_of_image() -> set[int]:
    return config_listen_ports(DOCKER / "config.toml")


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        """The last pattern matching the path or one of its parents decides."""
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/").replace("**/", "*").replace("**", "*")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
                included = negated
        return included

    for keyword, arguments in instructions(DOCKER / "Dockerfile"):
        if keyword != "COPY" or "--from=" in arguments:
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert sent(source), f"COPY {source}: excluded by Dockerfile.dockerignore"
            if (ROOT / source).is_dir():
                assert sent(f"{source}/app.py") or not (ROOT / source / "app.py").exists()
    assert not sent(".venv/bin/python") and not sent("var/queue/queue.db")


def test_the_image_has_no_pins_of_its_own_and_installs_the_fast_extra() -> None:
    """pyproject.toml is the only list of versions: a pin written in docker/ could drift."""
    pins = runtime_pins()
    assert pins["uvloop"], "uvloop is pinned in the fast extra"
    for path in [DOCKER / "Dockerfile", *DOCKER.glob("*.sh")]:
        for token in re.findall(r"[A-Za-z0-9_.\[\]-]+==[^\s\"']+", path.read_text()):
            match = PIN.match(token)
            assert match and pins.get(normalise(match.group(1))) == match.group(3), (
                f"{path.name}: {token} is not pyproject.toml's pin"
            )
    assert '"${source_dir}[fast]"' in (DOCKER / "build-wheels.sh").read_text()
    install = (DOCKER / "install-venv.sh").read_text()
    assert "--no-index" in install and '"relay[fast]"' in install
    fast = pyproject()["project"]["optional-dependencies"]["fast"]  # type: ignore[index]
    assert any(requirement.startswith("uvloop==") for requirement in fast)


# -- the configs the image ships ----------------------------------------------------------


def test_image_config_listens_everywhere_with_tokens_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_TOKEN_OPS", TOKEN)
    cfg = load(DOCKER / "config.toml")
    assert [listen.address for listen in cfg.smtp.listen] == ["0.0.0.0:2525"]
    assert cfg.web.listen == "0.0.0.0:8025"
    assert [token.role for token in cfg.web.tokens] == ["admin"]
    # /etc/relay/var is the volume: the queue and the outbox land in it.
    assert cfg.resolve(cfg.server.queue) == DOCKER / "var/queue"
    assert cfg.server.workers == 0
    monkeypatch.delenv("RELAY_TOKEN_OPS")
    with pytest.raises(
        ConfigError, match=r"web\.tokens\[0\]\.token: environment variable RELAY_TOKEN_OPS"
    ):
        load(DOCKER / "config.toml")


def test_cluster_config_takes_the_queue_dsn_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_TOKEN_OPS", TOKEN)
    monkeypatch.setenv("RELAY_QUEUE_DSN", "postgresql://relay:pw@postgres:5432/relay")
    cfg = load(DOCKER / "cluster.toml")
    assert str(cfg.server.queue).startswith("postgresql://relay:pw@postgres:5432/relay")
    assert config_listen_ports(DOCKER / "cluster.toml") == {2525, 8025}


# -- compose.yaml -------------------------------------------------------------------------


def test_compose_default_is_the_relay_alone_and_cluster_is_two_relays_and_postgres() -> None:
    services = compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"relay"}
    cluster = {
        name for name, service in services.items() if "cluster" in service.get("profiles", [])
    }
    assert cluster == {"postgres", "relay-a", "relay-b"}
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_compose_relays_are_built_from_the_dockerfile_with_their_volume() -> None:
    document = compose()
    services = document["services"]
    for name in ("relay", "relay-a", "relay-b"):
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        volume = next(v for v in service["volumes"] if v.endswith(":/var/lib/relay"))
        assert volume.split(":")[0] in document["volumes"]
        assert "RELAY_TOKEN_OPS" in service["environment"]
        inside = {int(mapping.rsplit(":", 1)[1]) for mapping in service["ports"]}
        assert inside == {2525, 8025}
        # docker stop waits longer than the relay's drain before SIGKILL.
        assert _seconds(service["stop_grace_period"]) > outlasting_the_drain()
    for name in ("relay-a", "relay-b"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["environment"]["RELAY_QUEUE_DSN"].startswith("postgresql://relay:")
        mount = next(v for v in service["volumes"] if ":/etc/relay/config.toml" in v)
        assert (DOCKER / mount.split(":")[0]).resolve() == DOCKER / "cluster.toml"
    assert services["relay-a"]["hostname"] != services["relay-b"]["hostname"]


# -- entrypoint.sh ------------------------------------------------------------------------


def entrypoint(*arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(shutil.which("relay") or ROOT / ".venv/bin/relay").parent)
    return subprocess.run(
        [str(DOCKER / "entrypoint.sh"), *arguments],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_entrypoint_without_a_config_says_where_to_mount_it(tmp_path: Path) -> None:
    result = entrypoint("serve", RELAY_CONFIG=str(tmp_path / "missing.toml"))
    assert result.returncode == 78
    assert f"cannot read the config file {tmp_path / 'missing.toml'}" in result.stderr
    assert "Mount yours there" in result.stderr


def test_entrypoint_runs_relay_commands_with_relay_config() -> None:
    result = entrypoint("check-config", RELAY_CONFIG=str(ROOT / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{ROOT / 'config.toml'}: ok")


def test_entrypoint_runs_other_programs_as_they_are() -> None:
    result = entrypoint("sh", "-c", 'echo "config=$RELAY_CONFIG"')
    assert result.stdout == "config=/etc/relay/config.toml\n"


# -- relay.service ------------------------------------------------------------------------


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DOCKER / "relay.service").read_text())
    return parser


def test_systemd_unit_is_notify_hardened_and_outlasts_the_drain() -> None:
    service = unit()["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/relay",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "User": "relay",
        "KillMode": "mixed",
        "RestartPreventExitStatus": "78",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["ExecStart"] == "/opt/relay/bin/relay --config /etc/relay/config.toml serve"
    assert _seconds(service["TimeoutStopSec"]) > outlasting_the_drain()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_has_no_unknown_keys(tmp_path: Path) -> None:
    copy = tmp_path / "relay.service"
    copy.write_text(
        (DOCKER / "relay.service").read_text().replace("/opt/relay/bin/relay", "/bin/true")
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


# -- smoke.sh -----------------------------------------------------------------------------


def test_smoke_script_is_strict_bash_that_parses() -> None:
    script = DOCKER / "smoke.sh"
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    for name in ("entrypoint.sh", "build-wheels.sh", "install-venv.sh"):
        assert os.access(DOCKER / name, os.X_OK), name
        subprocess.run(["sh", "-n", str(DOCKER / name)], check=True, timeout=30)
