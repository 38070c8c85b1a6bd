"""Relay vs Postfix on loopback: accepted and relayed msg/s, CPU, latency, memory, restart.

Run from the repository root with the project's virtualenv:

    .venv/bin/python -m bench.perf            # full run (~15-20 minutes)
    .venv/bin/python -m bench.perf --quick    # one run of each load (~2 minutes)

Postfix's own test tools are the load generator (`smtp-source`) and the final destination
(`smtp-sink`); a private Postfix instance (its own config, queue and data directories
under a temporary directory, listening only on 127.0.0.1) is the baseline. Both servers
relay to the same smtp-sink; loads alternate between them. Nothing listens beyond
127.0.0.1, every subprocess has a time limit, and every server started here is stopped.
See bench/README.md for what each figure means, and the latest figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TypeVar

from bench.worktree import WorktreeError, worktree

T = TypeVar("T")

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
POSTFIX_TEMPLATES = BENCH_DIR / "postfix"
OUT_DIR = BENCH_DIR / "out"
SBIN = Path("/usr/sbin")
MAIL_FROM = "from@example.com"
RCPT_TO = "to@example.org"
PROVIDER_KEY_VARIABLE = "BENCH_PROVIDER_KEY"  # as bench/provider.py reads it
PROVIDER_KEY = "bench-provider-key"
UPSTREAM_CONCURRENCY = 50  # Postfix's destination concurrency and the relay's upstream pool
BUSY_WARNING = 15.0  # % of the machine busy before the start that earns a warning
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# The relay logs one of these for every delivery attempt it finishes.
ATTEMPT_MARKERS = (" deferred until ", " sent via ", " failed: ")
DEFAULT_SIZES = (5_000, 100_000, 1_000_000, 5_000_000)
BIG_MESSAGE = 5_000_000  # from this size on, loads run at --big-message-sessions only
BIG_MESSAGE_SESSIONS = 20
LARGE_FOR_RSS = 1_000_000  # sizes whose runs get a row in the peak-RSS table
LATENCY_SIZES = (5_000, 100_000)
LATENCY_SESSIONS = 20
SLOW_REPLY = 0.010  # seconds: the latency table counts the share of replies slower than this
RSS_INTERVAL = 0.05  # seconds between two RSS samples of a server's process tree
CEILING = "smtp-sink alone"  # smtp-source straight into smtp-sink: the physical limit


class BenchError(RuntimeError):
    """A setup or run problem, phrased for the person running the benchmark."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    runs: int
    sizes: tuple[int, ...]
    sessions: tuple[int, ...]
    counts: dict[int, int]  # message size → messages per run
    warmup: int
    fill: int
    latency_seconds: float
    latency_sessions: int
    run_timeout: float
    drain_timeout: float
    skip_latency: bool
    skip_memory: bool
    skip_http: bool
    keep: bool
    workdir: str | None
    relay_log_level: str
    relay_workers: int | None
    big_message_sessions: tuple[int, ...] = (BIG_MESSAGE_SESSIONS,)
    base: str | None = None
    validating_provider: bool = False
    skip_ceiling: bool = False
    latency_sizes: tuple[int, ...] = LATENCY_SIZES

    def loads(self) -> list[tuple[int, int]]:
        """(size, sessions) of every throughput load, in the order they run: messages of
        BIG_MESSAGE bytes or more only at `big_message_sessions` (a hundred 5 MB sessions
        at once is half a gigabyte in flight, and minutes per run on two cores)."""
        return [
            (size, sessions)
            for size in self.sizes
            for sessions in (self.big_message_sessions if size >= BIG_MESSAGE else self.sessions)
        ]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        return cls(
            quick=quick,
            runs=args.runs or (1 if quick else 3),
            sizes=tuple(args.sizes),
            sessions=tuple(args.sessions),
            counts={size: args.count or _default_count(size, quick=quick) for size in args.sizes},
            warmup=100 if quick else 300,
            fill=args.fill or (5_000 if quick else 100_000),
            latency_seconds=5.0 if quick else 10.0,
            latency_sessions=20,
            run_timeout=args.run_timeout,
            drain_timeout=args.run_timeout,
            skip_latency=bool(args.skip_latency),
            skip_memory=bool(args.skip_memory),
            skip_http=bool(args.skip_http),
            keep=bool(args.keep),
            workdir=args.workdir,
            relay_log_level=args.relay_log_level,
            relay_workers=args.relay_workers,
            big_message_sessions=tuple(args.big_message_sessions),
            base=args.base,
            validating_provider=bool(args.validating_provider),
            skip_ceiling=bool(args.skip_ceiling),
        )


def _default_count(size: int, *, quick: bool) -> int:
    """Messages per run: a few seconds of load at the rates this kind of machine reaches
    (about 600 msg/s at 5 KB, 350 at 100 KB, 60 at 1 MB, 15 at 5 MB for the relay)."""
    if size <= 20_000:
        return 1_000 if quick else 4_000
    if size <= 200_000:
        return 500 if quick else 2_000
    if size <= 2_000_000:
        return 60 if quick else 500
    return 20 if quick else 200


# -- processes and /proc ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks of the process and of its reaped children) from /proc."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid=4, utime=14, stime=15, cutime=16, cstime=17
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def process_tree(root: int) -> dict[int, int]:
    """pid → CPU ticks for `root` and all its descendants."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree: dict[int, int] = {}
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        tree[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time used so far by a process tree. Children that exited and were reaped are
    counted in their parent's cutime/cstime, so deltas over a run stay right."""
    return sum(process_tree(root).values()) / CLK_TCK


def tree_rss_mb(root: int) -> float:
    """Resident size (VmRSS) summed over a process tree, in MB."""
    return pids_rss_mb(list(process_tree(root)))


def tree_status_mb(root: int, key: str) -> float:
    """Sum of one /proc/PID/status figure (such as VmHWM) over a process tree, in MB."""
    total_kb = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total_kb += float(line.split()[1])
    return total_kb / 1024


