"""The suppression list as each process sees it: a copy in memory, kept current.

RCPT TO is answered from this copy (a dict lookup, no database round trip on the hot
path); the copy follows the store's `changes` every couple of seconds, so an address a
webhook suppressed in another process (or on another host) is refused there shortly
after, and one added or removed in this process is refused (or taken) at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay.address import Problem, mailbox_problem
from relay.config import SUPPRESSION_REASONS, SuppressionConfig, parse_duration
from relay.queue.base import StoreError, Suppression, SuppressionStore

log = logging.getLogger("relay.suppression")

POLL_INTERVAL = 2.0
MAX_EXPIRES = 100 * 365 * 86400.0
PURGE_INTERVAL = 3600.0

#: How a reason reads in a reply or on the page.
REASON_TEXT = {
    "hard_bounce": "hard bounce",
    "complaint": "spam complaint",
    "unsubscribe": "unsubscribe",
    "manual": "added by an operator",
    "import": "imported",
}


def domain_of(address: str) -> str:
    """The lower-cased domain of an address ("" for the null sender or a bare name)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def describe(entry: Suppression) -> str:
    """Why and since when, in a few words: "hard bounce on 2026-11-30 via sendgrid:..."."""
    day = datetime.fromtimestamp(entry.created, UTC).strftime("%Y-%m-%d")
    text = f"{REASON_TEXT.get(entry.reason, entry.reason)} on {day}"
    if entry.source:
        text += f" via {entry.source}"
    if entry.scope:
        text += f", for mail from {entry.scope}"
    return text


def removal_hint(entry: Suppression) -> str:
    """The command that lifts the entry (what the reply and the API tell the sender)."""
    scope = f" --scope {entry.scope}" if entry.scope else ""
    return f"relay suppression remove {entry.address}{scope}"


def refusal_reply(rcpt: str, entry: Suppression) -> str:
    """The SMTP reply to RCPT TO for a suppressed recipient."""
    return (
        f"550 5.1.1 <{rcpt}>: recipient is on the suppression list ({describe(entry)});"
        f" if it should receive mail again, ask the relay's operator to run"
        f" `{removal_hint(entry)}`"
    )


#: Reasons an operator may give (the providers' own, and the default "manual").
OPERATOR_REASONS = (*SUPPRESSION_REASONS, "manual", "import")
# Labels of letters (any script: internationalised domains), digits, "-" and "_".
_DOMAIN = re.compile(r"(?=.{1,253}$)\w([\w-]*\w)?(\.\w([\w-]*\w)?)*")


def check_address(address: str) -> str:
    """The address lower-cased, or ValueError saying what is wrong with it (the rules RCPT
    TO applies: an address SMTP would refuse anyway needs no entry)."""
    address = address.strip()
    problem = mailbox_problem(address, smtputf8=True)
    if problem is Problem.NO_DOMAIN or not address:
        raise ValueError(f"{address!r} is not a full address such as user@example.com")
    if problem is not None:
        raise ValueError(f"{address!r} is not a valid email address")
    return address.lower()


def check_scope(scope: str | None) -> str:
    """A sender domain ("" or None: every sender), lower-cased, or ValueError."""
    scope = (scope or "").strip().lower()
    if scope and not _DOMAIN.fullmatch(scope):
        raise ValueError(f"{scope!r} is not a domain name such as example.com")
    return scope


def operator_entry(
    address: str,
    *,
    source: str,
    now: float,
    reason: str | None = None,
    scope: str | None = None,
    expires: str | float | None = None,
    detail: str = "",
) -> Suppression:
    """An entry an operator adds (CLI, API, page, import): every value checked, each
    ValueError saying what to give instead. `expires` is a duration from now ("30d")."""
    reason = reason or "manual"
    if reason not in OPERATOR_REASONS:
        raise ValueError(f"unknown reason {reason!r}; use one of {', '.join(OPERATOR_REASONS)}")
    until = None
    if expires not in (None, ""):
        try:
            ttl = parse_duration(expires)
        except (ValueError, OverflowError):
            raise ValueError(
                f"expires: {expires!r} is not a duration such as 30d, 12h or 3600"
            ) from None
        if not 0 < ttl <= MAX_EXPIRES:
            raise ValueError(
                "expires: give a duration above zero and at most 100 years,"
                " or none to keep it for good"
            )
        until = now + ttl
    return Suppression(
        address=check_address(address),
        scope=check_scope(scope),
        reason=reason,
        source=source,
        created=now,
        expires=until,
        detail=detail,
    )


