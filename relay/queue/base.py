"""The storage seam: what the relay asks of its queue, whichever engine keeps it.

Callers (the SMTP listener, dispatch, inbound, the CLI, the web side) see only `Queue`
and the storage-neutral types here and in `relay.message`. Each engine keeps the same
invariants; `relay.queue`'s docstring lists them.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.message import Claimed, EventType, Kind, NewMessage, Status


class StoreError(Exception):
    """The queue could not make a write durable (I/O error, disk full, database down)."""


class StoreFull(StoreError):
    """The queue's file system is below `server.min_free_disk`: refuse new mail for now."""


class QueueActionError(ValueError):
    """An operator action that does not apply (unknown id, wrong state): said plainly."""


@dataclass(slots=True)
class MessageRow:
    """One message as the operator surface shows it (no body)."""

    id: str
    kind: str
    state: str
    mail_from: str
    rcpts: list[str]
    size: int
    created: float
    updated: float
    next_attempt: float
    attempts: int
    last_error: str | None
    meta: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


TimelineEvent = tuple[EventType, float, dict[str, Any]]


@dataclass(slots=True)
class Round:
    """What one delivery round did to a leased unit of work, for `record_round`."""

    events: list[TimelineEvent]
    delivered: list[dict[str, Any]]
    # Recipients refused for good, this round and earlier ones (kept in meta.rcpts_failed).
    failed: dict[str, str]
    new_failures: bool
    # Retry: the recipients still to do (or the whole item) and when.
    retry: bool
    pending: tuple[str, ...] = ()
    next_attempt: float = 0.0
    reason: str = ""
    # Set when the item failed for good: what the operator reads.
    failure: str | None = None
    defer_detail: dict[str, Any] = field(default_factory=dict)
    fail_detail: dict[str, Any] = field(default_factory=dict)
    sent_detail: dict[str, Any] = field(default_factory=dict)
    # Keep the body when the message is sent (a provider that reports events may still
    # drop it, and then it is re-sent elsewhere); `Queue.drop_bodies` removes it later.
    keep_body: bool = False