def pids_rss_mb(pids: Sequence[int]) -> float:
    """Resident size summed over some processes (those gone meanwhile count 0), in MB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total_kb += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    return total_kb / 1024


class PeakRss:
    """The largest resident size of a process tree while a run goes on, sampled every
    RSS_INTERVAL in a thread of its own.

    Summing VmHWM over the tree would include each process's start-up peak (and a forked
    worker's copy of its parent's pages at fork), so the figure would not be the run's.
    Walking all of /proc costs about a millisecond, so the tree's pids are refreshed every
    tenth sample and only their statm files read in between: a process born and gone
    within 0.5 s can be missed, which for the relay (a supervisor and its fixed workers)
    is nothing and for Postfix (an smtpd per session, reused) is little."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.before_mb = tree_rss_mb(root)
        self.peak_mb = self.before_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # One last look, so what the tree holds at the end counts however short the run.
        self.peak_mb = max(self.peak_mb, tree_rss_mb(self.root))

    def _sample(self) -> None:
        pids: list[int] = []
        n = 0
        while not self._stop.is_set():
            if n % 10 == 0:
                pids = list(process_tree(self.root))
            n += 1
            self.peak_mb = max(self.peak_mb, pids_rss_mb(pids))
            self._stop.wait(RSS_INTERVAL)


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return total - idle, total


def host_busy_percent(seconds: float) -> float:
    """The machine's busy share over the next `seconds` (0-100, all cores)."""
    busy0, total0 = host_cpu()
    time.sleep(seconds)
    busy1, total1 = host_cpu()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


def stop_group(proc: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM the process group started with start_new_session=True, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def run_checked(argv: Sequence[str], *, timeout: float, what: str) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: no result within {timeout:.0f}s ({' '.join(argv)})") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done.stdout


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


# -- Postfix: package, tools, private instance -------------------------------------------


def postfix_tool(name: str) -> Path | None:
    found = shutil.which(name)
    if found:
        return Path(found)
    candidate = SBIN / name
    return candidate if candidate.exists() else None


def ensure_postfix() -> None:
    """Install Debian's postfix (which ships smtp-source and smtp-sink) when missing,
    without configuring or starting the system's own Postfix service."""
    if all(postfix_tool(t) for t in ("postfix", "smtp-source", "smtp-sink", "postconf")):
        return
    if os.geteuid() != 0:
        raise BenchError(
            "postfix is not installed; run as root, or first: "
            "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
        )
    log("installing postfix (Debian package, 'No configuration', service not started)")
    _preseed()
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():  # keep the package's scripts from starting the system service
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for argv, limit in (
            (["apt-get", "update", "-qq"], 300.0),
            (["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"], 600.0),
        ):
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=limit, check=False
            )
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    finally:
        if made_policy:
            policy.unlink()
    if not postfix_tool("smtp-source"):
        raise BenchError("postfix was installed but smtp-source is not in /usr/sbin")


