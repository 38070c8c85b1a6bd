"""`relay suppression list | add | remove | import`: the suppression list from a shell.

Writes go to the queue's store (shared.db, or the PostgreSQL queue); a running relay takes
them within its poll interval (two seconds). `import` reads the CSV files providers export
(SendGrid bounces and spam reports, Mailgun bounces, SES's account-level suppression list),
so moving to the relay does not start mailing addresses a provider already knew were dead.
"""

from __future__ import annotations

import argparse
import csv
import email.utils
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay.cli.common import actor, fmt_time, load_for_queue, rfc3339, with_admin
from relay.config import SuppressionConfig
from relay.queue.admin import QueueAdmin
from relay.queue.base import Suppression
from relay.suppression import REASON_TEXT, check_scope, operator_entry

PAGE = 1000
BATCH = 1000
MAX_SHOWN_INVALID = 20

#: Header names that hold the address, compared without case, spaces or underscores
#: ("email" SendGrid, "address" Mailgun, "EmailAddress" SES, "Email Address" spreadsheets).
ADDRESS_COLUMNS = ("email", "emailaddress", "address", "recipient")
REASON_COLUMNS = ("reason", "type", "suppressionreason")
DETAIL_COLUMNS = ("error", "status", "code")
CREATED_COLUMNS = ("created", "createdat", "lastupdatetime", "date", "timestamp")

#: A provider's reason word → ours; other text in a reason column is kept as the detail.
PROVIDER_REASONS = {
    "bounce": "hard_bounce",
    "bounced": "hard_bounce",
    "hard_bounce": "hard_bounce",
    "hardbounce": "hard_bounce",
    "complaint": "complaint",
    "complained": "complaint",
    "spam": "complaint",
    "spamreport": "complaint",
    "spam_report": "complaint",
    "unsubscribe": "unsubscribe",
    "unsubscribed": "unsubscribe",
}


def entry_json(e: Suppression) -> dict[str, Any]:
    out = e.as_dict()
    for key in ("created", "expires"):
        out[f"{key}_epoch"] = out[key]
        out[key] = rfc3339(out[key])
    return out