def round_meta(rnd: Round, *, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a round adds to the message's meta: (keys to set, `rcpts_done` entries to merge
    into the earlier rounds' ones). `upstream`/`provider_id` say who took the message (the
    last hand-over) or, when it was not all handed over, who was tried last; inbound work
    names its destination there."""
    patch: dict[str, Any] = {}
    if rnd.new_failures:
        patch["rcpts_failed"] = rnd.failed
    handed_at: dict[str, float] = {}
    last_attempt: dict[str, Any] | None = None
    for type_, at, detail in rnd.events:
        if type_ is EventType.ATTEMPT:
            last_attempt = detail
            handed_at[_taker(detail)] = at
    done: dict[str, Any] = {}
    for d in rnd.delivered:
        taker = _taker(d)
        entry = {
            "upstream": taker,
            "provider_id": d.get("provider_id"),
            "at": handed_at.get(taker, now),
        }
        for rcpt in d.get("recipients") or ():
            done[rcpt] = entry
    if rnd.delivered and not rnd.retry:
        last = rnd.delivered[-1]
        patch["upstream"], patch["provider_id"] = _taker(last), last.get("provider_id")
    elif last_attempt is not None:
        patch["upstream"] = _taker(last_attempt)
        patch["provider_id"] = last_attempt.get("provider_id")
    return patch, done


def _taker(detail: dict[str, Any]) -> str:
    return str(detail.get("upstream") or detail.get("destination") or "")


# -- export records (the format of `Queue.export` / `import_record`) -------------------------

IMPORT_COLUMNS = (
    "id, kind, state, mail_from, rcpts, size, created, updated, next_attempt, attempts,"
    " last_error, dedupe, meta"
)


def import_values(record: dict[str, Any]) -> tuple[Any, ...]:
    """The messages row an export record becomes, in IMPORT_COLUMNS order (rcpts and meta
    as JSON text). A lease does not survive the move: leased work is due again."""
    state = Status.QUEUED.value if record["state"] == Status.SENDING else record["state"]
    return (
        record["id"],
        record["kind"],
        state,
        record["mail_from"],
        json.dumps(record["rcpts"], separators=(",", ":")),
        record["size"],
        record["created"],
        record["updated"],
        record["next_attempt"],
        record["attempts"],
        record["last_error"],
        record["dedupe"],
        json.dumps(record["meta"], separators=(",", ":")),
    )


def event_detail(event: dict[str, Any]) -> dict[str, Any]:
    """A timeline entry without its time and type: what the events table keeps as detail."""
    return {k: v for k, v in event.items() if k not in ("at", "type")}


# -- routing state shared by every process (and host) ---------------------------------------


@dataclass(slots=True)
class UpstreamShare:
    """One upstream's routing state as every process sees it.

    Times are wall-clock seconds (they cross hosts). `changed_at` orders breaker
    transitions: the newest one wins, wherever it happened.
    """

    name: str
    breaker: str = "closed"
    opened_at: float = 0.0
    cooldown: float = 0.0
    changed_at: float = 0.0
    consecutive_failures: int = 0
    health: float = 1.0
    health_stamp: float = 0.0
    latency_ewma: float | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    ambiguous: int = 0
    last_error: str | None = None
    # An operator's `relay upstream pause`: no new attempts until resumed (survives restarts).
    paused: bool = False
    # Attempts in progress, summed over the processes that reported recently (not stored
    # with the row: each process reports its own count, see `RoutingStore.sync`).
    in_flight: int = 0

    @property
    def next_probe(self) -> float | None:
        """When an open breaker lets its probe through (wall clock), else None."""
        return self.opened_at + self.cooldown if self.breaker == "open" else None


@dataclass(slots=True)
class UpstreamDelta:
    """What one process saw of an upstream since its previous sync."""

    name: str
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    ambiguous: int = 0
    # A success in this batch ends the shared run of failures; `failure_run` is the run
    # of failures at the end of the batch (after its last success, if any).
    reset_run: bool = False
    failure_run: int = 0
    health_change: float = 0.0
    latency_sum: float = 0.0
    latency_count: int = 0
    last_error: str | None = None
    # A breaker transition made here: (state, opened_at, cooldown, changed_at).
    breaker: tuple[str, float, float, float] | None = None

    @property
    def empty(self) -> bool:
        return not (self.attempts or self.breaker or self.latency_count or self.health_change)


LATENCY_ALPHA = 0.2  # EWMA weight of the newest latency sample


def merge_share(
    row: UpstreamShare, delta: UpstreamDelta, *, now: float, half_life: float
) -> UpstreamShare:
    """The rule every engine applies when a process reports a delta: counters add, the
    newer breaker transition wins, health moves by the reported change after healing."""
    row.attempts += delta.attempts
    row.successes += delta.successes
    row.failures += delta.failures
    row.ambiguous += delta.ambiguous
    if delta.reset_run:
        row.consecutive_failures = delta.failure_run
    else:
        row.consecutive_failures += delta.failure_run
    if delta.last_error is not None:
        row.last_error = delta.last_error
    if delta.latency_count:
        mean = delta.latency_sum / delta.latency_count
        row.latency_ewma = (
            mean
            if row.latency_ewma is None
            else LATENCY_ALPHA * mean + (1 - LATENCY_ALPHA) * row.latency_ewma
        )
    healed = heal(row.health, row.health_stamp, now=now, half_life=half_life)
    row.health = min(1.0, max(0.01, healed + delta.health_change))
    row.health_stamp = now
    if delta.breaker is not None and delta.breaker[3] > row.changed_at:
        row.breaker, row.opened_at, row.cooldown, row.changed_at = delta.breaker
        if row.breaker == "closed":
            row.consecutive_failures = 0
    return row


def heal(health: float, stamp: float, *, now: float, half_life: float) -> float:
    """Health recovers by itself: the missing part halves every `half_life` seconds."""
    elapsed = max(0.0, now - stamp)
    factor: float = 0.5 ** (elapsed / max(half_life, 0.001))
    return 1.0 - (1.0 - health) * factor


SHARE_COLUMNS = (
    "name, breaker, opened_at, cooldown, changed_at, consecutive_failures, health,"
    " health_stamp, latency_ewma, attempts, successes, failures, ambiguous, last_error, paused"
)


def share_values(row: UpstreamShare) -> tuple[object, ...]:
    return (
        row.name,
        row.breaker,
        row.opened_at,
        row.cooldown,
        row.changed_at,
        row.consecutive_failures,
        row.health,
        row.health_stamp,
        row.latency_ewma,
        row.attempts,
        row.successes,
        row.failures,
        row.ambiguous,
        row.last_error,
        bool(row.paused),
    )


def bucket_take(tokens: float, stamp: float, *, rate: float, now: float) -> tuple[float, float]:
    """(tokens left, wait): a token bucket of one second's burst. wait 0.0 = one taken."""
    burst = max(rate, 1.0)
    tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


