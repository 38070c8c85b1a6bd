"""bench/perf.py's measuring parts: the RSS sampler sees a process tree's growth, the
physical-limit run counts what smtp-sink took, the loads and tables come out as the README
describes, and a before/after checkout comes and goes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.perf import (
    CEILING,
    RELAY_HTTP,
    Ceiling,
    LatencyResult,
    PeakRss,
    RunResult,
    Settings,
    cpu_table,
    http_table,
    latency_table,
    parse_args,
    rss_table,
    run_load,
    throughput_table,
)
from bench.worktree import WorktreeError, worktree

# A child that starts a grandchild; the grandchild takes 150 MB when told, says so, and
# holds it until stdin closes.
GRANDCHILD = (
    "import sys; sys.stdin.readline(); held = b'x' * 150_000_000; "
    "print('held', flush=True); sys.stdin.read()"
)
CHILD = (
    f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}], check=True)"
)


def test_peak_rss_counts_what_a_descendant_took_during_the_run() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        with PeakRss(child.pid) as rss:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            assert child.stdout.readline() == b"held\n"
        assert rss.before_mb < 100
        assert rss.peak_mb - rss.before_mb >= 140
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def settings(*argv: str) -> Settings:
    return Settings.from_args(parse_args(["--quick", *argv]))


def test_the_default_loads_add_1_and_5_mb_with_5_mb_at_20_sessions_only() -> None:
    loads = settings().loads()
    assert loads == [
        (5_000, 20),
        (5_000, 100),
        (100_000, 20),
        (100_000, 100),
        (1_000_000, 20),
        (1_000_000, 100),
        (5_000_000, 20),
    ]
    assert settings("--big-message-sessions", "20", "100").loads()[-2:] == [
        (5_000_000, 20),
        (5_000_000, 100),
    ]
    assert Settings.from_args(parse_args([])).counts == {
        5_000: 4_000,
        100_000: 2_000,
        1_000_000: 500,
        5_000_000: 200,
    }


def result(name: str, *, rate: float, cpu: float, peak: float = 0.0) -> RunResult:
    """A run of 100 messages at `rate` msg/s taking `cpu` seconds of CPU."""
    return RunResult(
        server=name,
        size=100_000,
        sessions=20,
        count=100,
        accept_seconds=100 / rate,
        e2e_seconds=200 / rate,
        server_cpu_percent=100 * cpu * rate / 100,
        host_busy_percent=90.0,
        server_cpu_seconds=cpu,
        server_cpu_e2e_seconds=2 * cpu,
        destination_cpu_seconds=0.01,
        rss_before_mb=100.0,
        rss_peak_mb=peak,
    )


def row(table: list[str], *starts: str) -> list[str]:
    found = [line for line in table if line.startswith("| " + " | ".join(starts))]
    assert len(found) == 1, table
    return [cell.strip().strip("*") for cell in found[0].strip("|").split("|")]


def test_tables_show_ratios_to_postfix_the_ceiling_and_cpu_per_message() -> None:
    s = settings("--sizes", "100000", "--sessions", "20")
    results = {
        (100_000, 20, CEILING): [result(CEILING, rate=800, cpu=0.05)],
        (100_000, 20, "Postfix"): [result("Postfix", rate=400, cpu=0.2)],
        (100_000, 20, "relay"): [
            result("relay", rate=500, cpu=0.15, peak=180),
            result("relay", rate=600, cpu=0.1, peak=250),
            result("relay", rate=700, cpu=0.05, peak=120),
        ],
        (100_000, 20, RELAY_HTTP): [result(RELAY_HTTP, rate=520, cpu=0.3)],
    }
    cells = row(throughput_table(results, s), "100 KB", "20")
    assert cells[2:7] == ["800", "400", "600", "1.50", "0.75"]  # medians, then ratios
    cpu = row(cpu_table(results, s), "100 KB", "20")
    assert cpu[2:] == ["2.00", "1.00", "0.50", "4.00", "2.00", "0.50", "80 / 60"]
    http = row(http_table(results, s), "100 KB", "20")
    assert http[5:] == ["1.30", "3.00 / 6.00", "0.10"]
    big = settings("--sizes", "1000000", "--sessions", "20")
    results = {(1_000_000, 20, "relay"): results[(100_000, 20, "relay")]}
    assert row(rss_table(results, big, ["relay"]), "1 MB", "20", "relay")[3:] == [
        "100 MB",
        "250 MB",
        "150 MB",
    ]


def test_latency_rows_give_medians_over_the_runs_and_each_runs_p99() -> None:
    runs = []
    for slow in (0.011, 0.030, 0.020):
        r = LatencyResult("relay", rate=100, sessions=20, size=100_000)
        r.latencies = [0.001] * 90 + [slow] * 9 + [0.5]
        runs.append(r)
    other = LatencyResult("Postfix", rate=80, sessions=20, size=100_000)
    other.latencies = [0.002] * 100
    table = latency_table([runs[0], other, *runs[1:]])
    assert row(table, "relay", "100 KB")[3:] == [
        "100",
        "3 x 100",
        "0",
        "1.0",
        "20.0",
        "11.0 / 30.0 / 20.0",
        "500.0",
        "10.0 %",
    ]
    assert row(table, "Postfix", "100 KB")[6:8] == ["2.0", "2.0"]


@pytest.mark.skipif(not shutil.which("smtp-sink"), reason="needs Postfix's smtp-sink")
def test_the_ceiling_is_smtp_source_straight_into_smtp_sink(tmp_path: Path) -> None:
    ceiling = Ceiling(tmp_path)
    ceiling.start()
    try:
        r = run_load(ceiling, ceiling, size=5_000, count=200, sessions=10, settings=settings())
    finally:
        ceiling.stop()
    assert r.server == CEILING
    assert ceiling.count() == 200
    assert r.e2e_seconds is not None and r.server_cpu_seconds >= 0


def test_a_base_revision_is_checked_out_beside_and_removed_after(tmp_path: Path) -> None:
    with worktree("HEAD", tmp_path) as src:
        assert (src / "relay" / "__main__.py").exists()
    assert not src.exists()
    with (
        pytest.raises(WorktreeError, match="no-such-revision"),
        worktree("no-such-revision", tmp_path),
    ):
        pass
