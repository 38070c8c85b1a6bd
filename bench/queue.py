"""The queue engines on loopback: SQLite before/after the queue interface, PostgreSQL
against SQLite, a PostgreSQL cluster of 1-3 hosts, and commit → first attempt latency.

    .venv/bin/python -m bench.queue            # full run (~10 minutes)
    .venv/bin/python -m bench.queue --quick    # one run of each load

Postfix's smtp-source is the load and smtp-sink the destination, as in bench.perf; the
relays under test take turns within each run. "Before" is another revision of this
repository (default: the last commit before relay/queue existed) checked out in a
temporary git worktree and run with the same virtualenv. PostgreSQL is a private
throwaway cluster (the tests' own fixture code); every host of the "cluster" is a relay
process on this machine with its own node name, port and leases, so the ceiling is the
two cores: the table reports CPU per message beside msg/s for that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.perf import (
    REPO_ROOT,
    BenchError,
    RelayProcess,
    RunResult,
    Settings,
    Sink,
    _kb,
    _med,
    _num,
    _ratio,
    ensure_postfix,
    git_revision,
    make_message,
    run_load,
    smtp_source,
    smtp_upstream,
    throughput,
    timed_message,
    tree_cpu_seconds,
    wait_until,
    write_report,
)
from bench.worktree import worktree
from relay.queue.postgres.engine import PostgresQueue
from tests.fakes.postgres import PostgresCluster, create_database

BASE_REVISION = "255ce63"  # the last commit before the queue interface


@contextlib.contextmanager
def postgres(top: Path) -> Iterator[PostgresCluster]:
    root = top / "pg"
    root.mkdir()
    cluster = PostgresCluster(root)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.stop("fast")


def fresh_database(cluster: PostgresCluster) -> str:
    return asyncio.run(create_database(cluster.dsn))


def relay(
    top: Path,
    name: str,
    sink: Sink,
    settings: Settings,
    *,
    queue: str | None = None,
    src: Path = REPO_ROOT,
    workers: int | None = None,
    node: str = "",
) -> RelayProcess:
    return RelayProcess(
        top / name,
        upstream=smtp_upstream(sink.port),
        schedule=["5s", "30s"],
        log_level="info",  # "relay ready" is an info line; as bench.perf runs it
        workers=workers if workers is not None else settings.relay_workers,
        name=name,
        queue=queue,
        src=src,
        server_extra=f'node = "{node}"\n' if node else "",
    )


# -- a cluster load: one smtp-source per host, at once ---------------------------------------


@dataclass
class ClusterResult:
    hosts: int
    count: int
    accept_seconds: float
    e2e_seconds: float | None
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.accept_seconds


def cluster_load(
    hosts: Sequence[RelayProcess],
    sink: Sink,
    *,
    size: int,
    count: int,
    sessions: int,
    timeout: float,
) -> ClusterResult:
    base = sink.count()
    cpu0 = sum(tree_cpu_seconds(h.root_pid()) for h in hosts)
    share = count // len(hosts)
    errors: list[BaseException] = []
    started = time.monotonic()

    def one(host: RelayProcess) -> None:
        try:
            smtp_source(
                host.port,
                size=size,
                count=share,
                sessions=max(1, sessions // len(hosts)),
                timeout=timeout,
            )
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accept = time.monotonic() - started
    if errors:
        raise BenchError(f"cluster load failed: {errors[0]}")
    cpu1 = sum(tree_cpu_seconds(h.root_pid()) for h in hosts)
    total = share * len(hosts)
    done = wait_until(lambda: sink.count() >= base + total, timeout=timeout, interval=0.02)
    return ClusterResult(
        hosts=len(hosts),
        count=total,
        accept_seconds=accept,
        e2e_seconds=time.monotonic() - started if done else None,
        cpu_seconds=cpu1 - cpu0,
    )


# -- commit → first attempt ----------------------------------------------------------------


async def claim_latency(
    hosts: Sequence[RelayProcess], dsn: str, *, count: int, rate: float
) -> list[float]:
    """Send `count` messages at `rate`, alternating hosts, then read each timeline: the
    time from the 250 (the commit) to the start of the first attempt, in ms."""
    message = make_message(5_000)
    acked: list[float] = []
    for i in range(count):
        due = time.monotonic() + 1 / rate
        await timed_message(hosts[i % len(hosts)].port, message)
        acked.append(time.time())
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    queue = PostgresQueue(dsn, owner="bench:0:0")
    await queue.connect()
    try:
        async with asyncio.timeout(60):
            while (await queue.counts()).get("sent", 0) < count:
                await asyncio.sleep(0.2)
        rows = await queue.search(state="sent", limit=count + 100)
        starts = []
        for row in rows:
            attempt = next(e for e in await queue.timeline(row.id) if e["type"] == "attempt")
            starts.append(attempt["at"] - attempt["duration_ms"] / 1000)
    finally:
        await queue.close()
    # Rows and acks are both in arrival order (ids sort by time, one message at a time).
    return [(s - a) * 1000 for s, a in zip(sorted(starts), acked, strict=True)]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the run -------------------------------------------------------------------------------


def run(settings: Settings, args: argparse.Namespace) -> str:
    ensure_postfix()
    lines: list[str] = []
    top = Path(tempfile.mkdtemp(prefix="relay-queue-bench-"))
    top.chmod(0o755)  # the postgres user (PostgreSQL refuses root) must reach its directory
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: subprocess.run(["rm", "-rf", str(top)], check=False))
        sink = Sink(top)
        stack.callback(sink.stop)
        sink.start()
        base_src = stack.enter_context(worktree(args.base, top))
        cluster = stack.enter_context(postgres(top))

        # 1. engines side by side, one host
        servers = [
            relay(top, f"sqlite@{args.base}", sink, settings, src=base_src),
            relay(top, "sqlite", sink, settings),
            relay(top, "postgres", sink, settings, queue=fresh_database(cluster)),
        ]
        for s in servers:
            stack.callback(s.stop)
            s.start()
        results = throughput([(s, sink) for s in servers], settings)
        for s in servers:
            s.stop()
        lines += engines_table(results, settings, [s.name for s in servers])

        # 2. a cluster of 1, 2, 3 hosts on one database
        scaling: list[ClusterResult] = []
        for n in (1, 2, 3):
            dsn = fresh_database(cluster)
            hosts = [
                relay(top, f"pg{n}-host{i}", sink, settings, queue=dsn, workers=1, node=f"host{i}")
                for i in range(n)
            ]
            for h in hosts:
                stack.callback(h.stop)
                h.start()
            run_load(
                hosts[0], sink, size=5_000, count=settings.warmup, sessions=20, settings=settings
            )
            runs = [
                cluster_load(
                    hosts,
                    sink,
                    size=5_000,
                    count=settings.counts[5_000],
                    sessions=20,
                    timeout=settings.run_timeout,
                )
                for _ in range(settings.runs)
            ]
            runs.sort(key=lambda r: r.rate)
            scaling.append(runs[len(runs) // 2])  # the median run
            for h in hosts:
                h.stop()
        lines += scaling_table(scaling)

        # 3. commit → first attempt, two idle hosts
        dsn = fresh_database(cluster)
        hosts = [
            relay(top, f"lat-host{i}", sink, settings, queue=dsn, workers=1, node=f"lat{i}")
            for i in range(2)
        ]
        for h in hosts:
            stack.callback(h.stop)
            h.start()
        latencies = asyncio.run(claim_latency(hosts, dsn, count=args.latency_count, rate=20))
        lines += [
            "",
            f"Commit → first attempt, 2 idle hosts on one PostgreSQL, {len(latencies)} messages"
            " at 20/s alternating hosts (from each message's 250 to its attempt's start):"
            f" p50 {pct(latencies, 0.5):.1f} ms, p99 {pct(latencies, 0.99):.1f} ms,"
            f" max {max(latencies):.1f} ms.",
        ]
    header = [
        f"# bench.queue at {git_revision()} (before = {args.base}),"
        f" {time.strftime('%Y-%m-%d %H:%M')}, medians of {settings.runs}",
        "",
    ]
    return "\n".join(header + lines) + "\n"


def engines_table(
    results: dict[tuple[int, int, str], list[RunResult]], settings: Settings, names: list[str]
) -> list[str]:
    before = names[0]
    lines = [
        f"| size | sessions | {before} acc msg/s | sqlite acc | postgres acc "
        "| sqlite ÷ before (acc) | sqlite ÷ before (e2e) | postgres ÷ sqlite (acc) "
        "| postgres ÷ sqlite (e2e) | CPU ms per message before / sqlite / postgres |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in settings.sizes:
        for sessions in settings.sessions:
            b, s, p = (results.get((size, sessions, n), []) for n in names)
            ba, sa, pa = (_med([x.accepted_rate for x in r]) for r in (b, s, p))
            be, se, pe = (_med([x.e2e_rate for x in r]) for r in (b, s, p))
            bc, sc, pc = (_med([cpu_ms_per_message(x) for x in r]) for r in (b, s, p))
            lines.append(
                f"| {_kb(size)} | {sessions} | {_num(ba)} | {_num(sa)} | {_num(pa)} "
                f"| **{_ratio(sa, ba)}** | **{_ratio(se, be)}** | **{_ratio(pa, sa)}** "
                f"| **{_ratio(pe, se)}** | {_num(bc, '{:.2f}')} / {_num(sc, '{:.2f}')}"
                f" / {_num(pc, '{:.2f}')} |"
            )
    return lines


def cpu_ms_per_message(r: RunResult) -> float:
    """The server's own CPU per accepted message: the figure machine noise moves least."""
    return 10 * r.server_cpu_percent / r.accepted_rate