UpstreamAction = Literal["reset", "pause", "resume", "probe"]

#: How the reason of a round that found no upstream to try begins (the router's `why_none`):
#: `Queue.flush(waiting_for_upstream=True)` finds those messages by it.
NO_UPSTREAM = "no upstream is available"


def apply_action(
    row: UpstreamShare, action: UpstreamAction, *, now: float, cooldown: float
) -> UpstreamShare:
    """An operator's change to one upstream's shared state. Breaker changes carry `now` as
    their time, so every process adopts them at its next sync."""
    if action == "pause":
        row.paused = True
    elif action == "resume":
        row.paused = False
    elif action == "reset":
        row.breaker, row.cooldown, row.changed_at = "closed", cooldown, now
        row.consecutive_failures, row.health, row.health_stamp = 0, 1.0, now
    elif action == "probe" and row.breaker == "open":
        # The cooldown is over now: the next attempt is the probe.
        row.opened_at, row.changed_at = now - row.cooldown, now
    return row


#: A process's report of its attempts in progress counts this long after it was made: a
#: process that died stops counting within this time.
IN_FLIGHT_TTL = 10.0
#: A process whose counts did not change reports them again this often (well within the TTL),
#: so a quiet process costs no write on most syncs.
IN_FLIGHT_HEARTBEAT = 3.0


class InFlightReports:
    """Which of this process's in-flight counts the store needs to hear now: the ones that
    changed, or all of them once the last report is getting old."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._at = float("-inf")

    def due(self, counts: dict[str, int] | None, *, now: float) -> dict[str, int]:
        if counts is None:
            return {}
        if counts == self._last and now - self._at < IN_FLIGHT_HEARTBEAT:
            return {}
        return dict(counts)

    def sent(self, counts: dict[str, int], *, now: float) -> None:
        """Called once the report is committed (a failed one is made again next time)."""
        if counts:
            self._last, self._at = counts, now


class RoutingStore(abc.ABC):
    """Breakers, health and rate budgets where every process and host reads them."""

    @abc.abstractmethod
    async def sync(
        self,
        deltas: list[UpstreamDelta],
        *,
        now: float,
        half_life: float,
        in_flight: dict[str, int] | None = None,
    ) -> dict[str, UpstreamShare]:
        """Apply this process's deltas (`merge_share`) and return every upstream's row.

        `in_flight` is this process's attempts in progress per upstream (None: a reader
        such as the CLI, which reports nothing); each row's `in_flight` is the sum over
        the processes that reported within IN_FLIGHT_TTL."""

    @abc.abstractmethod
    async def act(
        self, names: list[str], action: UpstreamAction, *, now: float, cooldown: float
    ) -> dict[str, UpstreamShare]:
        """Apply an operator's action (`apply_action`) to these upstreams; every row after."""

    @abc.abstractmethod
    async def take_token(self, name: str, *, rate: float, now: float) -> float:
        """Take one send from `name`'s shared budget of `rate` per second (burst: one
        second's worth). 0.0 when taken; otherwise how long to wait before asking again."""


