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
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from relay.config import Config

log = logging.getLogger("relay.app")

PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = (0.5, 1, 2, 5, 10)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(
    config: Config, shard: int, workers: int, ready_fd: int, serve: Callable[..., object]
) -> None:
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)

    def ready() -> None:
        os.write(ready_fd, bytes([shard]))
        log.info("worker %d ready (pid %d)", shard, os.getpid())

    code = 0
    try:
        asyncio.run(serve(config, shard=shard, workers=workers, on_ready=ready))  # type: ignore[arg-type]
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def run(config: Config, workers: int) -> int:
    from relay.app import serve

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

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for shard in range(workers):
        spawn(shard)

    ready: set[int] = set()
    while len(ready) < workers:
        data = os.read(read_fd, 64)
        if not data:
            break
        ready.update(data)
    log.info(
        "relay ready: %d workers on one port, queue shards %s",
        workers,
        ", ".join(str(s) for s in sorted(ready)),
    )

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
        delay = RESTART_BACKOFF[min(restarts[shard], len(RESTART_BACKOFF) - 1)]
        restarts[shard] += 1
        log.error(
            "worker %d (pid %d) exited with status %d; starting it again in %.1fs",
            shard,
            pid,
            os.waitstatus_to_exitcode(status),
            delay,
        )
        time.sleep(delay)
        if not stopping:
            spawn(shard)
    sys.stderr.flush()
    return 0
