"""The hand-off to JSON providers, measured on its own: relay CPU per message on the dispatch
side of an HTTP upstream (issue 14, target 2).

Two measurements, both in CPU time so that the shared machine's noise matters less:

    .venv/bin/python -m bench.handoff micro [--sizes 5000,100000,...] [--repeat N]
                                            [--src DIR --src DIR [--rounds 3]]
    .venv/bin/python -m bench.handoff e2e [--sizes 5000,100000] [--count 3000]
                                          [--src DIR]... [--runs 3] [--profile DIR]

`micro` times, in this process, what an upstream does from the queued bytes to the
request body (`refusal()` as routing calls it, then `build()`), for SendGrid, Postmark,
SparkPost and Mailgun, on a plain text message like smtp-source's and on a scanner's
message (a line of text and a PDF attachment), and reports the peak of Python memory
(tracemalloc) while a message is built, as a multiple of its size. With `--src` (twice
or more) each tree is measured in a process of its own, the trees alternating for
`--rounds` rounds, and the table gives medians and each tree's CPU ÷ the first tree's.

`e2e` runs `relay serve` (two workers, SQLite queue) with one `sendgrid` upstream whose
base_url is the cheap fake below, sends with smtp-source, waits until the fake has every
message, and divides the workers' utime + stime by the messages. Each `--src` is a source
tree to run the relay from (a `git worktree` of an older commit, for before/after in one
run); trees alternate within every run. `--profile DIR` samples the workers with py-spy.

The fake provider does not validate (tests/fakes/providers.py does, in the tests): it
reads the header and Content-Length bytes of each request on a keep-alive connection,
answers 202 with an X-Message-Id and no body, and counts requests and connections, so
the relay's side is what the figures show.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
PORTS = range(44525, 44546)  # the ports this benchmark may use
MAIL_FROM = "a@example.com"
RCPT_TO = "b@example.com"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- sample messages ---------------------------------------------------------------------


def plain_message(size: int) -> bytes:
    """A message shaped like smtp-source's: four headers and lines of 79 characters."""
    head = (
        f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\n"
        "Date: Mon, 30 Nov 2026 08:35:23 +0000 (UTC)\r\n"
        "Message-Id: <435f.0003.0000@vm>\r\n\r\n"
    ).encode()
    lines = []
    total = len(head)
    n = 1
    while total < size:
        line = (str(n) + "X" * 78)[:78].encode() + b"\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return head + b"".join(lines)