class SuppressionList:
    """The per-process copy of the list, and the policy ([suppression]) around it."""

    def __init__(
        self,
        store: SuppressionStore,
        config: SuppressionConfig,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.poll_interval = poll_interval
        self._entries: dict[tuple[str, str], Suppression] = {}
        self._cursor = 0
        self._last_purge = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def refuses(self) -> bool:
        """Whether a suppressed recipient is refused at the door (SMTP 550, HTTP 422)
        rather than accepted and failed at dispatch."""
        return self.config.enabled and self.config.action == "refuse"

    async def start(self) -> None:
        """Load the whole list (a process must not accept mail it would refuse a moment
        later: the caller starts this before the listeners)."""
        await self.refresh()

    async def refresh(self) -> bool:
        """Apply what changed since the last look; whether anything did."""
        added, removed, cursor = await self.store.changes(self._cursor)
        if self._cursor == 0:
            self._entries.clear()
        for address, scope in removed:
            self._entries.pop((address, scope), None)
        for entry in added:
            self._entries[(entry.address, entry.scope)] = entry
        changed = bool(added or removed)
        self._cursor = cursor
        return changed

    async def run(self) -> None:
        """Follow the store until cancelled; a database that is away is waited for (the
        copy keeps answering meanwhile). Expired entries leave the copy now and then (the
        store's own are purged by the relay's maintenance: `SuppressionStore.purge`)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except StoreError as exc:
                log.warning("suppression list: cannot read the store: %s", exc)
            now = self.clock()
            if now - self._last_purge >= PURGE_INTERVAL:
                self._last_purge = now
                self._forget_expired(now)

    def _forget_expired(self, now: float) -> None:
        expired = [
            k for k, e in self._entries.items() if e.expires is not None and e.expires <= now
        ]
        for key in expired:
            del self._entries[key]

    def check(self, rcpt: str, sender: str) -> Suppression | None:
        """The entry that suppresses `rcpt` for mail from `sender`, or None."""
        if not self.config.enabled or not self._entries:
            return None
        address = rcpt.lower()
        now: float | None = None
        for scope in ("", domain_of(sender)):
            entry = self._entries.get((address, scope))
            if entry is None:
                continue
            if entry.expires is not None:
                now = self.clock() if now is None else now
                if entry.expires <= now:
                    continue
            return entry
        return None

    def suppressed(self, rcpt: str, sender: str) -> str | None:
        """Why `rcpt` must not be mailed for `sender` (the failure reason a DSN carries
        under `action = "bounce"`), or None: relay.dispatch.outbound's `Suppressed`."""
        entry = self.check(rcpt, sender)
        if entry is None:
            return None
        return f"recipient is on the suppression list ({describe(entry)})"

    def reason_applies(self, reason: str) -> bool:
        """Whether a provider event of this reason adds its recipient ([suppression] on)."""
        return self.config.enabled and reason in self.config.on

    def entry(
        self,
        reason: str,
        address: str,
        *,
        sender: str,
        source: str,
        now: float,
        detail: str = "",
    ) -> Suppression:
        """An entry with the configured scope (the sender's domain, or global) and expiry."""
        scope = domain_of(sender) if self.config.scope == "sender_domain" else ""
        ttl = self.config.expire_after.get(reason)
        return Suppression(
            address=address.lower(),
            scope=scope,
            reason=reason,
            source=source,
            created=now,
            expires=None if ttl is None else now + float(ttl),
            detail=detail,
        )

    async def add(self, entries: list[Suppression]) -> int:
        """Write through, and take effect in this process at once."""
        for e in entries:
            e.address, e.scope = e.address.lower(), e.scope.lower()
        written = await self.store.add(entries)
        for e in entries:
            self._entries[(e.address, e.scope)] = e
        return written

    async def remove(self, address: str, *, scope: str | None = None) -> int:
        """Write through, and take effect in this process at once."""
        removed = await self.store.remove(address, scope=scope)
        address = address.lower()
        for key in [k for k in self._entries if k[0] == address]:
            if scope is None or key[1] == scope.lower():
                del self._entries[key]
        return removed
