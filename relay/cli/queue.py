"""`relay queue ...` (postqueue/postsuper/qshape) and `relay upstream ...`.

Every action goes through `relay.queue.admin`, the code the HTTP API calls too. Bulk
actions take ids, `ALL`, or `-` (ids on stdin, one per line), narrowed by filters, as
`postsuper -d ALL deferred` and `postsuper -d -` do.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from relay.cli.common import actor, fmt_time, load_for_queue, rfc3339, with_admin
from relay.config import parse_duration
from relay.message import Kind, Status
from relay.queue.admin import MessageAction, QueueAdmin
from relay.queue.base import MessageRow, QueueActionError, UpstreamShare, event_detail, heal
from relay.queue.select import Selection, normalise_id, recipients, shape

STATES = [s.value for s in Status]
KINDS = [k.value for k in Kind]
BULK_LIMIT = 1_000_000  # `ALL` means all: the selection reads ids, not bodies


def row_json(row: MessageRow) -> dict[str, Any]:
    """A message for JSON output: RFC 3339 times (epoch seconds beside them), and both the
    recipients it was sent to and those still pending."""
    out = row.as_dict()
    for key in ("created", "updated", "next_attempt"):
        out[f"{key}_epoch"] = out[key]
        out[key] = rfc3339(out[key])
    out["recipients"] = recipients(row)
    out["pending"] = out.pop("rcpts")
    return out


def cmd_list(args: argparse.Namespace) -> int:
    selection = _filters(args)

    async def run(admin: QueueAdmin) -> list[MessageRow]:
        # The queue filters by state and kind itself; the other filters need every row.
        limit = BULK_LIMIT if selection.filters_rows else args.limit
        rows = await admin.search(state=args.state, kind=args.kind, limit=limit)
        now = time.time()
        return [r for r in rows if selection.matches(r, now=now)][: args.limit]

    rows = with_admin(args, run)
    if args.json:
        print(json.dumps([row_json(r) for r in rows], indent=2, ensure_ascii=False))
        return 0
    print(
        f"{'ID':20}  {'KIND':8}  {'STATE':8}  {'SIZE':>8}  {'ARRIVED':19}  "
        f"{'TRIES':>5}  SENDER -> RECIPIENTS / LAST ERROR"
    )
    for r in rows:
        line = (
            f"{r.id:20}  {r.kind:8}  {r.state:8}  {r.size:>8}  {fmt_time(r.created)}  "
            f"{r.attempts:>5}  <{r.mail_from}> -> {', '.join(recipients(r))}"
        )
        if r.last_error:
            line += f"\n{'':>22}{r.last_error}"
        print(line)
    print(f"-- {len(rows)} message(s)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    view = with_admin(args, lambda a: a.show(normalise_id(args.id)))
    row = view.message
    if args.json:
        timeline = [{**e, "at": rfc3339(e["at"]), "at_epoch": e["at"]} for e in view.timeline]
        print(json.dumps({"message": row_json(row), "timeline": timeline}, indent=2))
        return 0
    print(
        f"id:        {row.id}\nkind:      {row.kind}\nstate:     {row.state}\n"
        f"from:      <{row.mail_from}>\n"
        f"to:        {', '.join(recipients(row))}\n"
        f"pending:   {', '.join(row.rcpts) or '-'}\nsize:      {row.size}\n"
        f"arrived:   {fmt_time(row.created)}\nrounds:    {row.attempts}"
    )
    if row.state == Status.DEFERRED:
        print(f"next try:  {fmt_time(row.next_attempt)}")
    if row.last_error:
        print(f"error:     {row.last_error}")
    print("timeline:")
    for ev in view.timeline:
        detail = event_detail(ev)
        print(f"  {fmt_time(ev['at'])}  {ev['type']:9}  {json.dumps(detail, ensure_ascii=False)}")
    return 0


# -- actions on one message, many, or a selection -----------------------------------------


def _filters(args: argparse.Namespace, ids: tuple[str, ...] = ()) -> Selection:
    older = getattr(args, "older_than", None)
    return Selection(
        ids=ids,
        state=getattr(args, "state", None),
        kind=getattr(args, "kind", None),
        sender=getattr(args, "sender", None),
        recipient=getattr(args, "recipient", None),
        older_than=parse_duration(older) if older else None,
    )


def _selected_ids(args: argparse.Namespace) -> tuple[list[str], Selection | None]:
    """Explicit ids (no search needed), or a selection to search for (`ALL`, filters)."""
    given = list(args.ids)
    if given == ["-"]:
        given = [line for line in sys.stdin.read().split() if line]
    has_filters = any(
        getattr(args, name, None) for name in ("state", "kind", "sender", "recipient", "older_than")
    )
    if given and given != ["ALL"] and not has_filters:
        return [normalise_id(i) for i in given], None
    if not given:
        raise SystemExit("relay: give message IDs, ALL, or - (IDs on stdin)")
    ids = () if given == ["ALL"] else tuple(normalise_id(i) for i in given)
    return [], _filters(args, ids)


def bulk(action: MessageAction, done: str) -> Callable[[argparse.Namespace], int]:
    """hold / release / delete / retry over a selection; one line per refusal, then a sum."""

    def run(args: argparse.Namespace) -> int:
        ids, selection = _selected_ids(args)

        async def act(admin: QueueAdmin) -> tuple[list[str], list[str], set[str]]:
            targets = ids
            if selection is not None:
                rows = await admin.search(state=selection.state, limit=BULK_LIMIT)
                now = time.time()
                targets = [r.id for r in rows if selection.matches(r, now=now)]
            acted, refused, probing = [], [], set()
            for msg_id in targets:
                try:
                    probing.update(await admin.act(msg_id, action, actor=actor()))
                except QueueActionError as exc:
                    refused.append(str(exc))
                    continue
                acted.append(msg_id)
            return acted, refused, probing

        acted, refused, probing = with_admin(args, act)
        for reason in refused:
            print(f"relay: {reason}", file=sys.stderr)
        if len(acted) == 1 and not refused:
            print(f"{acted[0]}: {done}")
        else:
            refusals = f", {len(refused)} refused" if refused else ""
            print(f"{len(acted)} message(s) {done}{refusals}")
        _say_probing(sorted(probing))
        return 1 if refused and not acted else 0

    return run


def cmd_retry(args: argparse.Namespace) -> int:
    if args.failed:
        ids, probing = with_admin(args, lambda a: a.retry_failed(actor=actor()))
        print(f"{len(ids)} failed message(s) queued again")
        _say_probing(probing)
        return 0
    return bulk("retry", "queued for delivery now")(args)


def _say_probing(names: list[str]) -> None:
    if names:
        print(f"breaker open on {', '.join(names)}: probing now instead of after the cooldown")


def cmd_flush(args: argparse.Namespace) -> int:
    ids, probing = with_admin(args, lambda a: a.flush(actor=actor()))
    print(f"{len(ids)} deferred message(s) due now")
    _say_probing(probing)
    return 0


def cmd_shape(args: argparse.Namespace) -> int:
    """qshape: what waits, per recipient domain and age."""
    states = [args.state] if args.state else ["queued", "deferred", "held", "sending"]

    async def run(admin: QueueAdmin) -> list[MessageRow]:
        rows: list[MessageRow] = []
        for state in states:
            rows += await admin.search(state=state, limit=BULK_LIMIT)
        return rows

    table = shape(with_admin(args, run), top=args.top)
    width = max([6, *(len(d) for d, _, _ in table.rows)])
    head = "".join(f"{b:>9}" for b in table.buckets)
    print(f"{'DOMAIN':>{width}} {'TOTAL':>7}{head}")
    print(f"{'TOTAL':>{width}} {sum(table.total):>7}" + "".join(f"{n:>9}" for n in table.total))
    for domain, total, counts in table.rows:
        print(f"{domain:>{width}} {total:>7}" + "".join(f"{n:>9}" for n in counts))
    return 0


# -- migrate, export, import --------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    print(with_admin(args, lambda a: a.queue.migrate()))
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


def cmd_export(args: argparse.Namespace) -> int:
    """Every message, state, body and timeline as JSON lines (bodies in base64)."""

    async def export(a: QueueAdmin) -> int:
        n = 0
        with open(args.file, "w", encoding="utf-8") if args.file != "-" else sys.stdout as out:
            async for record in a.queue.export():
                out.write(_record_to_json(record) + "\n")
                n += 1
        return n

    n = with_admin(args, export)
    print(f"{n} message(s) exported", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
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

    added, skipped = with_admin(args, load_file)
    print(f"{added} message(s) imported, {skipped} already present")
    return 0


# -- upstreams ----------------------------------------------------------------------------


def cmd_upstream_list(args: argparse.Namespace) -> int:
    """Each configured upstream with the state every relay process shares."""
    cfg = load_for_queue(args.config)
    rows = with_admin(args, lambda a: a.upstreams())
    now = time.time()
    out: list[dict[str, Any]] = []
    for up in cfg.upstream:
        row = rows.get(up.name) or UpstreamShare(up.name, health_stamp=now)
        health = heal(row.health, row.health_stamp, now=now, half_life=cfg.routing.health_half_life)
        out.append(
            {
                "name": up.name,
                "type": up.type,
                "priority": up.priority,
                "breaker": row.breaker,
                "next_probe": rfc3339(row.next_probe),
                "paused": bool(row.paused),
                "health": round(health, 3),
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
    for u, up in zip(out, cfg.upstream, strict=True):
        shared = rows.get(up.name)
        state = "paused" if u["paused"] else ""
        if shared is not None and shared.next_probe:
            state = f"probe at {fmt_time(shared.next_probe)} {state}".strip()
        latency = "-" if u["latency_ms"] is None else f"{u['latency_ms']}ms"
        print(
            f"{u['name']:16}  {u['type']:9}  {u['priority']:>4}  {u['breaker']:9}  "
            f"{u['health']:>6}  {u['attempts']:>7}  {u['failures']:>7}  {latency:>8}  {state}"
        )
        if u["last_error"]:
            print(f"{'':>18}{u['last_error']}")
    return 0


def cmd_upstream_action(args: argparse.Namespace) -> int:
    cfg = load_for_queue(args.config)
    names = [u.name for u in cfg.upstream]
    if args.name not in names:
        print(
            f"relay: no upstream {args.name!r} in {args.config} (known: {', '.join(names)})",
            file=sys.stderr,
        )
        return 1
    with_admin(
        args,
        lambda a: a.upstream_action(
            args.name, args.action, actor=actor(), cooldown=cfg.routing.cooldown
        ),
    )
    said = {
        "reset": "breaker closed, health and failure count reset",
        "pause": "paused: no new attempts until `relay upstream resume`",
        "resume": "resumed",
    }
    print(f"{args.name}: {said[args.action]} (running relays take it within a second)")
    return 0


# -- the parser ---------------------------------------------------------------------------


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=STATES)
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--from", dest="sender", metavar="TEXT", help="sender contains TEXT")
    p.add_argument("--to", dest="recipient", metavar="TEXT", help="a recipient contains TEXT")
    p.add_argument("--older-than", metavar="AGE", help="arrived at least AGE ago (30m, 2h, 3d)")


def add_queue_commands(sub: Any) -> None:
    q = sub.add_parser("queue", help="inspect and act on the queue").add_subparsers(
        dest="queue_command", required=True
    )
    ql = q.add_parser("list", help="list messages")
    _add_filters(ql)
    ql.add_argument("--limit", type=int, default=1000)
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(func=cmd_list)
    qs = q.add_parser("show", help="one message and its whole timeline")
    qs.add_argument("id")
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(func=cmd_show)
    qr = q.add_parser("retry", help="send failed/held/deferred messages again now")
    qr.add_argument("ids", nargs="*", metavar="ID", help="IDs, ALL, or - (IDs on stdin)")
    qr.add_argument("--failed", action="store_true", help="every failed message")
    _add_filters(qr)
    qr.set_defaults(func=cmd_retry)
    commands: tuple[tuple[MessageAction, str, str], ...] = (
        ("hold", "held", "keep messages from being sent"),
        ("release", "released", "undo hold"),
        ("delete", "deleted", "remove messages for good"),
    )
    for name, done, help_text in commands:
        qa = q.add_parser(name, help=help_text)
        qa.add_argument("ids", nargs="+", metavar="ID", help="IDs, ALL, or - (IDs on stdin)")
        _add_filters(qa)
        qa.set_defaults(func=bulk(name, done))
    q.add_parser("flush", help="make every deferred message due now").set_defaults(func=cmd_flush)
    qq = q.add_parser("shape", help="waiting messages per recipient domain and age (qshape)")
    qq.add_argument("--state", choices=STATES, help="default: everything not yet done")
    qq.add_argument("--top", type=int, default=20)
    qq.set_defaults(func=cmd_shape)
    q.add_parser(
        "migrate", help="create or upgrade the queue's database schema (PostgreSQL)"
    ).set_defaults(func=cmd_migrate)
    qe = q.add_parser("export", help="write every message (state, body, timeline) as JSON lines")
    qe.add_argument("file", nargs="?", default="-", help="output file (default: stdout)")
    qe.set_defaults(func=cmd_export)
    qi = q.add_parser("import", help="load an export into the configured queue")
    qi.add_argument("file", nargs="?", default="-", help="input file (default: stdin)")
    qi.set_defaults(func=cmd_import)

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
