"""`relay` command line: serve, check-config, queue (postqueue/postsuper), user, dkim.

Queue commands go through `relay.queue.admin`, the same code the HTTP API calls, on
whichever engine the config names; they work whether or not the server runs. A running
server sees their changes at once on PostgreSQL, within a second on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.checks import load_checked
from relay.config import Config, ConfigError
from relay.queue import open_queue
from relay.queue.admin import QueueAdmin
from relay.queue.base import QueueActionError, StoreError, UpstreamShare, heal

T = TypeVar("T")
DEFAULT_CONFIG = os.environ.get("RELAY_CONFIG", "config.toml")


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _load(path: str) -> Config:
    """The config, fully checked (every command gets the same errors check-config gives)."""
    try:
        return load_checked(path)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _with_admin(args: argparse.Namespace, fn: Callable[[QueueAdmin], Awaitable[T]]) -> T:
    """Open the configured queue for operator use, run fn, close it; errors said plainly."""
    cfg = _load(args.config)

    async def run() -> T:
        queue = open_queue(cfg, owner=_actor())
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
    queue_state = _with_admin(args, lambda a: a.queue.check())
    print(
        f"{args.config}: ok ({len(cfg.smtp.listen)} listener(s), "
        f"{len(cfg.upstream)} upstream(s), queue {queue_state})"
    )
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    rows = _with_admin(args, lambda a: a.search(state=args.state, kind=args.kind, limit=args.limit))
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
    view = _with_admin(args, lambda a: a.show(args.id))
    if args.json:
        print(json.dumps(view.as_dict(), indent=2))
        return 0
    row = view.message
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
    for ev in view.timeline:
        detail = {k: v for k, v in ev.items() if k not in ("at", "type")}
        print(f"  {_fmt_time(ev['at'])}  {ev['type']:9}  {json.dumps(detail, ensure_ascii=False)}")
    return 0


def cmd_queue_retry(args: argparse.Namespace) -> int:
    if args.failed:
        ids, probing = _with_admin(args, lambda a: a.retry_failed(actor=_actor()))
        print(f"{len(ids)} failed message(s) queued again")
        _say_probing(probing)
        return 0
    if not args.id:
        print("relay: give a message ID or --failed", file=sys.stderr)
        return 2
    probing = _with_admin(args, lambda a: a.retry(args.id, actor=_actor()))
    print(f"{args.id}: queued for delivery now")
    _say_probing(probing)
    return 0


def _say_probing(names: list[str]) -> None:
    if names:
        print(f"breaker open on {', '.join(names)}: probing now instead of after the cooldown")


def _simple(action: str, done: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        _with_admin(args, lambda a: getattr(a, action)(args.id, actor=_actor()))
        print(f"{args.id}: {done}")
        return 0

    return run


def cmd_queue_flush(args: argparse.Namespace) -> int:
    ids, probing = _with_admin(args, lambda a: a.flush(actor=_actor()))
    print(f"{len(ids)} deferred message(s) due now")
    _say_probing(probing)
    return 0


def cmd_upstream_list(args: argparse.Namespace) -> int:
    """Each configured upstream with the state every relay process shares."""
    cfg = _load(args.config)
    rows = _with_admin(args, lambda a: a.upstreams())
    out: list[dict[str, Any]] = []
    for up in cfg.upstream:
        row = rows.get(up.name) or UpstreamShare(up.name, health_stamp=time.time())
        out.append(
            {
                "name": up.name,
                "type": up.type,
                "priority": up.priority,
                "breaker": row.breaker,
                "next_probe": row.next_probe,
                "paused": bool(row.paused),
                "health": round(
                    heal(
                        row.health,
                        row.health_stamp,
                        now=time.time(),
                        half_life=cfg.routing.health_half_life,
                    ),
                    3,
                ),
                "attempts": row.attempts,
                "successes": row.successes,
                "failures": row.failures,
                "latency_ms": None
                if row.latency_ewma is None
                else round(row.latency_ewma * 1000, 1),
                "last_error": row.last_error,
            }
        )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{'NAME':16}  {'TYPE':9}  {'PRIO':>4}  {'BREAKER':9}  {'HEALTH':>6}  "
        f"{'TRIES':>7}  {'FAILED':>7}  {'LATENCY':>8}  STATE / LAST ERROR"
    )
    for u in out:
        state = "paused" if u["paused"] else ""
        if u["next_probe"]:
            state = f"probe at {_fmt_time(u['next_probe'])} {state}".strip()
        latency = "-" if u["latency_ms"] is None else f"{u['latency_ms']}ms"
        print(
            f"{u['name']:16}  {u['type']:9}  {u['priority']:>4}  {u['breaker']:9}  "
            f"{u['health']:>6}  {u['attempts']:>7}  {u['failures']:>7}  {latency:>8}  "
            f"{state}"
        )
        if u["last_error"]:
            print(f"{'':>18}{u['last_error']}")
    return 0


def cmd_upstream_action(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    names = [u.name for u in cfg.upstream]
    if args.name not in names:
        print(
            f"relay: no upstream {args.name!r} in {args.config} (known: {', '.join(names)})",
            file=sys.stderr,
        )
        return 1
    _with_admin(
        args,
        lambda a: a.upstream_action(
            args.name, args.action, actor=_actor(), cooldown=cfg.routing.cooldown
        ),
    )
    said = {
        "reset": "breaker closed, health and failure count reset",
        "pause": "paused: no new attempts until `relay upstream resume`",
        "resume": "resumed",
    }
    print(f"{args.name}: {said[args.action]} (running relays take it within a second)")
    return 0


def cmd_queue_migrate(args: argparse.Namespace) -> int:
    said = _with_admin(args, lambda a: a.queue.migrate())
    print(said)
    return 0


def _record_to_json(record: dict[str, Any]) -> str:
    body = record["body"]
    out = {**record, "body": None if body is None else base64.b64encode(body).decode()}
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _record_from_json(line: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(line)
    if record.get("body") is not None:
        record["body"] = base64.b64decode(record["body"])
    return record


def cmd_queue_export(args: argparse.Namespace) -> int:
    """Every message, state, body and timeline as JSON lines (bodies in base64)."""

    async def export(a: QueueAdmin) -> int:
        n = 0
        with open(args.file, "w", encoding="utf-8") if args.file != "-" else sys.stdout as out:
            async for record in a.queue.export():
                out.write(_record_to_json(record) + "\n")
                n += 1
        return n

    n = _with_admin(args, export)
    print(f"{n} message(s) exported", file=sys.stderr)
    return 0


def cmd_queue_import(args: argparse.Namespace) -> int:
    """Load an export into the configured queue; ids already there are kept as they are."""

    async def load_file(a: QueueAdmin) -> tuple[int, int]:
        added = skipped = 0
        with open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin as src:
            for line in src:
                if not line.strip():
                    continue
                if await a.queue.import_record(_record_from_json(line)):
                    added += 1
                else:
                    skipped += 1
        return added, skipped

    added, skipped = _with_admin(args, load_file)
    print(f"{added} message(s) imported, {skipped} already present")
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
    for name, done, help_text in (
        ("hold", "held", "keep a message from being sent"),
        ("release", "released", "undo hold"),
        ("delete", "deleted", "remove a message for good"),
    ):
        qa = q.add_parser(name, help=help_text)
        qa.add_argument("id")
        qa.set_defaults(func=_simple(name, done))
    q.add_parser("flush", help="make every deferred message due now").set_defaults(
        func=cmd_queue_flush
    )
    q.add_parser(
        "migrate", help="create or upgrade the queue's database schema (PostgreSQL)"
    ).set_defaults(func=cmd_queue_migrate)
    qe = q.add_parser("export", help="write every message (state, body, timeline) as JSON lines")
    qe.add_argument("file", nargs="?", default="-", help="output file (default: stdout)")
    qe.set_defaults(func=cmd_queue_export)
    qi = q.add_parser("import", help="load an export into the configured queue")
    qi.add_argument("file", nargs="?", default="-", help="input file (default: stdin)")
    qi.set_defaults(func=cmd_queue_import)

    up = sub.add_parser("upstream", help="upstreams' shared state").add_subparsers(
        dest="upstream_command", required=True
    )
    upl = up.add_parser("list", help="breaker, health, next probe, counters of each upstream")
    upl.add_argument("--json", action="store_true")
    upl.set_defaults(func=cmd_upstream_list)
    for action, help_text in (
        ("reset", "close the breaker and forget the failures"),
        ("pause", "take no new attempts (drain it); survives restarts"),
        ("resume", "undo pause"),
    ):
        upa = up.add_parser(action, help=help_text)
        upa.add_argument("name")
        upa.set_defaults(func=cmd_upstream_action, action=action)

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
