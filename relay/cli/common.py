"""What every `relay` subcommand shares: loading the config, opening the queue for an
operator, naming the actor, printing times."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay import config
from relay.checks import load_checked
from relay.config import Config, ConfigError, Secret, resolve_secret
from relay.queue import open_queue
from relay.queue.admin import QueueAdmin
from relay.queue.base import QueueActionError, StoreError

T = TypeVar("T")


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def rfc3339(ts: float | None) -> str | None:
    """JSON output's times: RFC 3339 in UTC (epoch seconds ride along as `*_epoch`)."""
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def load(path: str) -> Config:
    """The config, fully checked (every command gets the same errors check-config gives)."""
    try:
        return load_checked(path)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def load_for_queue(path: str) -> Config:
    """The config for queue and upstream commands: no provider secrets resolved (an admin
    shell without the service's EnvironmentFile can still run `relay queue list`), only
    the queue's location, which may itself be `env:`/`file:`."""
    try:
        cfg = config.load(path, secrets=False)
        location = resolve_secret(cfg.server.queue, base_dir=cfg.base_dir)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as exc:
        print(f"relay: configuration error: server.queue: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, queue=Secret(location)))


def actor() -> str:
    return f"cli:{getpass.getuser()}"


def with_admin(args: argparse.Namespace, fn: Callable[[QueueAdmin], Awaitable[T]]) -> T:
    """Open the configured queue for operator use, run fn, close it; errors said plainly."""
    cfg = load_for_queue(args.config)

    async def run() -> T:
        queue = open_queue(cfg, owner=actor())
        try:
            await queue.connect()
            return await fn(QueueAdmin(queue))
        finally:
            await queue.close()

    try:
        return asyncio.run(run())
    except QueueActionError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except StoreError as exc:
        print(f"relay: the queue is unavailable: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