def scaling_table(results: Sequence[ClusterResult]) -> list[str]:
    lines = [
        "",
        "| hosts on one PostgreSQL | accepted msg/s | per host | e2e msg/s "
        "| CPU ms per message (all hosts) | ÷ 1 host |",
        "|---|---|---|---|---|---|",
    ]
    one = results[0].rate
    for r in results:
        e2e = None if r.e2e_seconds is None else r.count / r.e2e_seconds
        lines.append(
            f"| {r.hosts} | {r.rate:,.0f} | {r.rate / r.hosts:,.0f} | {_num(e2e)} "
            f"| {1000 * r.cpu_seconds / r.count:.2f} | {r.rate / one:.2f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--base", default=BASE_REVISION, help="the 'before' revision")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 100_000])
    parser.add_argument("--sessions", type=int, nargs="+", default=[20])
    parser.add_argument("--latency-count", type=int, default=300)
    parser.add_argument("--count", type=int, default=0, help="messages per run (all sizes)")
    args = parser.parse_args(argv)
    from bench.perf import parse_args

    perf_args = parse_args(
        [
            *(["--quick"] if args.quick else []),
            "--runs",
            str(args.runs),
            "--sizes",
            *map(str, args.sizes),
            "--sessions",
            *map(str, args.sessions),
            "--count",
            str(args.count),
        ]
    )
    settings = Settings.from_args(perf_args)
    started = time.monotonic()
    try:
        text = run(settings, args)
    except BenchError as exc:
        print(f"bench.queue: {exc}", file=sys.stderr)
        return 1
    write_report("queue", text, started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
