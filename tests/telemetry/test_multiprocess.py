"""The directory `relay serve` gives its workers for their Prometheus values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import values

from relay.telemetry import multiprocess
from relay.telemetry.multiprocess import ENV, PREFIX


def test_prepare_makes_a_private_directory_and_cleanup_removes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    path = multiprocess.prepare(2)
    try:
        assert path is not None and path.is_dir()
        assert path.name.startswith(f"{PREFIX}{os.getpid()}-")
        assert path.stat().st_mode & 0o777 == 0o700
        assert os.environ[ENV] == str(path)
        # prometheus_client was imported before: metrics made now follow the variable.
        assert values.ValueClass.__name__ == "MmapedValue"
    finally:
        multiprocess.cleanup(path)
    assert path is not None and not path.exists()
    assert ENV not in os.environ
    assert values.ValueClass.__name__ == "MutexValue"


def test_one_worker_keeps_its_values_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))  # inherited from somewhere else
    assert multiprocess.prepare(1) is None
    assert ENV not in os.environ
    assert values.ValueClass.__name__ == "MutexValue"


def test_sweep_removes_only_directories_of_relays_that_are_gone(tmp_path: Path) -> None:
    gone = tmp_path / f"{PREFIX}99999999-abc"  # above any pid_max: no such process
    running = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated-99999999"
    for path in (gone, running, other):
        path.mkdir()
    (gone / "counter_1.db").write_bytes(b"\0" * 8)
    assert multiprocess.sweep(tmp_path) == [gone]
    assert not gone.exists() and running.exists() and other.exists()