def _preseed() -> None:
    done = subprocess.run(
        ["debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"debconf-set-selections failed: {done.stderr}")


def postfix_version() -> str:
    try:
        done = subprocess.run(
            [str(postfix_tool("postconf") or "postconf"), "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def fill_template(path: Path, values: dict[str, str]) -> str:
    text = path.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise BenchError(f"{path}: no value for {', '.join(sorted(set(left)))}")
    return text


class Server:
    """A server under test: name, SMTP port, and the pid whose process tree is measured."""

    name: str
    port: int

    def root_pid(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class PostfixInstance(Server):
    """A private Postfix (`postfix -c DIR`) relaying everything to [127.0.0.1]:sink_port."""

    def __init__(self, top: Path, *, sink_port: int) -> None:
        self.name = "Postfix"
        self.top = top
        self.etc = top / "etc"
        self.queue = top / "queue"
        self.port = free_port()
        self.sink_port = sink_port
        self.started = False

    def start(self) -> None:
        self.top.mkdir(parents=True, exist_ok=True)
        self.top.chmod(0o755)  # the postfix user must reach its queue directory
        for d in (self.etc, self.queue):
            d.mkdir(mode=0o755, exist_ok=True)
        values = {
            "CONFIG_DIR": str(self.etc),
            "QUEUE_DIR": str(self.queue),
            "DATA_DIR": str(self.top / "data"),
            "LOG_FILE": str(self.top / "maillog"),
            "TOP_DIR": str(self.top),
            "SINK_PORT": str(self.sink_port),
            "UPSTREAM_CONCURRENCY": str(UPSTREAM_CONCURRENCY),
            "LISTEN": f"{HOST}:{self.port}",
        }
        for name in ("main.cf", "master.cf"):
            (self.etc / name).write_text(fill_template(POSTFIX_TEMPLATES / name, values))
        postfix = str(postfix_tool("postfix"))
        try:
            run_checked([postfix, "-c", str(self.etc), "check"], timeout=60, what="postfix check")
            self.started = True
            run_checked([postfix, "-c", str(self.etc), "start"], timeout=60, what="postfix start")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc
        if not wait_until(lambda: port_open(self.port), timeout=20, interval=0.05):
            raise BenchError(f"Postfix is not listening on {HOST}:{self.port}\n{self.log_tail()}")

    def root_pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().strip())

    def log_tail(self) -> str:
        path = self.top / "maillog"
        return path.read_text()[-2000:] if path.exists() else "(no maillog)"

    def stop(self) -> None:
        if not self.started:
            return
        postfix = str(postfix_tool("postfix"))
        try:
            pid: int | None = self.root_pid()
        except (OSError, ValueError):
            pid = None
        with contextlib.suppress(BenchError):
            run_checked([postfix, "-c", str(self.etc), "stop"], timeout=30, what="postfix stop")
        if pid is not None and not wait_until(
            lambda: not Path(f"/proc/{pid}").exists(), timeout=15, interval=0.1
        ):
            with contextlib.suppress(BenchError):
                run_checked([postfix, "-c", str(self.etc), "abort"], timeout=30, what="abort")
            for child in process_tree(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        self.started = False


# -- the relay -------------------------------------------------------------------------


RELAY_CONFIG = """\
# Written by bench/perf.py.
[server]
hostname = "relay-bench.localdomain"
queue = "{queue}"
min_free_disk = 0
{workers}
[smtp]
trusted_networks = ["127.0.0.0/8"]
max_message_size = "50MB"
timeout = "60s"

[[smtp.listen]]
address = "{host}:{port}"
tls = "none"
auth = "none"

[retry]
schedule = [{schedule}]
concurrency = {concurrency}
bounces = false

{upstream}
[web]
listen = "{host}:0"
"""


def smtp_upstream(port: int) -> str:
    """The relay's upstream: smtp-sink (or any SMTP server) on `port`."""
    return (
        f'[[upstream]]\nname = "sink"\ntype = "smtp"\nhost = "{HOST}"\nport = {port}\n'
        f'tls = "none"\nmax_concurrency = {UPSTREAM_CONCURRENCY}\n'
    )


def http_upstream(url: str) -> str:
    """The relay's upstream: the fake SendGrid of bench/provider.py at `url`."""
    return (
        f'[[upstream]]\nname = "provider"\ntype = "sendgrid"\nbase_url = "{url}"\n'
        f'api_key = "env:{PROVIDER_KEY_VARIABLE}"\nmax_concurrency = {UPSTREAM_CONCURRENCY}\n'
    )


class RelayProcess(Server):
    """`relay --config FILE serve` with a bench config in its own directory."""

    def __init__(
        self,
        top: Path,
        *,
        upstream: str,
        schedule: Sequence[str],
        log_level: str,
        workers: int | None,
        name: str = "relay",
        queue: str | None = None,
        server_extra: str = "",
        src: Path = REPO_ROOT,
    ) -> None:
        """`queue`: a PostgreSQL DSN instead of a queue directory under `top`; `src`: the
        source tree to run (another revision's checkout, for before/after runs)."""
        self.name = name
        self.src = src
        self.log_level = log_level
        self.top = top
        self.port = free_port()
        self.config = top / "relay.toml"
        self.log_path = top / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        top.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            RELAY_CONFIG.format(
                queue=queue or top / "queue",
                host=HOST,
                port=self.port,
                schedule=", ".join(f'"{s}"' for s in schedule),
                concurrency=2 * UPSTREAM_CONCURRENCY,
                upstream=upstream,
                workers=("" if workers is None else f"workers = {workers}\n") + server_extra,
            )
        )

    def argv(self, *command: str) -> list[str]:
        return [sys.executable, "-m", "relay", "--config", str(self.config), *command]

    def start(self, *, timeout: float = 120.0) -> float:
        """Start and wait for "relay ready"; returns the seconds that took."""
        self._log_file = self.log_path.open("ab")
        self._log_offset = self.log_path.stat().st_size
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv("serve", "--log-level", self.log_level),
            cwd=self.src,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,
            env={**os.environ, PROVIDER_KEY_VARIABLE: PROVIDER_KEY},
        )
        if not wait_until(
            lambda: self.log_contains("relay ready") or self.exited(), timeout=timeout
        ):
            raise BenchError(f"the relay did not log 'relay ready' in {timeout:.0f}s")
        if self.exited():
            raise BenchError(f"the relay exited at startup:\n{self.log_tail()}")
        return time.monotonic() - started

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def new_log(self) -> str:
        """Log text written since the last start."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def log_contains(self, *needles: str) -> bool:
        text = self.new_log()
        return any(n in text for n in needles)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def root_pid(self) -> int:
        if self.proc is None:
            raise BenchError("the relay is not running")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=60)
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# -- smtp-sink --------------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink as the final destination; counts messages with -c."""

    def __init__(self, top: Path) -> None:
        self.port = free_port()
        self.out_path = top / "smtp-sink.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [str(postfix_tool("smtp-sink")), "-c", "-m", "1000"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"{HOST}:{self.port}", "1000"]
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_until(lambda: port_open(self.port), timeout=10, interval=0.05):
            raise BenchError(f"smtp-sink did not start: {self.out_path.read_text()[-500:]}")

    def count(self) -> int:
        """Messages received so far (smtp-sink -c rewrites 'sess=N quit=N mesg=N\\r')."""
        with self.out_path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def root_pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=5)
            self.proc = None


class Ceiling(Sink, Server):
    """smtp-sink taking smtp-source's load directly, no server between: the most this
    machine's loopback, load generator and sink allow, the "physical limit" column. It is
    its own destination (every message it accepted has arrived)."""

    def __init__(self, top: Path) -> None:
        super().__init__(top / "ceiling")
        self.name = CEILING

    def start(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        super().start()


VALIDATING_PROVIDER = "bench.provider"  # the tests' FakeSendGrid, checking every request
CHEAP_PROVIDER = "bench.sink_provider"  # reads HTTP framing only: the HTTP smtp-sink


class Provider:
    """A fake SendGrid in its own process, the relay's HTTP upstream for the HTTP
    end-to-end figure: by default bench/provider.py, which checks each request as the real
    API would; `module=CHEAP_PROVIDER` is bench/sink_provider.py, which reads only the
    HTTP framing and so leaves the cores to the relay."""

    def __init__(self, top: Path, *, module: str = VALIDATING_PROVIDER) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.module = module
        self.out_path = top / f"provider-{module.rsplit('.', 1)[-1]}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, str(self.port)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, PROVIDER_KEY_VARIABLE: PROVIDER_KEY},
            )
        if not wait_until(lambda: port_open(self.port), timeout=30, interval=0.05):
            raise BenchError(f"the fake provider did not start: {self.out_path.read_text()}")

    def count(self) -> int:
        """Messages the provider accepted so far."""
        with urllib.request.urlopen(f"{self.url}/count", timeout=10) as answer:
            return int(answer.read())

    def root_pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=5)
            self.proc = None


class Destination(Protocol):
    """Where a server under test relays to: something that counts what arrived, and whose
    process tree's CPU is read."""

    def count(self) -> int: ...

    def root_pid(self) -> int: ...


# -- throughput runs ----------------------------------------------------------------------


@dataclass
class RunResult:
    server: str
    size: int
    sessions: int
    count: int
    accept_seconds: float
    e2e_seconds: float | None
    server_cpu_percent: float  # of one core
    host_busy_percent: float  # of all cores
    server_cpu_seconds: float = 0.0  # the server's process tree, while accepting
    server_cpu_e2e_seconds: float | None = None  # the same from the start to delivered
    destination_cpu_seconds: float | None = None  # the destination's, start to delivered
    rss_before_mb: float = 0.0  # the server's tree just before the load
    rss_peak_mb: float = 0.0  # its largest sample during the accepting phase

    @property
    def accepted_rate(self) -> float:
        return self.count / self.accept_seconds

    @property
    def cpu_ms_per_message(self) -> float:
        """The server's CPU (user + system, whole tree) per accepted message: the figure
        that the machine's other load moves least."""
        return 1000 * self.server_cpu_seconds / self.count

    @property
    def cpu_e2e_ms_per_message(self) -> float | None:
        """The server's CPU from the load's start until the destination had every message,
        per message: accepting and relaying whole, whichever phase the work fell in."""
        if self.server_cpu_e2e_seconds is None:
            return None
        return 1000 * self.server_cpu_e2e_seconds / self.count

    @property
    def destination_cpu_ms_per_message(self) -> float | None:
        if self.destination_cpu_seconds is None:
            return None
        return 1000 * self.destination_cpu_seconds / self.count

    @property
    def e2e_rate(self) -> float | None:
        return None if self.e2e_seconds is None else self.count / self.e2e_seconds


def smtp_source(port: int, *, size: int, count: int, sessions: int, timeout: float) -> float:
    """One smtp-source load (one message per session); returns its wall time."""
    argv = [
        str(postfix_tool("smtp-source")),
        "-l",
        str(size),
        "-m",
        str(count),
        "-s",
        str(sessions),
        "-f",
        MAIL_FROM,
        "-t",
        RCPT_TO,
        "-M",
        "bench.localdomain",
        f"{HOST}:{port}",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop_group(proc, grace=2)
        raise BenchError(f"smtp-source: {count} messages not sent within {timeout:.0f}s") from exc
    finally:
        stop_group(proc, grace=2)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        text = out.decode(errors="replace")[-1500:]
        raise BenchError(f"smtp-source failed (exit {proc.returncode}): {text}")
    return elapsed


def run_load(
    server: Server, sink: Destination, *, size: int, count: int, sessions: int, settings: Settings
) -> RunResult:
    """Send `count` messages; time the acceptance (smtp-source's wall time) and the
    delivery (until smtp-sink has them all); CPU of the server's processes meanwhile."""
    base = sink.count()
    root, dest_root = server.root_pid(), sink.root_pid()
    dest_cpu0 = tree_cpu_seconds(dest_root) if dest_root else None
    with PeakRss(root) as rss:
        cpu0, (busy0, total0) = tree_cpu_seconds(root), host_cpu()
        started = time.monotonic()
        accept = smtp_source(
            server.port, size=size, count=count, sessions=sessions, timeout=settings.run_timeout
        )
        cpu1, (busy1, total1) = tree_cpu_seconds(root), host_cpu()
    delivered = wait_until(
        lambda: sink.count() >= base + count, timeout=settings.drain_timeout, interval=0.02
    )
    e2e = time.monotonic() - started if delivered else None
    cpu_e2e = tree_cpu_seconds(root) - cpu0 if delivered else None
    dest_cpu = (
        tree_cpu_seconds(dest_root) - dest_cpu0 if dest_root and dest_cpu0 is not None else None
    )
    if not delivered:
        log(f"  {server.name}: the destination got {sink.count() - base} of {count} in time")
    return RunResult(
        server=server.name,
        size=size,
        sessions=sessions,
        count=count,
        accept_seconds=accept,
        e2e_seconds=e2e,
        server_cpu_percent=100 * (cpu1 - cpu0) / accept,
        host_busy_percent=100 * (busy1 - busy0) / max(1, total1 - total0),
        server_cpu_seconds=cpu1 - cpu0,
        server_cpu_e2e_seconds=cpu_e2e,
        destination_cpu_seconds=dest_cpu,
        rss_before_mb=rss.before_mb,
        rss_peak_mb=rss.peak_mb,
    )


def in_turn(items: Sequence[T], run: int) -> list[T]:
    """The servers of one run, starting one further each run: none always goes first."""
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]


def throughput(
    servers: Sequence[tuple[Server, Destination]], settings: Settings
) -> dict[tuple[int, int, str], list[RunResult]]:
    """Each server under test with the destination it relays to, the loads in turn;
    within a run the servers take turns, starting one further each time."""
    results: dict[tuple[int, int, str], list[RunResult]] = {}
    sessions = max(settings.sessions)
    for server, dest in servers:  # start Postfix's processes, warm the relays' pools
        log(f"warm-up: {settings.warmup} messages into {server.name}, {sessions} sessions")
        run_load(
            server, dest, size=5_000, count=settings.warmup, sessions=sessions, settings=settings
        )
    for size, sessions in settings.loads():
        for run in range(settings.runs):
            for server, dest in in_turn(servers, run):
                r = run_load(
                    server,
                    dest,
                    size=size,
                    count=settings.counts[size],
                    sessions=sessions,
                    settings=settings,
                )
                e2e = f"{r.e2e_rate:.0f}" if r.e2e_rate is not None else "-"
                log(
                    f"{_kb(size)} x{sessions} run {run + 1}/{settings.runs} "
                    f"{server.name}: {r.accepted_rate:.0f} msg/s accepted, "
                    f"{e2e} msg/s end to end, CPU {r.server_cpu_percent:.0f} % "
                    f"({r.cpu_ms_per_message:.2f} ms/msg), RSS {r.rss_before_mb:.0f} → "
                    f"{r.rss_peak_mb:.0f} MB"
                )
                results.setdefault((size, sessions, server.name), []).append(r)
    return results


# -- latency: a small SMTP client that times "." → 250 ------------------------------------


def make_message(size: int) -> bytes:
    """Headers and a body of `size` bytes in 78-character lines, no terminator."""
    head = (
        f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\nSubject: relay benchmark\r\n"
        f"Message-ID: <{time.time_ns()}@bench.localdomain>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line)) + b"y" * (size % len(line)) + b"\r\n"
    return head + body


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) SMTP reply; return its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if line[3:4] != b"-":
            return line


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, code: bytes
) -> None:
    writer.write(line)
    reply = await _reply(reader)
    if not reply.startswith(code):
        raise ConnectionError(f"{line.strip()!r}: {reply.strip()!r}")