def scan_message(size: int) -> bytes:
    """A scanner's message: a line of text and a base64 PDF making up the rest."""
    pdf = random.Random(size).randbytes(max(0, (size - 600) * 3 // 4))
    b64 = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    return (
        (
            f"From: Scanner 3rd floor <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\n"
            "Subject: =?utf-8?q?Scan_f=C3=BCr_M=C3=A4rz?=\r\n"
            "Date: Mon, 30 Nov 2026 08:35:23 +0000 (UTC)\r\n"
            "Message-Id: <scan.1@vm>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nGescannt am 30.11. \u2013 Seite 1\r\n"
            "--b1\r\nContent-Type: application/pdf\r\n"
            'Content-Disposition: attachment; filename="scan.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + b64
        + b"--b1--\r\n"
    )


SAMPLES: dict[str, Callable[[int], bytes]] = {"plain": plain_message, "scan": scan_message}


# -- micro: the build path in this process --------------------------------------------------


def _upstreams() -> dict[str, Any]:
    from relay.upstreams.mailgun import MailgunUpstream
    from relay.upstreams.postmark import PostmarkUpstream
    from relay.upstreams.sendgrid import SendGridUpstream
    from relay.upstreams.sparkpost import SparkPostUpstream

    url = "http://127.0.0.1:1"
    return {
        "sendgrid": SendGridUpstream("sendgrid", api_key="k", base_url=url, timeout=5.0),
        "postmark": PostmarkUpstream("postmark", api_key="k", base_url=url, timeout=5.0),
        "sparkpost": SparkPostUpstream("sparkpost", api_key="k", base_url=url, timeout=5.0),
        "mailgun": MailgunUpstream(
            "mailgun", api_key="k", domain="mg.example.com", base_url=url, timeout=5.0
        ),
    }


def _hand_off(upstream: Any, envelope: Any, data: bytes) -> int:
    """What the dispatcher does for one message: ask, then build. Returns the body size."""
    why = upstream.refusal(envelope, data)
    if why is not None:
        raise SystemExit(f"{upstream.name} refused the sample: {why}")
    body = upstream.build(envelope, data).body
    return len(body) if isinstance(body, bytes) else sum(map(len, body))


def micro(sizes: list[int], repeat: int, providers: list[str]) -> list[dict[str, Any]]:
    """CPU ms per message (median of `repeat`, each on a fresh copy of the bytes so that no
    cache from an earlier message helps) and the tracemalloc peak of one build."""
    from relay.message import Envelope

    envelope = Envelope(MAIL_FROM, (RCPT_TO,), queue_id="01KBENCHHANDOFF00000")
    upstreams = _upstreams()
    rows = []
    for sample, make in SAMPLES.items():
        for size in sizes:
            template = make(size)
            for name in providers:
                upstream = upstreams[name]
                reps = max(3, min(repeat, int(repeat * 100_000 / max(size, 100_000))))
                times = []
                for _ in range(reps):
                    data = bytes(bytearray(template))  # a new object: no cache hit
                    started = time.process_time()
                    _hand_off(upstream, envelope, data)
                    times.append(time.process_time() - started)
                    del data
                data = bytes(bytearray(template))
                tracemalloc.start()
                tracemalloc.reset_peak()
                base, _ = tracemalloc.get_traced_memory()
                body_size = _hand_off(upstream, envelope, data)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                rows.append(
                    {
                        "sample": sample,
                        "size": len(template),
                        "provider": name,
                        "ms": statistics.median(times) * 1000,
                        "peak_x": (peak - base) / len(template),
                        "body": body_size,
                    }
                )
    return rows


def micro_compare(sources: list[Path], rounds: int, argv: list[str]) -> None:
    """`micro` of each source tree in a process of its own (its `relay` package first on
    the path), the trees alternating round after round so that the machine's load falls
    on all of them alike; medians over the rounds, and each tree's CPU ÷ the first's."""
    results: dict[Path, list[list[dict[str, Any]]]] = {src: [] for src in sources}
    for round_no in range(rounds):
        for src in sources:
            out = subprocess.run(
                [sys.executable, "-m", "bench.handoff", "micro", "--json", *argv],
                cwd=src,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[src].append(json.loads(out))
            print(f"round {round_no + 1}/{rounds}: {src} done", file=sys.stderr, flush=True)
    merged: dict[Path, list[dict[str, Any]]] = {}
    for src, runs in results.items():
        rows = []
        for i, first in enumerate(runs[0]):
            row = dict(first)
            row["ms"] = statistics.median(run[i]["ms"] for run in runs)
            row["peak_x"] = statistics.median(run[i]["peak_x"] for run in runs)
            row["each"] = [run[i]["ms"] for run in runs]
            rows.append(row)
        merged[src] = rows
        print_micro(rows, f"relay from {src} (medians of {rounds} rounds)")
    base = sources[0]
    print(f"\nCPU ÷ {base} (same rows, same rounds)")
    print("| sample | size | provider | " + " | ".join(str(s) for s in sources[1:]) + " |")
    print("|---|---:|---|" + "---:|" * (len(sources) - 1))
    for i, row in enumerate(merged[base]):
        ratios = " | ".join(
            f"{merged[src][i]['ms'] / row['ms']:.3f}" if row["ms"] else "-" for src in sources[1:]
        )
        print(f"| {row['sample']} | {row['size']:,} | {row['provider']} | {ratios} |")


def print_micro(rows: list[dict[str, Any]], label: str) -> None:
    print(f"\n{label}: CPU per message (refusal + build), tracemalloc peak ÷ message size")
    print("| sample | size | provider | CPU ms/msg | peak ÷ size | request body |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sample']} | {r['size']:,} | {r['provider']} | {r['ms']:.3f} | "
            f"{r['peak_x']:.2f} | {r['body']:,} |"
        )


# -- the cheap fake provider ---------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0  # connections that carried at least one POST
        self.bytes = 0


class _Connection(asyncio.Protocol):
    """HTTP/1.1 keep-alive, just enough: header block, Content-Length body, 202."""

    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.head = bytearray()
        self.remaining = 0  # body bytes still to skip; 0 while reading a header block
        self.posted = False
        self.is_stats = False
        self.transport: asyncio.Transport | None = None
        self.ids = random.Random(os.urandom(8))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.remaining:  # inside a body: skip it without keeping it
                take = min(self.remaining, len(data) - pos)
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self._answer()
                continue
            if self.head:  # a header block split across reads
                self.head += data[pos:]
                data, pos = bytes(self.head), 0
                self.head.clear()
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                self.head += data[pos:]
                return
            self._start(data[pos:end])
            pos = end + 4

    def _start(self, head: bytes) -> None:
        self.is_stats = head.startswith(b"GET /stats")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.stats.bytes += length
        self.remaining = length
        if not length:
            self._answer()

    def _answer(self) -> None:
        assert self.transport is not None
        if self.is_stats:
            body = json.dumps(vars(self.stats)).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        if not self.posted:
            self.posted = True
            self.stats.connections += 1
        self.stats.requests += 1
        self.transport.write(
            b"HTTP/1.1 202 Accepted\r\nX-Message-Id: %032x\r\nContent-Length: 0\r\n\r\n"
            % self.ids.getrandbits(128)
        )


async def _serve_fake(port: int) -> None:
    stats = _Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(stats), HOST, port, backlog=512)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("fake provider ready", flush=True)
    async with server:
        await stop.wait()


def fake_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/stats", timeout=5) as resp:
        stats: dict[str, int] = json.loads(resp.read())
    return stats


# -- e2e: a relay, smtp-source and the fake ------------------------------------------------


def _relay_config(top: Path, smtp_port: int, provider_port: int) -> Path:
    config = top / "relay.toml"
    config.write_text(
        f'[server]\nhostname = "relay-bench.localdomain"\nqueue = "{top}/q"\n'
        "min_free_disk = 0\nworkers = 2\n"
        '[smtp]\ntrusted_networks = ["127.0.0.0/8"]\nmax_message_size = "50MB"\n'
        'timeout = "60s"\n'
        f'[[smtp.listen]]\naddress = "{HOST}:{smtp_port}"\ntls = "none"\nauth = "none"\n'
        '[retry]\nschedule = ["30s"]\nconcurrency = 100\nbounces = false\n'
        '[[upstream]]\nname = "provider"\ntype = "sendgrid"\n'
        f'base_url = "http://{HOST}:{provider_port}"\napi_key = "bench-key"\n'
        "max_concurrency = 50\n"
        '[web]\nlisten = "127.0.0.1:0"\n'
    )
    return config


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    out.append(int(entry.name))
    return sorted(out)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _smtp_source(port: int, size: int, count: int, sessions: int) -> None:
    subprocess.run(
        [
            *("smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(count)),
            *("-f", MAIL_FROM, "-t", RCPT_TO, f"{HOST}:{port}"),
        ],
        check=True,
        timeout=900,
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(
    args: list[str], cwd: Path, log: Path, ready: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: ready in log.read_text(errors="replace"), f"{args[2:4]} ready", 30)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    src: str
    size: int
    messages: int
    ticks: int
    seconds: float
    connections: int
    profile: dict[int, Path]

    @property
    def ms_per_message(self) -> float:
        return self.ticks * 1000 / CLK_TCK / self.messages

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def e2e_once(
    src: Path, size: int, count: int, sessions: int, ports: tuple[int, int], profile: Path | None
) -> Run:
    smtp_port, provider_port = ports
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        top = Path(tmp)
        python = str(REPO_ROOT / ".venv" / "bin" / "python")
        fake_cmd = [python, "-m", "bench.handoff", "fake", "--port", str(provider_port)]
        relay_cmd = [python, "-m", "relay", "--config", str(_relay_config(top, *ports))]
        relay_cmd += ["serve", "--log-level", "info"]
        with (
            _process(fake_cmd, REPO_ROOT, top / "fake.log", "fake provider ready"),
            _process(relay_cmd, src, top / "relay.log", "relay ready") as relay,
        ):
            warm = 300
            _smtp_source(smtp_port, size, warm, sessions)
            _wait_for(lambda: fake_stats(provider_port)["requests"] >= warm, "warm-up", 120)
            workers = _children(relay.pid)
            before = {pid: _cpu_ticks(pid) for pid in workers}
            spies = []
            files: dict[int, Path] = {}
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                for pid in workers:
                    files[pid] = profile / f"{Path(src).name}-{size}-{pid}.txt"
                    spies.append(
                        subprocess.Popen(
                            [
                                *(str(REPO_ROOT / ".venv" / "bin" / "py-spy"), "record"),
                                *("-p", str(pid), "-d", "8", "-r", "250", "-f", "raw"),
                                *("--nonblocking", "-o", str(files[pid])),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            started = time.monotonic()
            _smtp_source(smtp_port, size, count, sessions)
            _wait_for(
                lambda: fake_stats(provider_port)["requests"] >= warm + count, "delivery", 600
            )
            seconds = time.monotonic() - started
            ticks = sum(_cpu_ticks(pid) - before[pid] for pid in workers)
            connections = fake_stats(provider_port)["connections"]
            for spy in spies:
                spy.wait(timeout=60)
    return Run(str(src), size, count, ticks, seconds, connections, files)


def summarise_profile(files: list[Path], top: int = 25) -> None:
    """Self and inclusive shares of the sampled frames (py-spy raw format)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            count = int(n)
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                incl[frame] = incl.get(frame, 0) + count
    if not total:
        print("  (no samples)")
        return
    print(f"  samples: {total}")
    for title, table in (("self", own), ("inclusive", incl)):
        print(f"  -- {title}")
        for frame, samples in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {100 * samples / total:5.1f}% {frame[:140]}")


def e2e(args: argparse.Namespace) -> None:
    sources = [Path(s).resolve() for s in args.src] or [REPO_ROOT]
    ports = (args.port, args.port + 1)
    assert ports[1] in PORTS, f"ports must be within {PORTS.start}-{PORTS.stop - 1}"
    results: dict[tuple[Path, int], list[Run]] = {}
    for size in args.sizes:
        for run in range(args.runs):
            for src in sources:
                result = e2e_once(src, size, args.count, args.sessions, ports, args.profile)
                results.setdefault((src, size), []).append(result)
                print(
                    f"run {run + 1} {src} {size:,} B: {result.ms_per_message:.3f} ms/msg "
                    f"({result.ticks} ticks, {result.seconds:.1f} s, "
                    f"{result.rate:.0f} msg/s, "
                    f"{result.connections} provider connections)",
                    flush=True,
                )
    print("\n| source | size | CPU ms/msg (median) | runs | msg/s (median) | connections |")
    print("|---|---:|---:|---|---:|---:|")
    for (src, size), runs in results.items():
        ms = statistics.median(r.ms_per_message for r in runs)
        rate = statistics.median(r.rate for r in runs)
        each = ", ".join(f"{r.ms_per_message:.2f}" for r in runs)
        conns = max(r.connections for r in runs)
        print(f"| {src} | {size:,} | {ms:.3f} | {each} | {rate:.0f} | {conns} |")
    if args.profile is not None:
        for (src, size), runs in results.items():
            print(f"\nprofile {src} at {size:,} B (all workers, all runs)")
            summarise_profile([f for r in runs for f in r.profile.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("micro", help="CPU per message of the build path, in this process")
    m.add_argument("--sizes", default="5000,100000,1000000,5000000")
    m.add_argument("--repeat", type=int, default=200)
    m.add_argument("--providers", default="sendgrid,postmark,sparkpost,mailgun")
    m.add_argument("--json", action="store_true", help="print the rows as JSON")
    m.add_argument(
        "--src",
        action="append",
        default=[],
        help="source tree(s) to compare, each run in a process of its own (the first is the "
        "reference for the ratios)",
    )
    m.add_argument("--rounds", type=int, default=3, help="with --src: runs of each tree")
    e = sub.add_parser("e2e", help="relay workers' CPU per message through the fake provider")
    e.add_argument("--sizes", default="5000,100000")
    e.add_argument("--count", type=int, default=3000)
    e.add_argument("--sessions", type=int, default=20)
    e.add_argument("--runs", type=int, default=3)
    e.add_argument("--src", action="append", default=[], help="source tree(s) to compare")
    e.add_argument("--port", type=int, default=44530, help="SMTP port; the fake takes the next")
    e.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    f = sub.add_parser("fake", help="run the cheap fake provider alone")
    f.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.command == "micro" and args.src:
        argv = ["--sizes", args.sizes, "--repeat", str(args.repeat), "--providers", args.providers]
        micro_compare([Path(s).resolve() for s in args.src], args.rounds, argv)
    elif args.command == "micro":
        rows = micro(
            [int(s) for s in args.sizes.split(",")], args.repeat, args.providers.split(",")
        )
        if args.json:
            print(json.dumps(rows))
        else:
            print_micro(rows, f"relay from {Path.cwd()}")
    elif args.command == "e2e":
        args.sizes = [int(s) for s in args.sizes.split(",")]
        e2e(args)
    else:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(_serve_fake(args.port))


if __name__ == "__main__":
    main()
