"""The directory where the workers of one `relay serve` keep their Prometheus values.

prometheus_client adds up the values of several processes when they all write to files
in PROMETHEUS_MULTIPROC_DIR, and it reads that variable when it is first imported. So
`relay serve` makes the directory before it forks any worker (`prepare`), removes it when
it exits (`cleanup`), and removes those left by a relay that was killed (`sweep`) when
it starts. The directory is private to the run (mode 0700, a new name each time, under
the system's temporary directory, normally a tmpfs): no values of an earlier run or of
another relay on the host are ever added in. A worker that restarts writes new files
under its new pid; its predecessor's stay, so counters never go backwards.

This module does not import prometheus_client: it must run before anything does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "relay-metrics-"


def prepare(workers: int) -> Path | None:
    """For `workers` > 1, a new directory in PROMETHEUS_MULTIPROC_DIR (None otherwise:
    one process keeps its values in memory, and an inherited variable is dropped so that
    it does not switch the relay to files it would not clean)."""
    if workers <= 1:
        os.environ.pop(ENV, None)
        _reload_value_class()
        return None
    sweep()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    os.environ[ENV] = str(path)
    _reload_value_class()
    return path


def cleanup(path: Path | None) -> None:
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(ENV) == str(path):
        del os.environ[ENV]
        _reload_value_class()


def sweep(directory: Path | None = None) -> list[Path]:
    """Remove the directories of relays that are gone (killed before their cleanup): those
    named for a pid that no longer runs, owned by this user. The paths removed."""
    base = Path(directory or tempfile.gettempdir())
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        pid_text = path.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_uid == os.getuid():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reload_value_class() -> None:
    """When prometheus_client was imported before the variable changed, make the metrics
    created from now on follow it (the library chooses its value class at import)."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        setattr(values, "ValueClass", values.get_value_class())  # noqa: B010
