"""`server.workers = N`: N relay processes on one SMTP port, one queue shard each.

One Python process uses one core; Postfix uses all of them with its many processes. The
supervisor forks N workers before any event loop exists; each binds the listeners with
SO_REUSEPORT (the kernel spreads connections) and owns queue shard i, so no two processes
ever wait for the same SQLite write lock. A worker that dies is started again, and its
shard's in-flight messages are recovered at once (their lease owner is gone). Workers die
with the supervisor (PR_SET_PDEATHSIG), so `kill -9` of the supervisor is a crash of the
whole relay, which the queue survives like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable

from relay import sdnotify, wire
from relay.config import Config
from relay.reload import reloaded_for_restarts, remove_pid_file, write_pid_file
from relay.smtp.listener import EX_CONFIG, tls_files

log = logging.getLogger("relay.app")

PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = (0.5, 1, 2, 5, 10)
READY_POLL = 0.2  # seconds between checks for a worker that died before it was ready
# After SIGTERM, workers get `server.shutdown_grace` plus this to drain and close their
# queue (a session storing its message, in-flight attempts giving back leases); then the
# ones still running are killed (what they had leased is recovered at the next start).
STOP_MARGIN = 20


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(
    config: Config, shard: int, workers: int, ready_fd: int, serve: Callable[..., object]
) -> None:
    _die_with_parent()
    sdnotify.forget()  # the supervisor speaks for the relay: READY=1 once all are ready
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Not the supervisor's handler; until serve() takes it, a SIGHUP must not kill.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def ready() -> None:
        os.write(ready_fd, bytes([shard]))
        log.info("worker %d ready (pid %d)", shard, os.getpid(), extra={"event": "worker_ready"})

    code = 0
    try:
        asyncio.run(serve(config, shard=shard, workers=workers, on_ready=ready))  # type: ignore[arg-type]
    except SystemExit as exc:
        # A worker that cannot start (a listener it cannot bind) has logged its one line.
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _prepare(config: Config) -> None:
    """What workers share and must not race to create: the self-signed TLS pair."""
    tls_files(config)


def _wait_ready(read_fd: int, children: dict[int, int], workers: int) -> int | None:
    """Wait until every worker is ready; a worker's exit status if one gave up first.

    Polled, not a blocking read: every process holds the pipe's write end, so a worker
    that dies before it is ready would otherwise leave the supervisor waiting forever.
    """
    ready: set[int] = set()
    while len(ready) < workers:
        readable, _, _ = select.select([read_fd], [], [], READY_POLL)
        if readable:
            ready.update(os.read(read_fd, 64))
            continue
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            return code if code > 0 else 1  # killed by a signal (negative) or 0: failure
    log.info(
        "relay ready: %d workers on one port, queue shards %s; DATA scanner: %s",
        workers,
        ", ".join(str(s) for s in sorted(ready)),
        wire.SCANNER,
        extra={"event": "ready", "scanner": wire.SCANNER},
    )
    return None


def _stop_all(children: dict[int, int]) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    children.clear()


def run(config: Config, workers: int) -> int:
    from relay.app import serve

    _prepare(config)
    read_fd, write_fd = os.pipe()
    children: dict[int, int] = {}
    restarts = [0] * workers
    stopping = False

    def spawn(shard: int) -> None:
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(config, shard, workers, write_fd, serve)
        children[pid] = shard

    def reload(signum: int, _frame: object) -> None:
        """Each worker reloads itself; the supervisor keeps what a restarted worker gets."""
        nonlocal config
        sdnotify.reloading(f"reloading {len(children)} workers")
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        config = reloaded_for_restarts(config)
        sdnotify.ready(f"{workers} workers serving (config reloaded)")

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            sdnotify.stopping(f"stopping {len(children)} workers")
            signal.signal(signal.SIGALRM, overdue)
            signal.alarm(math.ceil(config.server.shutdown_grace) + STOP_MARGIN)
        stopping = True
        # Forwarded each time: a worker's second SIGTERM ends its grace at once.
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def overdue(signum: int, _frame: object) -> None:
        log.error(
            "%d worker(s) still running %ds after SIGTERM; killing them",
            len(children),
            math.ceil(config.server.shutdown_grace) + STOP_MARGIN,
        )
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    pid_path = write_pid_file(config)  # for `relay reload`, before anyone reads "ready"
    for shard in range(workers):
        spawn(shard)

    failed = _wait_ready(read_fd, children, workers)
    if failed is not None:
        log.error("a worker could not start (exit status %d); stopping", failed)
        _stop_all(children)
        remove_pid_file(pid_path)
        return failed
    listening = ", ".join(listen.address for listen in config.smtp.listen)
    sdnotify.ready(f"{workers} workers serving SMTP on {listening}")

    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        shard = children.pop(pid)
        if stopping:
            continue
        if os.waitstatus_to_exitcode(status) == EX_CONFIG:
            # Its listener cannot be served: starting it again would fail the same way.
            log.error("worker %d cannot serve its listeners; stopping the relay", shard)
            _stop_all(children)
            remove_pid_file(pid_path)
            return EX_CONFIG
        delay = RESTART_BACKOFF[min(restarts[shard], len(RESTART_BACKOFF) - 1)]
        restarts[shard] += 1
        log.error(
            "worker %d (pid %d) exited with status %d; starting it again in %.1fs",
            shard,
            pid,
            os.waitstatus_to_exitcode(status),
            delay,
            extra={"event": "worker_exited"},
        )
        time.sleep(delay)
        if not stopping:
            spawn(shard)
    remove_pid_file(pid_path)
    sys.stderr.flush()
    return 0
