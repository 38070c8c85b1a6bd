"""The dependency pins of pyproject.toml: the one list the image is built from."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;,]+)$")


def normalise(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter in a distribution's name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_pins() -> dict[str, str]:
    """{name: version} of the image's dependencies: [project] dependencies and the "fast"
    extra (uvloop). Every one must be an exact pin."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    requirements = [*project["dependencies"], *project["optional-dependencies"]["fast"]]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"pyproject.toml: {requirement!r} is not pinned with =="
        pins[normalise(match.group(1))] = match.group(3)
    return pins