# -- what the operator surface asks for ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """A search of the message list (the API's and the page's filters). Text filters are
    case-insensitive substrings; `since`/`until` bound the arrival time (epoch seconds).

    Results are newest first. `before` is the cursor: only messages older than that id
    (ids sort by arrival), so pages stay stable while new mail arrives."""

    state: str | None = None
    kind: str | None = None  # outbound, inbound, or bounce (outbound with the null sender)
    sender: str | None = None
    recipient: str | None = None  # any original recipient
    subject: str | None = None
    upstream: str | None = None  # the upstream that took it (or last tried it)
    since: float | None = None
    until: float | None = None
    before: str | None = None
    limit: int = 50


# -- the search text of a message (`messages.look` in both engines) ---------------------------
#
# Substring filters can't use a B-tree, so each message carries one short lower-case text
# with its sender, recipients and subject: a search scans that narrow column (in id order,
# through an index on (id, look) where the engine can) instead of decoding every row's JSON.
# Fields are separated by _FIELD, recipients by _ITEM (control characters, removed from the
# values), so a pattern can say in which field the text must be: exact, not a prefilter.

_FIELD, _ITEM = "\x01", "\x02"
_CONTROL = str.maketrans("", "", _FIELD + _ITEM)
SearchField = Literal["sender", "recipient", "subject"]


def look_text(mail_from: str, rcpts: list[str], subject: str | None) -> str:
    """The search text stored with a message: sender, recipients, subject, lower-cased."""
    rcpt_list = _ITEM.join(r.translate(_CONTROL) for r in rcpts)
    sender, title = mail_from.translate(_CONTROL), (subject or "").translate(_CONTROL)
    return f"{sender}{_FIELD}{rcpt_list}{_FIELD}{title}".lower()


def look_pattern(where: SearchField, text: str) -> str:
    """A LIKE pattern (escape character `\\`) that finds `text` in one field of `look_text`:
    the only _FIELD separators around the match are the ones that delimit that field."""
    escaped = text.translate(_CONTROL).lower()
    escaped = escaped.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if where == "sender":
        return f"%{escaped}%{_FIELD}%{_FIELD}%"
    if where == "recipient":
        return f"%{_FIELD}%{escaped}%{_FIELD}%"
    return f"%{_FIELD}%{_FIELD}%{escaped}%"


def look_filters(query: MessageQuery) -> list[str]:
    """The LIKE patterns on `look` that a query's sender/recipient/subject filters need."""
    wanted: list[tuple[SearchField, str | None]] = [
        ("sender", query.sender),
        ("recipient", query.recipient),
        ("subject", query.subject),
    ]
    return [look_pattern(where, text) for where, text in wanted if text]


SEARCH_KINDS = ("outbound", "inbound", "bounce")


def kind_conditions(kind: str) -> list[tuple[str, str]]:
    """The column tests a search's `kind` stands for, as (SQL with one ?, value): a bounce
    is the relay's own outbound mail with the null sender (RFC 3464), not a kind of work."""
    if kind == "bounce":
        return [("kind = ?", "outbound"), ("mail_from = ?", "")]
    return [("kind = ?", kind)]


@dataclass(slots=True)
class StatPoint:
    """One cell of the per-minute rollups every process adds to (`StatsStore`).

    `series` and `label` say what is counted ("attempt", "ses:accepted"); `bucket` is a
    histogram bucket index, or a negative code the writer defines (count, sum). Values
    add up across processes and hosts."""

    minute: int  # epoch seconds // 60
    series: str
    label: str
    bucket: int
    value: float