async def timed_message(port: int, message: bytes) -> float:
    """One session, one message; seconds from sending "." to reading the 250."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        greeting = await _reply(reader)
        if not greeting.startswith(b"220"):
            raise ConnectionError(f"greeting: {greeting.strip()!r}")
        await _command(reader, writer, b"EHLO bench.localdomain\r\n", b"250")
        await _command(reader, writer, f"MAIL FROM:<{MAIL_FROM}>\r\n".encode(), b"250")
        await _command(reader, writer, f"RCPT TO:<{RCPT_TO}>\r\n".encode(), b"250")
        await _command(reader, writer, b"DATA\r\n", b"354")
        writer.write(message)
        await writer.drain()
        sent = time.perf_counter()
        writer.write(b".\r\n")
        reply = await _reply(reader)
        elapsed = time.perf_counter() - sent
        if not reply.startswith(b"250"):
            raise ConnectionError(f"end of DATA: {reply.strip()!r}")
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(ConnectionError):
            await _reply(reader)
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class LatencyResult:
    server: str
    rate: float  # offered, msg/s
    sessions: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    size: int = 5_000

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[index]

    def share_over(self, seconds: float) -> float:
        """The fraction of replies slower than `seconds`: how much of the tail there is,
        where p99 says only how far it reaches."""
        if not self.latencies:
            return float("nan")
        return sum(1 for x in self.latencies if x > seconds) / len(self.latencies)


async def latency_run(
    server: Server, *, rate: float, sessions: int, seconds: float, size: int
) -> LatencyResult:
    """`sessions` concurrent clients sending, together, `rate` messages per second (one
    message per session) for `seconds`; each message's "." → 250 time is recorded."""
    count = max(1, int(rate * seconds))
    result = LatencyResult(server=server.name, rate=rate, sessions=sessions, size=size)
    message = make_message(size)
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            due = start + next_index / rate
            next_index += 1
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(30):
                    result.latencies.append(await timed_message(server.port, message))
            except (OSError, TimeoutError):
                result.errors += 1

    async with asyncio.timeout(seconds * 3 + 60):
        await asyncio.gather(*(worker() for _ in range(sessions)))
    result.seconds = loop.time() - start
    return result


