"""`relay` command line: serve, check-config, queue (postqueue/postsuper), user, dkim.

Queue commands open the queue database directly, so they work whether or not the server
runs; the server sees their changes at its next poll (about a second).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.config import Config, ConfigError, load
from relay.spool import queries
from relay.spool.store import connect, shard_paths, transaction

T = TypeVar("T")
DEFAULT_CONFIG = os.environ.get("RELAY_CONFIG", "config.toml")


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _load(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _shards(args: argparse.Namespace) -> list[Path]:
    cfg = _load(args.config)
    paths = shard_paths(cfg.queue_dir)
    if not paths:
        print(f"relay: no queue under {cfg.queue_dir} yet (has the server run?)", file=sys.stderr)
        raise SystemExit(1)
    return paths


def _run(path: Path, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
    conn = connect(path)
    try:
        return transaction(conn, fn) if write else fn(conn)
    except queries.QueueActionError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        conn.close()


def _each_shard(
    args: argparse.Namespace, fn: Callable[[sqlite3.Connection], list[T]], *, write: bool = True
) -> list[T]:
    """Run fn on every queue shard (one per worker process) and join the results."""
    return [item for path in _shards(args) for item in _run(path, fn, write)]


def _on_message(
    args: argparse.Namespace,
    msg_id: str,
    fn: Callable[[sqlite3.Connection], T],
    *,
    write: bool = True,
) -> T:
    """Run fn on the shard that holds the message."""
    for path in _shards(args):
        if _run(path, lambda c: queries.get(c, msg_id) is not None, False):
            return _run(path, fn, write)
    print(f"relay: no message {msg_id} in the queue", file=sys.stderr)
    raise SystemExit(1)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


# -- commands ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # No caller lookup, thread or process names in the records (the format uses none of
    # them): the logging HOWTO's own advice, and a few percent of a busy relay's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if args.log_level.lower() != "debug":
        # aiosmtpd logs every command at INFO (about ten lines a session); the relay's
        # own loggers already say what happened to each message, once.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    workers = cfg.server.worker_count
    if workers > 1:
        from relay import supervisor

        return supervisor.run(cfg, workers)
    from relay.app import serve

    asyncio.run(serve(cfg))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(
        f"{args.config}: ok ({len(cfg.smtp.listen)} listener(s), "
        f"{len(cfg.upstream)} upstream(s), queue {cfg.queue_dir})"
    )
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    rows = _each_shard(
        args,
        lambda c: queries.list_messages(c, state=args.state, kind=args.kind, limit=args.limit),
        write=False,
    )
    rows = sorted(rows, key=lambda r: r.id)[: args.limit]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(
        f"{'ID':20}  {'KIND':8}  {'STATE':8}  {'SIZE':>8}  {'ARRIVED':19}  "
        f"{'TRIES':>5}  SENDER -> RECIPIENTS / LAST ERROR"
    )
    for r in rows:
        rcpts = r.rcpts or r.meta.get("rcpts_original", [])
        line = (
            f"{r.id:20}  {r.kind:8}  {r.state:8}  {r.size:>8}  {_fmt_time(r.created)}  "
            f"{r.attempts:>5}  <{r.mail_from}> -> {', '.join(rcpts)}"
        )
        if r.last_error:
            line += f"\n{'':>22}{r.last_error}"
        print(line)
    print(f"-- {len(rows)} message(s)")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    def read(c: sqlite3.Connection) -> tuple[Any, list[dict[str, Any]]]:
        return queries.get(c, args.id), queries.timeline(c, args.id)

    row, events = _on_message(args, args.id, read, write=False)
    if args.json:
        print(json.dumps({"message": row.as_dict(), "timeline": events}, indent=2))
        return 0
    print(
        f"id:        {row.id}\nkind:      {row.kind}\nstate:     {row.state}\n"
        f"from:      <{row.mail_from}>\n"
        f"to:        {', '.join(row.meta.get('rcpts_original', row.rcpts))}\n"
        f"pending:   {', '.join(row.rcpts) or '-'}\nsize:      {row.size}\n"
        f"arrived:   {_fmt_time(row.created)}\nrounds:    {row.attempts}"
    )
    if row.state == "deferred":
        print(f"next try:  {_fmt_time(row.next_attempt)}")
    if row.last_error:
        print(f"error:     {row.last_error}")
    print("timeline:")
    for ev in events:
        detail = {k: v for k, v in ev.items() if k not in ("at", "type")}
        print(f"  {_fmt_time(ev['at'])}  {ev['type']:9}  {json.dumps(detail, ensure_ascii=False)}")
    return 0


def cmd_queue_retry(args: argparse.Namespace) -> int:
    now = time.time()
    if args.failed:
        ids = _each_shard(args, lambda c: queries.retry_failed(c, now=now, actor=_actor()))
        print(f"{len(ids)} failed message(s) queued again")
        return 0
    if not args.id:
        print("relay: give a message ID or --failed", file=sys.stderr)
        return 2
    _on_message(args, args.id, lambda c: queries.retry(c, args.id, now=now, actor=_actor()))
    print(f"{args.id}: queued for delivery now")
    return 0


def _simple(action: Callable[..., None], done: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        kwargs: dict[str, Any] = {"actor": _actor()}
        if action is not queries.delete:
            kwargs["now"] = time.time()
        _on_message(args, args.id, lambda c: action(c, args.id, **kwargs))
        print(f"{args.id}: {done}")
        if action is queries.delete:
            logging.getLogger("relay.spool").warning("%s deleted by %s", args.id, _actor())
        return 0

    return run


def cmd_queue_flush(args: argparse.Namespace) -> int:
    ids = _each_shard(args, lambda c: queries.flush(c, now=time.time(), actor=_actor()))
    print(f"{len(ids)} deferred message(s) due now")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from relay.smtp.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.name}: ")
        if password != getpass.getpass("Again: "):
            print("relay: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay: empty password refused", file=sys.stderr)
        return 1
    print("[[smtp.users]]")
    print(f'name = "{args.name}"')
    print(f'password_hash = "{hash_password(password)}"')
    print('allowed_senders = ["*"]   # narrow this, e.g. ["*@example.com"]')
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relay.dkim import generate_key

    pem, record = generate_key(args.domain, args.selector, Path(args.directory), bits=args.bits)
    print(f"private key written to {pem}\n")
    print("Publish this DNS TXT record:\n")
    print(record)
    print("\nand add to config.toml:\n")
    print(
        f'[[dkim]]\ndomain = "{args.domain}"\nselector = "{args.selector}"\n'
        f'private_key = "file:{pem}"'
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="SMTP relay gateway")
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="config file (default: $RELAY_CONFIG or ./config.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the relay")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)
    sub.add_parser("check-config", help="validate the config file").set_defaults(
        func=cmd_check_config
    )

    q = sub.add_parser("queue", help="inspect and act on the queue").add_subparsers(
        dest="queue_command", required=True
    )
    ql = q.add_parser("list", help="list messages")
    ql.add_argument("--state", choices=["queued", "sending", "deferred", "sent", "failed", "held"])
    ql.add_argument("--kind", choices=["outbound", "inbound"])
    ql.add_argument("--limit", type=int, default=1000)
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_queue_list)
    qs = q.add_parser("show", help="one message and its whole timeline")
    qs.add_argument("id")
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(func=cmd_queue_show)
    qr = q.add_parser("retry", help="send a failed/held/deferred message again now")
    qr.add_argument("id", nargs="?")
    qr.add_argument("--failed", action="store_true", help="every failed message")
    qr.set_defaults(func=cmd_queue_retry)
    for name, action, done, help_text in (
        ("hold", queries.hold, "held", "keep a message from being sent"),
        ("release", queries.release, "released", "undo hold"),
        ("delete", queries.delete, "deleted", "remove a message for good"),
    ):
        qa = q.add_parser(name, help=help_text)
        qa.add_argument("id")
        qa.set_defaults(func=_simple(action, done))
    q.add_parser("flush", help="make every deferred message due now").set_defaults(
        func=cmd_queue_flush
    )

    u = sub.add_parser("user", help="SMTP users").add_subparsers(dest="user_command", required=True)
    ua = u.add_parser(
        "add",
        help="print a config entry with a hashed password (prompts, or reads one line from stdin)",
    )
    ua.add_argument("name")
    ua.set_defaults(func=cmd_user_add)

    d = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="dkim_command", required=True)
    dk = d.add_parser("keygen", help="write a key and print its DNS record")
    dk.add_argument("--domain", required=True)
    dk.add_argument("--selector", required=True)
    dk.add_argument("--directory", default="var/dkim")
    dk.add_argument("--bits", type=int, default=2048)
    dk.set_defaults(func=cmd_dkim_keygen)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