def minute_range(since: float, until: float) -> tuple[int, int]:
    """[first, end) of the minutes that start in [since, until): adjacent windows share no
    minute, and a window ending now includes the minute in progress."""
    return -int(-since // 60), -int(-until // 60)


class StatsStore(abc.ABC):
    """Counters and histograms per minute, where every process and host adds and reads:
    what the stats API, the overview's charts and percentiles are computed from."""

    @abc.abstractmethod
    async def add(self, points: list[StatPoint]) -> None:
        """Add each point's value to its cell (created at 0 when new), in one transaction."""

    @abc.abstractmethod
    async def read(
        self, *, since: float, until: float, series: tuple[str, ...] = ()
    ) -> list[StatPoint]:
        """The cells of the minutes that start in [since, until) (`minute_range`; all
        series when `series` is empty)."""

    @abc.abstractmethod
    async def purge(self, *, older_than: float) -> int:
        """Forget minutes before `older_than`; how many cells went."""


# -- provider events (relay.events) ---------------------------------------------------------


def provider_keys(provider_id: str | None) -> list[str]:
    """The lookup keys of an upstream's message id as stored in meta (SES may join several
    with commas; Mailgun wraps its id in <>, its events do not): what `find_by_provider_id`
    is given and what the engines index at hand-over."""
    if not provider_id:
        return []
    keys = (part.strip().strip("<>").strip() for part in provider_id.split(","))
    return [k for k in keys if k]


#: A recipient's state after hand-over (`meta.rcpts_status[rcpt]["status"]`), by how much it
#: says: a later event of a lower rank does not undo a higher one (a "delivered" that
#: arrives after the "bounced" of an asynchronous bounce keeps "bounced").
STATUS_RANK = {
    "requeued": 0,
    "delayed": 1,
    "delivered": 2,
    "unsubscribed": 3,
    "bounced": 4,
    "dropped": 4,
    "rejected": 4,
    "complained": 5,
}


def status_after(current: str | None, new: str) -> str:
    """A recipient's status once `new` is reported: "requeued" always applies (a new
    hand-over starts over), otherwise the higher rank wins."""
    if new == "requeued" or current is None:
        return new
    return new if STATUS_RANK.get(new, 0) >= STATUS_RANK.get(current, 0) else current


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One normalised provider event for a message's timeline (`Queue.record_delivery`).

    `key` is stable across the provider's retries of the same event (its event id), so a
    duplicate adds nothing. `type` is the timeline type (EventType.DELIVERED, ...);
    `detail` holds recipient, upstream, provider_id, event, bounce, reason."""

    key: str
    msg_id: str
    rcpt: str
    type: EventType
    at: float
    detail: dict[str, Any]
    # The recipient's new status (STATUS_RANK), or None to leave it (processed).
    status: str | None = None


class QueueBusy(StoreError):
    """The message is leased by a dispatcher right now: ask again shortly (503)."""


@dataclass(slots=True)
class Suppression:
    """An address the relay will not mail (`scope` "": for every sender, else only for
    senders of that domain). Addresses and scopes are stored lower-cased."""

    address: str
    scope: str
    reason: str  # hard_bounce, complaint, unsubscribe, manual, import
    source: str  # the event key, "cli:<user>", "web:<token>", "import:<file>"
    created: float
    expires: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @property
    def cursor(self) -> str:
        """Where a page of `SuppressionStore.list` ends: "address/scope" (a domain has no
        "/", so the last one splits it), as one address may be listed in several scopes."""
        return f"{self.address}/{self.scope}"


def split_suppression_cursor(after: str) -> tuple[str, str | None]:
    """(address, scope) of a `Suppression.cursor`; scope None for a bare address (the page
    then starts after every scope of it)."""
    address, slash, scope = after.rpartition("/")
    if not slash or "@" in scope:
        return after.lower(), None
    return address.lower(), scope.lower()


class SuppressionStore(abc.ABC):
    """The suppression list, where every process and host reads it. Processes keep a copy
    in memory (relay.suppression) and follow `changes` to stay current."""

    @abc.abstractmethod
    async def add(self, entries: list[Suppression]) -> int:
        """Insert or replace each (address, scope) entry (a new event renews an old one);
        how many were written."""

    @abc.abstractmethod
    async def remove(self, address: str, *, scope: str | None = None) -> int:
        """Forget an address (in one scope, or every scope when None); how many went."""

    @abc.abstractmethod
    async def changes(self, after: int) -> tuple[list[Suppression], list[tuple[str, str]], int]:
        """What changed since cursor `after` (0: everything current): (entries added or
        replaced, (address, scope) pairs removed, the new cursor)."""

    @abc.abstractmethod
    async def list(
        self, *, contains: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[Suppression]:
        """Entries in address order, those whose address contains `contains`, after the
        address `after` (the cursor)."""

    @abc.abstractmethod
    async def purge(self, *, now: float) -> int:
        """Forget expired entries (and removal records old enough that no process can still
        be behind them); how many went."""


@dataclass(slots=True)
class OutboxEntry:
    """One signed event on its way to an application's webhook (relay.events.outbox)."""

    seq: int
    hook: str
    key: str
    msg_id: str
    body: bytes
    created: float
    attempts: int
    next_attempt: float
    last_error: str | None = None


class WebhookOutbox(abc.ABC):
    """Events due to the applications' webhooks, durable (a webhook due when the relay
    crashes is still sent) and in order per message: only the oldest undelivered entry of
    each (hook, message) can be claimed."""

    @abc.abstractmethod
    async def add(self, entries: list[tuple[str, str, str, bytes]], *, now: float) -> int:
        """(hook, key, msg_id, body) entries, due now; an entry whose (hook, key) is here
        already is skipped (a repeated event). How many were added."""

    @abc.abstractmethod
    async def claim(
        self, *, now: float, owner: str, lease_time: float, limit: int
    ) -> list[OutboxEntry]:
        """Lease up to `limit` due entries, each the oldest live one of its (hook, msg_id)."""

    @abc.abstractmethod
    async def done(self, seq: int, *, owner: str) -> None:
        """Delivered (only while this owner's lease holds): kept as `sent`, without its
        body, until `purge`, so the same event published again (a provider's retried
        webhook, whose effects run again) is not posted to the application a second time."""

    @abc.abstractmethod
    async def retry(self, seq: int, *, owner: str, next_attempt: float, error: str) -> None:
        """Not delivered: due again at `next_attempt`, the lease given back."""

    @abc.abstractmethod
    async def give_up(self, seq: int, *, owner: str, error: str) -> None:
        """Dead: kept for the operator, no longer blocks the later events of its message."""

    @abc.abstractmethod
    async def pending(self) -> dict[str, dict[str, int]]:
        """Per hook: {"waiting": n, "dead": n}."""

    @abc.abstractmethod
    async def next_due(self) -> float | None:
        """When the earliest waiting entry is due (None: nothing waits)."""

    @abc.abstractmethod
    async def purge(self, *, older_than: float) -> int:
        """Forget dead and sent entries created before `older_than`; how many went."""


# -- the queue --------------------------------------------------------------------------------

WorkListener = Callable[[Kind], None]


class Queue(abc.ABC):
    """The relay's one durable queue: outbound messages and inbound notifications.

    `owner` names this process in leases (host:pid:start time). Every method that changes
    state writes its timeline event in the same transaction.
    """

    owner: str
    #: A short name for logs and /readyz ("sqlite:var/queue", "postgresql://host/db").
    describe: str

    def __init__(self) -> None:
        self._listeners: list[WorkListener] = []

    # -- lifecycle

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the store for operator use only (the CLI): no dispatching, no schema
        changes. Reading, operator actions, export and import work after this."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the store to serve: create or check its schema, start writers and the
        work announcements."""

    @abc.abstractmethod
    async def check(self) -> str:
        """Can the relay use this store as it is? A line for `relay check-config`, or
        StoreError saying what is wrong and what to run."""

    @abc.abstractmethod
    async def migrate(self) -> str:
        """Create or upgrade the schema; says what it did."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def check_accepting(self) -> None:
        """Raise StoreFull/StoreError at once when new work cannot be made durable now
        (disk nearly full, database known to be down), before a client sends a body."""

    @abc.abstractmethod
    async def problems(self) -> list[str]:
        """What keeps this queue from taking work right now (for /readyz); [] when ready."""

    # -- work arriving

    def on_work(self, listener: WorkListener) -> None:
        """Call `listener(kind)` when work of that kind may have become due: inserted or
        made due by an operator in this process, and, where the engine can tell, in any
        other process or host."""
        self._listeners.append(listener)

    def _work_arrived(self, kind: Kind) -> None:
        for listener in self._listeners:
            listener(kind)

    def _wake_all(self) -> None:
        """After an operator action that may have made work of any kind due."""
        for kind in Kind:
            self._work_arrived(kind)

    # -- the delivery path

    @abc.abstractmethod
    async def insert(self, msg: NewMessage) -> bool:
        """Store a new message and its `received` event durably before returning.
        False when `msg.dedupe` was recorded before (nothing is written)."""

    @abc.abstractmethod
    async def claim(
        self, kind: Kind, *, now: float, lease_time: float, limit: int
    ) -> list[Claimed]:
        """Lease up to `limit` due units of work of `kind`, oldest due first."""

    @abc.abstractmethod
    async def record_round(self, item: Claimed, *, now: float, rounds: int, rnd: Round) -> bool:
        """The round's events and the item's new state, in one transaction. False when the
        lease was lost meanwhile (recovered elsewhere, or an operator acted): nothing written."""

    @abc.abstractmethod
    async def add_event(
        self, msg_id: str, type_: EventType, at: float, detail: dict[str, Any]
    ) -> None: ...

    @abc.abstractmethod
    async def recover(self, *, now: float, alive: Callable[[str], bool]) -> list[str]:
        """Make work leased by dead processes due again (expired lease, or `alive(owner)`
        false). Returns the ids."""

    @abc.abstractmethod
    async def next_due(self, kind: Kind) -> float | None: ...

    @abc.abstractmethod
    async def purge_history(self, *, state: Status, older_than: float) -> int:
        """Forget messages (and their timelines) that ended in `state` (sent, failed)
        before `older_than`, with their bodies (a sent one's is gone already, or kept a
        while for the provider's events) and provider ids."""

    # -- reading, for the operator surface

    @abc.abstractmethod
    async def get(self, msg_id: str) -> MessageRow | None: ...

    @abc.abstractmethod
    async def timeline(self, msg_id: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def body(self, msg_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def search(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 1000
    ) -> list[MessageRow]:
        """Messages in id (arrival) order."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Messages per state, over the whole queue."""

    @abc.abstractmethod
    async def find(self, query: MessageQuery) -> list[MessageRow]:
        """Up to `query.limit` messages matching it, newest first (see MessageQuery)."""

    @abc.abstractmethod
    async def oldest(self, *, states: tuple[str, ...]) -> float | None:
        """The arrival time of the oldest message in one of `states` (None: there is none)."""

    @abc.abstractmethod
    async def dedupe_owner(self, dedupe: str, *, since: float) -> str | None:
        """The id of the message stored under `dedupe` at or after `since`. A message that
        took the key before `since` lets go of it (so the key can be used again)."""

    # -- operator actions (postsuper / postqueue equivalents); `relay.queue.admin` wraps them

    @abc.abstractmethod
    async def hold(self, msg_id: str, *, now: float, actor: str) -> None: ...

    @abc.abstractmethod
    async def release(self, msg_id: str, *, now: float, actor: str) -> None: ...

    @abc.abstractmethod
    async def retry(self, msg_id: str, *, now: float, actor: str) -> None: ...

    @abc.abstractmethod
    async def retry_failed(self, *, now: float, actor: str) -> list[str]: ...

    @abc.abstractmethod
    async def delete(self, msg_id: str, *, actor: str) -> None: ...

    @abc.abstractmethod
    async def flush(
        self, *, now: float, actor: str, waiting_for_upstream: bool = False
    ) -> list[str]:
        """Deferred messages due now (postqueue -f). `waiting_for_upstream`: only those
        deferred without an attempt because no upstream could be tried (their last error
        starts with NO_UPSTREAM): an upstream is back."""

    # -- shared routing state

    @property
    @abc.abstractmethod
    def routing(self) -> RoutingStore: ...

    @property
    @abc.abstractmethod
    def stats(self) -> StatsStore: ...

    # -- provider events (relay.events)

    @abc.abstractmethod
    async def find_by_provider_id(self, provider_id: str) -> str | None:
        """The message an upstream's id belongs to (`provider_keys` of the ids stored at
        hand-over, in meta.provider_id and meta.rcpts_done), or None."""

    @abc.abstractmethod
    async def record_delivery(self, rec: DeliveryRecord) -> bool:
        """Append `rec` to its message's timeline and, when `rec.status` is set, make
        meta.rcpts_status[rec.rcpt] = {"status": status_after(old, new), "at", "upstream"},
        in one transaction. False when `rec.key` was recorded before (nothing written).
        QueueActionError when the message is not in the queue."""

    @abc.abstractmethod
    async def requeue(
        self, msg_id: str, rcpts: list[str], *, exclude: str, now: float, reason: str, key: str
    ) -> bool:
        """Put recipients a provider dropped back in the queue for another upstream: the
        message (sent, or still waiting for others) becomes due now with `rcpts` added to
        those to do, `exclude` added to meta.excluded_upstreams (never tried again for this
        message), rcpts_status "requeued", and a `requeued` event {recipients, upstream,
        reason}. False when `key` was used before (nothing written). QueueBusy while a
        dispatcher holds it; QueueActionError when the body is gone or the message is not
        here. Wakes the outbound work listeners."""

    @abc.abstractmethod
    async def drop_bodies(self, *, sent_before: float) -> int:
        """Drop the kept bodies (Round.keep_body) of messages sent before `sent_before`."""

    @abc.abstractmethod
    async def first_use(self, key: str, *, now: float, expires: float) -> bool:
        """True the first time `key` is seen (remembered until `expires`, wall clock), on
        every process and host: a webhook's replay guard (Mailgun's token)."""

    @abc.abstractmethod
    async def forget_use(self, key: str) -> None:
        """Forget a `first_use` key: its request's events could not be recorded, so the
        provider's retry of that same signed request must be taken, not refused."""

    @property
    @abc.abstractmethod
    def suppressions(self) -> SuppressionStore: ...

    @property
    @abc.abstractmethod
    def outbox(self) -> WebhookOutbox: ...

    # -- moving a queue between engines

    @abc.abstractmethod
    def export(self) -> AsyncIterator[dict[str, Any]]:
        """Every message with its state, body and timeline, as JSON-ready records."""

    @abc.abstractmethod
    async def import_record(self, record: dict[str, Any]) -> bool:
        """Store one record of `export` as it was (state, lease cleared). False when a
        message with that id is already here."""