# -- memory and restart -------------------------------------------------------------------


@dataclass
class MemoryResult:
    queued: int
    fill_seconds: float
    rss_queued_mb: float
    hwm_queued_mb: float
    ready_seconds: float
    first_attempt_seconds: float | None
    rss_after_restart_mb: float


def memory_and_restart(top: Path, settings: Settings) -> MemoryResult:
    """Queue `settings.fill` messages with the upstream down (a closed port), read the
    relay's resident size, then restart it with them all due and time the restart."""
    closed_port = free_port()  # nothing listens there: every attempt is refused
    relay = RelayProcess(
        top / "relay-memory",
        upstream=smtp_upstream(closed_port),
        schedule=["1h"],
        log_level=settings.relay_log_level,
        workers=settings.relay_workers,
    )
    try:
        relay.start()
        log(f"memory: queueing {settings.fill} messages with the upstream down")
        started = time.monotonic()
        smtp_source(
            relay.port,
            size=5_000,
            count=settings.fill,
            sessions=20,
            timeout=max(settings.run_timeout, settings.fill / 50),
        )
        fill_seconds = time.monotonic() - started
        settle_log(relay, quiet=3.0, timeout=300.0)
        pid = relay.root_pid()
        rss = tree_rss_mb(pid)
        hwm = tree_status_mb(pid, "VmHWM")
        log(f"memory: {settings.fill} queued in {fill_seconds:.0f}s, RSS {rss:.0f} MB")
        relay.stop()
        # Every message was tried once and deferred for an hour: make them due again.
        run_checked(relay.argv("queue", "flush"), timeout=600, what="relay queue flush")
        ready = relay.start(timeout=300)
        first: float | None = None
        t0 = time.monotonic() - ready
        if wait_until(lambda: relay.log_contains(*ATTEMPT_MARKERS), timeout=120, interval=0.01):
            first = time.monotonic() - t0
        time.sleep(3)
        rss_after = tree_rss_mb(relay.root_pid())
        first_text = f"{first:.2f}s" if first is not None else "none in 120s"
        log(f"restart: ready in {ready:.2f}s, first attempt after {first_text}")
        return MemoryResult(
            queued=settings.fill,
            fill_seconds=fill_seconds,
            rss_queued_mb=rss,
            hwm_queued_mb=hwm,
            ready_seconds=ready,
            first_attempt_seconds=first,
            rss_after_restart_mb=rss_after,
        )
    finally:
        relay.stop()


def settle_log(relay: RelayProcess, *, quiet: float, timeout: float) -> None:
    """Wait until the relay's log has not grown for `quiet` seconds (attempts finished)."""
    deadline = time.monotonic() + timeout
    last_size, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = relay.log_path.stat().st_size
        if size != last_size:
            last_size, last_change = size, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            return
        time.sleep(0.2)


# -- report ---------------------------------------------------------------------------------


def _kb(size: int) -> str:
    if size >= 1_000_000:
        return f"{size / 1_000_000:g} MB"
    return f"{size / 1000:g} KB"


def _med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


Results = dict[tuple[int, int, str], list[RunResult]]


@dataclass(frozen=True)
class Medians:
    """One server's medians over the runs of one load (None: not measured)."""

    accepted: float | None
    e2e: float | None
    cpu_ms: float | None
    cpu_e2e_ms: float | None
    cpu_percent: float | None
    destination_cpu_ms: float | None
    host_busy: float | None

    @classmethod
    def of(cls, runs: Sequence[RunResult]) -> Medians:
        return cls(
            accepted=_med([x.accepted_rate for x in runs]),
            e2e=_med([x.e2e_rate for x in runs]),
            cpu_ms=_med([x.cpu_ms_per_message for x in runs]),
            cpu_e2e_ms=_med([x.cpu_e2e_ms_per_message for x in runs]),
            cpu_percent=_med([x.server_cpu_percent for x in runs]),
            destination_cpu_ms=_med([x.destination_cpu_ms_per_message for x in runs]),
            host_busy=_med([x.host_busy_percent for x in runs]),
        )


def _medians(results: Results, size: int, sessions: int, name: str) -> Medians:
    return Medians.of(results.get((size, sessions, name), []))