# -- list, add, remove ---------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    async def run(admin: QueueAdmin) -> list[Suppression]:
        found: list[Suppression] = []
        after: str | None = None
        while len(found) < args.limit:
            page = await admin.queue.suppressions.list(
                contains=args.search, after=after, limit=min(PAGE, args.limit - len(found))
            )
            found += page
            if len(page) < PAGE:
                break
            after = page[-1].cursor
        return found

    entries = with_admin(args, run)
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], indent=2, ensure_ascii=False))
        return 0
    print(f"{'ADDRESS':36}  {'SCOPE':20}  {'REASON':12}  {'SINCE':19}  {'EXPIRES':19}  SOURCE")
    for e in entries:
        expires = fmt_time(e.expires) if e.expires is not None else "never"
        print(
            f"{e.address:36}  {e.scope or '(every sender)':20}  {e.reason:12}  "
            f"{fmt_time(e.created)}  {expires:19}  {e.source}"
        )
        if e.detail:
            print(f"{'':38}{e.detail}")
    print(f"-- {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    try:
        entry = operator_entry(
            args.address,
            source=actor(),
            now=time.time(),
            reason=args.reason,
            scope=args.scope,
            expires=args.expires,
            detail=args.detail or "",
        )
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    with_admin(args, lambda a: a.queue.suppressions.add([entry]))
    until = f" until {fmt_time(entry.expires)}" if entry.expires is not None else ""
    scope = f" for mail from {entry.scope}" if entry.scope else ""
    print(f"suppressed {entry.address}{scope} ({REASON_TEXT[entry.reason]}){until}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        scope = None if args.scope is None else check_scope(args.scope)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    address = args.address.strip().lower()
    removed = with_admin(args, lambda a: a.queue.suppressions.remove(address, scope=scope))
    if not removed:
        where = "" if scope is None else f" for mail from {scope or '(every sender)'}"
        print(f"relay: {address} is not on the suppression list{where}", file=sys.stderr)
        return 1
    print(f"removed {address} ({removed} entr{'y' if removed == 1 else 'ies'})")
    return 0


# -- import ---------------------------------------------------------------------------------


@dataclass
class ImportResult:
    entries: list[Suppression] = field(default_factory=list)
    skipped: int = 0  # blank, repeated, or already expired
    invalid: list[str] = field(default_factory=list)  # "line N: what is wrong"


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("_", "").replace("-", "")


def _column(header: list[str], wanted: tuple[str, ...]) -> int | None:
    keys = [_key(h) for h in header]
    for name in wanted:
        if name in keys:
            return keys.index(name)
    return None


def parse_created(text: str) -> float | None:
    """Epoch seconds (SendGrid), ISO 8601 (SES), or an RFC 2822 date (Mailgun)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
        return value / 1000 if value > 1e11 else value  # milliseconds
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_csv(
    lines: list[str],
    *,
    source: str,
    now: float,
    config: SuppressionConfig,
    reason: str | None = None,
    scope: str | None = None,
    expires: str | None = None,
) -> ImportResult:
    """The entries of a provider's CSV export. Raises ValueError when no column holds
    addresses. An entry expires `expires` from now when given, else as [suppression]
    expire_after says for its reason, counted from when the provider recorded it."""
    rows = csv.reader(lines)
    header = next(rows, None)
    if header is None:
        raise ValueError("the file is empty; expected a header row and one address a line")
    address_at = _column(header, ADDRESS_COLUMNS)
    if address_at is None:
        raise ValueError(
            f"no address column in the header ({', '.join(header) or 'empty'}); name it"
            " email, address, recipient or EmailAddress"
        )
    reason_at = _column(header, REASON_COLUMNS)
    detail_at = _column(header, DETAIL_COLUMNS)
    created_at = _column(header, CREATED_COLUMNS)
    result = ImportResult()
    seen: set[str] = set()

    def cell(row: list[str], at: int | None) -> str:
        return row[at].strip() if at is not None and at < len(row) else ""

    for row in rows:
        line = rows.line_num
        address = cell(row, address_at)
        if not address:
            result.skipped += 1
            continue
        given = cell(row, reason_at)
        mapped = PROVIDER_REASONS.get(given.lower().replace(" ", "_")) if given else None
        detail = given if given and mapped is None else ""
        extra = cell(row, detail_at)
        detail = "; ".join(d for d in (detail, extra) if d)[:1000]
        created = parse_created(cell(row, created_at)) or now
        try:
            entry = operator_entry(
                address,
                source=source,
                now=now,
                reason=reason or mapped or "import",
                scope=scope,
                expires=expires,
                detail=detail,
            )
        except ValueError as exc:
            result.invalid.append(f"line {line}: {exc}")
            continue
        entry.created = created
        if not expires:
            ttl = config.expire_after.get(entry.reason)
            entry.expires = None if ttl is None else created + float(ttl)
        if entry.expires is not None and entry.expires <= now:
            result.skipped += 1
            continue
        if entry.address in seen:
            result.skipped += 1
            continue
        seen.add(entry.address)
        result.entries.append(entry)
    return result


def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        print(f"relay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except UnicodeDecodeError:
        print(f"relay: {path} is not UTF-8 text; export it as UTF-8 CSV", file=sys.stderr)
        return 1
    cfg = load_for_queue(args.config)
    try:
        result = read_csv(
            text.splitlines(),
            source=f"import:{path.name}",
            now=time.time(),
            config=cfg.suppression,
            reason=args.reason,
            scope=args.scope,
            expires=args.expires,
        )
    except (ValueError, csv.Error) as exc:
        print(f"relay: {path}: {exc}", file=sys.stderr)
        return 1

    async def run(admin: QueueAdmin) -> int:
        added = 0
        for start in range(0, len(result.entries), BATCH):
            added += await admin.queue.suppressions.add(result.entries[start : start + BATCH])
        return added

    added = with_admin(args, run) if result.entries else 0
    for problem in result.invalid[:MAX_SHOWN_INVALID]:
        print(f"relay: {path.name}: {problem}", file=sys.stderr)
    if len(result.invalid) > MAX_SHOWN_INVALID:
        more = len(result.invalid) - MAX_SHOWN_INVALID
        print(f"relay: {path.name}: ... and {more} more invalid line(s)", file=sys.stderr)
    print(
        f"{path.name}: added {added}, skipped {result.skipped} (blank, repeated or already"
        f" expired), invalid {len(result.invalid)}"
    )
    return 1 if result.invalid and not added else 0


def add_suppression_commands(sub: Any) -> None:
    s = sub.add_parser(
        "suppression", help="addresses the relay will not mail (bounces, complaints)"
    ).add_subparsers(dest="suppression_command", required=True)
    sl = s.add_parser("list", help="the list, in address order")
    sl.add_argument("--search", help="only addresses that contain this (any case)")
    sl.add_argument("--limit", type=int, default=100_000)
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=cmd_list)

    sa = s.add_parser("add", help="stop mailing an address")
    sa.add_argument("address")
    _add_entry_options(sa)
    sa.add_argument("--detail", help="a note kept with the entry")
    sa.set_defaults(func=cmd_add)

    sr = s.add_parser("remove", help="mail an address again")
    sr.add_argument("address")
    sr.add_argument("--scope", help="only its entry for this sender domain (default: every entry)")
    sr.set_defaults(func=cmd_remove)

    si = s.add_parser(
        "import",
        help="add the addresses of a provider's CSV export (SendGrid, Mailgun, SES)",
        description="The CSV needs a header row with an address column (email, address,"
        " recipient, EmailAddress, Email Address); a reason column (SES: BOUNCE/COMPLAINT)"
        " and a created column are used when present.",
    )
    si.add_argument("file")
    _add_entry_options(si)
    si.set_defaults(func=cmd_import)


def _add_entry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reason",
        choices=("hard_bounce", "complaint", "unsubscribe", "manual", "import"),
        help="default: manual for add; for import, the file's reason column, else import",
    )
    p.add_argument("--scope", help="only for mail from this sender domain (default: every sender)")
    p.add_argument("--expires", help="forget it after this long (30d, 12h); default never")