def throughput_table(results: Results, settings: Settings) -> list[str]:
    lines = [
        f"| size | sessions | {CEILING} msg/s | Postfix msg/s | relay msg/s "
        f"| relay ÷ Postfix | relay ÷ {CEILING} "
        "| Postfix e2e msg/s | relay e2e msg/s | e2e relay ÷ Postfix | host busy % (P / r) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, sessions in settings.loads():
        c = _medians(results, size, sessions, CEILING)
        p = _medians(results, size, sessions, "Postfix")
        r = _medians(results, size, sessions, "relay")
        lines.append(
            f"| {_kb(size)} | {sessions} | {_num(c.accepted)} | {_num(p.accepted)} "
            f"| {_num(r.accepted)} | **{_ratio(r.accepted, p.accepted)}** "
            f"| **{_ratio(r.accepted, c.accepted)}** "
            f"| {_num(p.e2e)} | {_num(r.e2e)} | **{_ratio(r.e2e, p.e2e)}** "
            f"| {_num(p.host_busy)} / {_num(r.host_busy)} |"
        )
    return lines


def cpu_table(results: Results, settings: Settings) -> list[str]:
    lines = [
        "| size | sessions | Postfix ms/msg accepting | relay ms/msg accepting "
        "| relay ÷ Postfix (accepting) | Postfix ms/msg until delivered "
        "| relay ms/msg until delivered | relay ÷ Postfix (until delivered) "
        "| CPU % while accepting (P / r) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ms = "{:.2f}"
    for size, sessions in settings.loads():
        p = _medians(results, size, sessions, "Postfix")
        r = _medians(results, size, sessions, "relay")
        lines.append(
            f"| {_kb(size)} | {sessions} | {_num(p.cpu_ms, ms)} | {_num(r.cpu_ms, ms)} "
            f"| **{_ratio(r.cpu_ms, p.cpu_ms)}** | {_num(p.cpu_e2e_ms, ms)} "
            f"| {_num(r.cpu_e2e_ms, ms)} | **{_ratio(r.cpu_e2e_ms, p.cpu_e2e_ms)}** "
            f"| {_num(p.cpu_percent)} / {_num(r.cpu_percent)} |"
        )
    return lines


def base_table(results: Results, settings: Settings, base: str) -> list[str]:
    lines = [
        f"| size | sessions | {base} msg/s | relay msg/s | relay ÷ base "
        f"| {base} e2e msg/s | relay e2e msg/s | e2e relay ÷ base "
        f"| CPU ms/msg {base} | CPU ms/msg relay | CPU/msg relay ÷ base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ms = "{:.2f}"
    for size, sessions in settings.loads():
        b = _medians(results, size, sessions, base)
        r = _medians(results, size, sessions, "relay")
        lines.append(
            f"| {_kb(size)} | {sessions} | {_num(b.accepted)} | {_num(r.accepted)} "
            f"| **{_ratio(r.accepted, b.accepted)}** | {_num(b.e2e)} | {_num(r.e2e)} "
            f"| **{_ratio(r.e2e, b.e2e)}** | {_num(b.cpu_ms, ms)} | {_num(r.cpu_ms, ms)} "
            f"| **{_ratio(r.cpu_ms, b.cpu_ms)}** |"
        )
    return lines


RELAY_HTTP = "relay-http"


def http_table(results: Results, settings: Settings) -> list[str]:
    lines = [
        "| size | sessions | Postfix e2e msg/s (to smtp-sink) | relay accepted msg/s "
        "| relay e2e msg/s (to the provider) | e2e relay ÷ Postfix "
        "| relay CPU ms/msg accepting / until delivered | provider CPU ms/msg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ms = "{:.2f}"
    for size, sessions in settings.loads():
        p = _medians(results, size, sessions, "Postfix")
        h = _medians(results, size, sessions, RELAY_HTTP)
        lines.append(
            f"| {_kb(size)} | {sessions} | {_num(p.e2e)} | {_num(h.accepted)} | {_num(h.e2e)} "
            f"| **{_ratio(h.e2e, p.e2e)}** | {_num(h.cpu_ms, ms)} / {_num(h.cpu_e2e_ms, ms)} "
            f"| {_num(h.destination_cpu_ms, ms)} |"
        )
    return lines


def rss_table(results: Results, settings: Settings, names: Sequence[str]) -> list[str]:
    """Resident size of each server's process tree around the large-message loads."""
    lines = [
        "| size | sessions | server | RSS before the run (median) | peak RSS during the run "
        "(max over runs) | growth (peak less before, max over runs) |",
        "|---|---|---|---|---|---|",
    ]
    for size, sessions in settings.loads():
        if size < LARGE_FOR_RSS:
            continue
        for name in names:
            runs = results.get((size, sessions, name), [])
            if not runs:
                continue
            before = _med([x.rss_before_mb for x in runs])
            peak = max(x.rss_peak_mb for x in runs)
            growth = max(x.rss_peak_mb - x.rss_before_mb for x in runs)
            lines.append(
                f"| {_kb(size)} | {sessions} | {name} | {_num(before)} MB | **{peak:,.0f} MB** "
                f"| {growth:,.0f} MB |"
            )
    return lines


def latency_table(results: Sequence[LatencyResult]) -> list[str]:
    """A row per server and size: medians over its runs, the p99s of every run beside."""
    lines = [
        "| server | size | sessions | offered msg/s | runs x messages | errors | p50 ms "
        f"| p99 ms | p99 of each run | max ms | > {SLOW_REPLY * 1000:g} ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple[str, int], list[LatencyResult]] = {}
    for r in results:
        grouped.setdefault((r.server, r.size), []).append(r)
    median = statistics.median
    for (server, size), runs in grouped.items():
        p99s = [1000 * r.percentile(99) for r in runs]
        lines.append(
            f"| {server} | {_kb(size)} | {runs[0].sessions} | {median([r.rate for r in runs]):.0f} "
            f"| {len(runs)} x {median([len(r.latencies) for r in runs]):.0f} "
            f"| {sum(r.errors for r in runs)} "
            f"| {median([1000 * r.percentile(50) for r in runs]):.1f} "
            f"| **{median(p99s):.1f}** | {' / '.join(f'{p:.1f}' for p in p99s)} "
            f"| {max(1000 * r.percentile(100) for r in runs):.1f} "
            f"| {median([100 * r.share_over(SLOW_REPLY) for r in runs]):.1f} % |"
        )
    return lines


def memory_table(m: MemoryResult) -> list[str]:
    first = _num(m.first_attempt_seconds, "{:.2f}")
    return [
        "| relay, upstream down | value |",
        "|---|---|",
        f"| messages queued (5 KB each) | {m.queued:,} (in {m.fill_seconds:.0f} s) |",
        f"| RSS with them queued | **{m.rss_queued_mb:.0f} MB** (peak {m.hwm_queued_mb:.0f} MB) |",
        f'| restart: start → "relay ready" | {m.ready_seconds:.2f} s |',
        f"| restart: start → first dispatch attempt | **{first} s** |",
        f"| RSS 3 s after the first attempt | {m.rss_after_restart_mb:.0f} MB |",
    ]


def git_revision() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def base_name(settings: Settings) -> str | None:
    return f"relay@{settings.base}" if settings.base else None


def report(
    settings: Settings,
    throughput_results: Results,
    latency_results: Sequence[LatencyResult],
    memory: MemoryResult | None,
    idle_busy: float,
    revision: str = "",
) -> str:
    counts = ", ".join(f"{_kb(s)}: {c:,}" for s, c in settings.counts.items())
    base = base_name(settings)
    lines = [
        f"# relay vs Postfix, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"relay {revision or git_revision()} (the working tree as the run started) · "
        f"Postfix {postfix_version()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · {'quick' if settings.quick else 'full'} run · "
        f"machine {idle_busy:.0f} % busy before the start",
        "",
        "## Throughput (smtp-source, one message per session, both relaying to smtp-sink)",
        "",
        f"Medians of {settings.runs} run(s), servers taking turns; messages per run: {counts}. "
        f'"{CEILING}": smtp-source straight into smtp-sink, the physical limit.',
        "",
        *throughput_table(throughput_results, settings),
        "",
        "## CPU per message (the figure the machine's other load moves least)",
        "",
        "User + system CPU of the server's whole process tree (for Postfix: master and every "
        "daemon, reaped ones through their parent), from /proc, divided by the messages: "
        "while smtp-source runs (relaying meanwhile included), and from its start until "
        "smtp-sink had them all. Lower is better. CPU %: of one core, while accepting; "
        "when the machine is overloaded the scheduler shares the cores per process, so "
        "Postfix's hundred processes can get more of them than the relay's few, and the "
        "msg/s ratios above move with that while these per-message figures do not.",
        "",
        *cpu_table(throughput_results, settings),
    ]
    if base is not None:
        lines += [
            "",
            f"## Before/after: the relay against {base} (a git worktree, same virtualenv), "
            "same runs",
            "",
            *base_table(throughput_results, settings, base),
        ]
    if any(name == RELAY_HTTP for _, _, name in throughput_results):
        provider = (
            "bench/provider.py (the tests' validating FakeSendGrid, aiohttp)"
            if settings.validating_provider
            else "bench/sink_provider.py (reads the HTTP framing only, answers 202 with an "
            "X-Message-Id)"
        )
        lines += [
            "",
            "## End to end through an HTTP upstream (the relay's `sendgrid` upstream into "
            f"{provider}, in its own process)",
            "",
            "Same loads, in turn with the servers above; Postfix's column is its end-to-end "
            "rate into smtp-sink from the table above. Provider CPU: the fake's own process, "
            "from the load's start until it has every message.",
            "",
            *http_table(throughput_results, settings),
        ]
    if any(size >= LARGE_FOR_RSS for size, _ in settings.loads()):
        names = ["relay", *([base] if base else []), RELAY_HTTP]
        lines += [
            "",
            "## Resident memory during the large-message loads",
            "",
            f"VmRSS summed over the server's process tree, sampled every "
            f"{RSS_INTERVAL * 1000:.0f} ms while smtp-source runs (pages shared between "
            "processes count once per process, which is why Postfix, a hundred smtpd "
            "processes each counting the same libraries, is not shown).",
            "",
            *rss_table(throughput_results, settings, names),
        ]
    if latency_results:
        lines += [
            "",
            '## Latency: end of DATA (".") to the 250, at half each server\'s own '
            f"{LATENCY_SESSIONS}-session rate for that size",
            "",
            f"Medians of {settings.runs} run(s) of {settings.latency_seconds:g} s each, servers "
            "taking turns; max is the slowest reply of all runs.",
            "",
            *latency_table(latency_results),
        ]
    if memory is not None:
        lines += ["", "## Memory and restart", "", *memory_table(memory)]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(settings: Settings) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="relay-perf-", dir=settings.workdir))
    top.chmod(0o755)  # Postfix's unprivileged processes must reach their directories
    try:
        yield top
    finally:
        if settings.keep:
            log(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


def run(settings: Settings) -> str:
    ensure_postfix()
    revision = git_revision()  # before anyone commits during a long run
    idle_busy = host_busy_percent(2.0)
    if idle_busy > BUSY_WARNING:
        log(
            f"warning: the machine is already {idle_busy:.0f} % busy: other processes will "
            "skew the figures"
        )
    latency_results: list[LatencyResult] = []
    memory: MemoryResult | None = None
    with workspace(settings) as top, contextlib.ExitStack() as stack:
        sink = Sink(top)
        stack.callback(sink.stop)
        sink.start()
        servers: list[tuple[Server, Destination]] = []
        if not settings.skip_ceiling:
            ceiling = Ceiling(top)
            stack.callback(ceiling.stop)
            ceiling.start()
            servers.append((ceiling, ceiling))
        postfix = PostfixInstance(top / "postfix", sink_port=sink.port)
        stack.callback(postfix.stop)
        postfix.start()
        relay = RelayProcess(
            top / "relay",
            upstream=smtp_upstream(sink.port),
            schedule=["5s", "30s", "2m"],
            log_level=settings.relay_log_level,
            workers=settings.relay_workers,
        )
        stack.callback(relay.stop)
        relay.start()
        log(f"smtp-sink :{sink.port}, Postfix :{postfix.port}, relay :{relay.port}")
        servers += [(postfix, sink), (relay, sink)]
        latency_servers: list[Server] = [postfix, relay]
        if settings.base:
            try:
                base_src = stack.enter_context(worktree(settings.base, top))
            except WorktreeError as exc:
                raise BenchError(str(exc)) from exc
            base = RelayProcess(
                top / "relay-base",
                upstream=smtp_upstream(sink.port),
                schedule=["5s", "30s", "2m"],
                log_level=settings.relay_log_level,
                workers=settings.relay_workers,
                name=base_name(settings) or "base",
                src=base_src,
            )
            stack.callback(base.stop)
            base.start()
            log(f"{base.name} (from {base_src}) :{base.port}")
            servers.append((base, sink))
            latency_servers.append(base)
        if not settings.skip_http:
            provider = Provider(
                top,
                module=VALIDATING_PROVIDER if settings.validating_provider else CHEAP_PROVIDER,
            )
            stack.callback(provider.stop)
            provider.start()
            relay_http = RelayProcess(
                top / RELAY_HTTP,
                upstream=http_upstream(provider.url),
                schedule=["5s", "30s", "2m"],
                log_level=settings.relay_log_level,
                workers=settings.relay_workers,
                name=RELAY_HTTP,
            )
            stack.callback(relay_http.stop)
            relay_http.start()
            servers.append((relay_http, provider))
        results = throughput(servers, settings)
        for server, dest in servers:
            if server not in latency_servers:
                server.stop()
            if dest is not sink and isinstance(dest, Provider):
                dest.stop()
        if not settings.skip_latency:
            latency_results = latency(latency_servers, results, settings)
        for server in latency_servers:
            server.stop()
        if not settings.skip_memory:
            memory = memory_and_restart(top, settings)
    return report(settings, results, latency_results, memory, idle_busy, revision)


def _client_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The latency client's event loop: uvloop when installed. The client shares the two
    cores with the server; on asyncio's own loop its own delays were half of what it
    measured at 500 msg/s (p50 4.9 ms against 2.6 ms on uvloop, p99 28 against 14, the
    same relay)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def latency(servers: Sequence[Server], results: Results, settings: Settings) -> list[LatencyResult]:
    """Each latency size, each server at half its own accepted rate at that size and
    LATENCY_SESSIONS sessions (so every server is equally far from its limit), `runs`
    times with the servers taking turns: one run's p99 is mostly the disk's worst flush in
    those seconds, so the table gives medians."""
    measured: list[LatencyResult] = []
    for size in settings.latency_sizes:
        rates: list[tuple[Server, float]] = []
        for server in servers:
            max_rate = _med(
                [r.accepted_rate for r in results.get((size, LATENCY_SESSIONS, server.name), [])]
            )
            if max_rate is None:
                log(
                    f"latency at {_kb(size)}: skipped (needs the {_kb(size)} / "
                    f"{LATENCY_SESSIONS} sessions load)"
                )
                break
            rates.append((server, max_rate / 2))
        else:
            for run in range(settings.runs):
                for server, rate in in_turn(rates, run):
                    result = _latency_once(server, rate, size, settings)
                    log(
                        f"latency {_kb(size)} run {run + 1}/{settings.runs} {server.name} at "
                        f"{rate:.0f} msg/s: p50 {1000 * result.percentile(50):.1f} ms, "
                        f"p99 {1000 * result.percentile(99):.1f} ms"
                    )
                    measured.append(result)
    return measured


def _latency_once(server: Server, rate: float, size: int, settings: Settings) -> LatencyResult:
    with asyncio.Runner(loop_factory=_client_loop()) as runner:
        return runner.run(
            latency_run(
                server,
                rate=rate,
                sessions=settings.latency_sessions,
                seconds=settings.latency_seconds,
                size=size,
            )
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one run of each load, fewer messages")
    parser.add_argument("--runs", type=int, default=0, help="runs per load (default 3, quick 1)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="message sizes, bytes (default: 5 KB, 100 KB, 1 MB, 5 MB)",
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[20, 100])
    parser.add_argument(
        "--big-message-sessions",
        type=int,
        nargs="+",
        default=[BIG_MESSAGE_SESSIONS],
        help=f"sessions for sizes of {_kb(BIG_MESSAGE)} and more (default: {BIG_MESSAGE_SESSIONS})",
    )
    parser.add_argument("--count", type=int, default=0, help="messages per run (all sizes)")
    parser.add_argument(
        "--fill", type=int, default=0, help="messages queued for the memory figure (100000)"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=300.0, help="limit for one load, seconds"
    )
    parser.add_argument(
        "--base",
        metavar="REV",
        help="also run the relay at git revision REV (a temporary worktree, same "
        "virtualenv) in the same rotation, for relay ÷ base columns",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--skip-http", action="store_true", help="leave out the relay → HTTP provider runs"
    )
    parser.add_argument(
        "--skip-ceiling",
        action="store_true",
        help=f"leave out the {CEILING!r} runs (smtp-source straight into smtp-sink)",
    )
    parser.add_argument(
        "--validating-provider",
        action="store_true",
        help="HTTP runs into bench/provider.py (the tests' FakeSendGrid, which checks every "
        "request and costs about as much CPU as the relay) instead of bench/sink_provider.py",
    )
    parser.add_argument("--workdir", help="where the temporary directory goes (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--relay-workers",
        type=int,
        default=None,
        help="the relay's server.workers (default: not set, the relay's own default; 0 = one "
        "per CPU)",
    )
    parser.add_argument(
        "--relay-log-level",
        default="info",
        help="the relay's --log-level (default info, as `relay serve`; the restart figure "
        "needs delivery attempts logged, so at most info for it)",
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(parse_args(argv))
    signal.signal(signal.SIGTERM, _terminate)
    if LATENCY_SESSIONS not in settings.sessions:
        log(f"note: the latency runs need --sessions {LATENCY_SESSIONS}; they will be skipped")
    started = time.monotonic()
    try:
        text = run(settings)
    except BenchError as exc:
        print(f"bench.perf: {exc}", file=sys.stderr)
        return 1
    write_report("perf", text, started=started)
    return 0


def write_report(name: str, text: str, *, started: float) -> None:
    """Print the report and keep it under bench/out/NAME-<time>.md."""
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s; written to {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
