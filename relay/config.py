"""config.toml → frozen dataclasses, with errors that name the key and say what is wrong.

One generic converter (`build`) walks a dataclass's type hints, so every section, including
each upstream type's own settings, is validated the same way: unknown keys, wrong types,
bad sizes, durations and addresses are all reported as `ConfigError("smtp.listen[0].tls:
...")`. Secrets are never literal in the file: `env:NAME` and `file:PATH` are resolved here.

This module is data only: it imports no relay package, because the packages it configures
import it. The sections those packages define (each upstream type's `Settings`, the DKIM
keys, `[inbound]`) are kept raw here and checked by `relay.checks.check()`, which every
caller that loads a config for use runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator: `key: what is wrong`."""


# -- value types -------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Size(int):
    """A byte count written as 25MB, 512KiB or a plain integer."""


class Duration(float):
    """Seconds written as 30s, 2m, 1h, 3d, 250ms or a plain number."""


class Secret(str):
    """A value given as `env:NAME`, `file:PATH`, or literally (discouraged, but allowed for
    non-production files such as test configs)."""


class Address(str):
    """host:port, validated at load time so a typo fails `check-config`, not startup."""

    @property
    def host(self) -> str:
        return self.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.rpartition(":")[2])


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).upper() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    raise ValueError(f"expected a size such as 25MB or 512KiB, got {value!r}")


def parse_duration(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"expected a duration such as 30s, 2m, 1h or 3d, got {value!r}")


def parse_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:2525, got {value!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    looks_numeric = all(c.isdigit() or c == "." for c in bare) or ":" in bare
    if looks_numeric:
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            raise ValueError(f"{host} is not an IP address (in {value!r})") from None
    elif not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", bare):
        raise ValueError(f"{host!r} is neither an IP address nor a host name (in {value!r})")
    return value


def resolve_secret(value: str, *, base_dir: Path | None = None) -> str:
    """`env:NAME` → the variable, `file:PATH` → the file's text (stripped); else as is."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = Path(value[5:])
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return value


# -- generic dataclass builder -------------------------------------------------------------

_base_dir_for_secrets: Path | None = None
# False for commands that don't use secrets (`relay queue list` in a shell without the
# providers' environment): Secret values are then kept as written, unresolved.
_resolve_secrets = True
# Problems found while building, all reported at once; and warnings check-config prints.
_errors: list[str] = []
_warnings: list[str] = []


class _Invalid(Exception):
    """A table had errors (already collected): its parent cannot be built either."""


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(prefix: str, name: str, known: list[str]) -> str:
    return (
        f"{prefix}{name}: unknown key{_suggest(name, known)} "
        f"(known keys: {', '.join(sorted(known))})"
    )


def _secret(value: str, key: str) -> Secret:
    if not _resolve_secrets:
        return Secret(value)
    if value and not value.startswith(("env:", "file:")) and _looks_secret(key, value):
        _warnings.append(
            f"{key}: a literal secret in the config file; write env:NAME or file:PATH"
            " so it stays out of backups and version control"
        )
    return Secret(resolve_secret(value, base_dir=_base_dir_for_secrets))


def take_warnings() -> tuple[str, ...]:
    """The warnings of the builds since the last call (a section checked later, by
    `relay.checks`, adds its own)."""
    found = tuple(_warnings)
    _warnings.clear()
    return found


def _looks_secret(key: str, value: str) -> bool:
    """Secret-typed keys hold secrets, except a queue location without a password in it."""
    if key == "server.queue":
        userinfo = value.partition("://")[2].rpartition("@")[0]
        return ":" in userinfo
    return True


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp)
        items, failed = [], False
        for i, v in enumerate(value):
            try:
                items.append(_convert(item_tp, v, f"{key}[{i}]"))
            except _Invalid:
                failed = True  # recorded; go on to find the other items' problems too
        if failed:
            raise _Invalid
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {k: _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    try:
        if tp is Size:
            return Size(parse_size(value))
        if tp is Duration:
            return Duration(parse_duration(value))
        if tp is Address:
            return Address(parse_address(value))
        if tp is TokenSecret:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            if not value.startswith(("env:", "file:")):
                raise ValueError(
                    "write env:NAME or file:PATH (tokens are never written in the file)"
                )
            return TokenSecret(_secret(value, key))
        if tp is Secret:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return _secret(value, key)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type[Any], tp), value, key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if isinstance(tp, type) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type[T], data: Any, key: str = "", *, also_known: frozenset[str] = frozenset()) -> T:
    """Make `cls` from a TOML table, rejecting unknown keys and missing required ones.

    Every problem is reported, not just the first: used on its own, `build` raises one
    ConfigError listing them all. `also_known` names keys that a caller handles itself
    (an upstream's common keys), for the "did you mean" of a typo.
    """
    outermost = not _building
    _building.append(cls)
    if outermost:
        _errors.clear()
    try:
        return _build(cls, data, key, also_known)
    except _Invalid:
        if not outermost:
            raise
        raise ConfigError(summary(_errors)) from None
    finally:
        _building.pop()


_building: list[type[Any]] = []


def summary(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} problems:\n  " + "\n  ".join(errors)


def _build(cls: type[T], data: Any, key: str, also_known: frozenset[str]) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in getattr(cls, "internal_fields", ())
    }
    prefix = f"{key}." if key else ""
    before = len(_errors)
    for name in data:
        if name not in fields:
            _errors.append(unknown_key(prefix, name, [*fields, *also_known]))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _convert(hints[name], data[name], prefix + name)
            except ConfigError as exc:
                _errors.append(str(exc))
            except _Invalid:
                pass  # its own problems are recorded already
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _errors.append(f"{prefix}{name}: required key is missing")
    if len(_errors) > before:
        raise _Invalid
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            _errors.append(f"{key or 'config'}: {exc}")
            raise _Invalid from None
    return obj


# -- the sections ----------------------------------------------------------------------------

TLSMode = Literal["none", "starttls", "implicit"]
AuthMode = Literal["required", "optional", "none"]
TLSVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
BareLF = Literal["reject", "normalize"]


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "relay.localdomain"
    # A directory (SQLite, one host) or a PostgreSQL DSN (a cluster); env:/file: allowed.
    queue: Secret = Secret("var/queue")
    # This relay's name in leases; default the host name. Give each host of a cluster its
    # own when they may share one (containers).
    node: str = ""
    # PostgreSQL: create or upgrade the schema at start (else `relay queue migrate`).
    auto_migrate: bool = True
    # PostgreSQL: connections per relay process.
    queue_pool_size: int = 4
    # Refuse new mail (452 4.3.1) when the queue's file system has less than this free.
    min_free_disk: Size = Size(100 * 1000**2)
    # How long a dispatcher may hold a message before another process may take it.
    lease_time: Duration = Duration(300.0)
    # How long finished messages stay in the queue (their record and timeline) for
    # `relay queue show` and search. A sent message's body is dropped as soon as it is sent.
    keep_sent: Duration = Duration(7 * 86400.0)
    keep_failed: Duration = Duration(30 * 86400.0)
    # Relay processes sharing the SMTP port (SO_REUSEPORT), each with its own queue shard;
    # 0 = one per CPU this process may use (relay.cpus: affinity, cgroup quota). One Python
    # process uses one core; this is how the relay uses all.
    workers: int = 0
    # At SIGTERM: how long open SMTP sessions may finish their transaction, and deliveries
    # in flight their attempt, before the rest get 421 4.3.2 (relay.smtp.drain).
    shutdown_grace: Duration = Duration(30.0)

    def validate(self) -> None:
        if not 0 <= self.workers <= 64:
            raise ValueError("workers must be between 0 (one per CPU) and 64")
        if not 0 <= self.shutdown_grace <= 3600:
            raise ValueError("shutdown_grace must be between 0s and 1h (for example 30s)")
        if not 1 <= self.queue_pool_size <= 100:
            raise ValueError("queue_pool_size must be between 1 and 100")


@dataclass(frozen=True)
class ListenConfig:
    address: Address
    tls: TLSMode = "starttls"
    auth: AuthMode = "optional"
    # AUTH over cleartext exposes passwords; only a listener that says so allows it.
    auth_require_tls: bool = True
    # Pending connections the kernel queues for this listener (capped by the system's
    # net.core.somaxconn). asyncio's default of 100 overflows in a burst of connects.
    backlog: int = 1024
    # A line ending in a bare LF: "normalize" (made CRLF, as Postfix 3.9 does) or
    # "reject" (550 5.6.11). Either way only <CR><LF>.<CR><LF> ends DATA, and a bare CR
    # is always refused.
    bare_lf: BareLF = "normalize"
    # Clients whose bare LFs are normalised even when bare_lf = "reject"; unset: the
    # trusted networks.
    bare_lf_exempt: tuple[str, ...] | None = None

    def validate(self) -> None:
        if not 1 <= self.backlog <= 65535:
            raise ValueError("backlog must be between 1 and 65535")
        self.check_networks("bare_lf_exempt", self.bare_lf_exempt or ())

    @staticmethod
    def check_networks(key: str, networks: tuple[str, ...]) -> None:
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{key}: {net!r} is not a network such as 10.0.0.0/8") from None


def check_tls_pair(cert: str, key: str) -> None:
    """A listener's certificate and key: both PEM files that exist, or neither."""
    if bool(cert) != bool(key):
        raise ValueError("tls_cert and tls_key must be given together")
    for path in (cert, key):
        if path and not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist")


def check_sender_patterns(owner: str, patterns: tuple[str, ...]) -> None:
    """An allowed_senders list names addresses or `*@domain`; `<>` is the null sender."""
    for pattern in patterns:
        if pattern not in ("*", "<>") and "@" not in pattern:
            raise ValueError(
                f"{owner}: allowed_senders pattern {pattern!r} has no @"
                f" (for a domain write '*@{pattern.lstrip('*@.')}')"
            )


@dataclass(frozen=True)
class UserConfig:
    name: str
    password_hash: str
    allowed_senders: tuple[str, ...] = ("*",)

    def validate(self) -> None:
        parts = self.password_hash.split("$")
        if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
            raise ValueError(
                f"user {self.name!r}: password_hash must come from `relay user add`"
                " (scrypt$N$r$p$salt$hash)"
            )
        check_sender_patterns(f"user {self.name!r}", self.allowed_senders)


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[ListenConfig, ...] = (ListenConfig(Address("127.0.0.1:2525")),)
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size: Size = Size(25 * 1000**2)
    max_recipients: int = 100
    tls_min_version: TLSVersion = "TLSv1.2"
    tls_cert: str = ""  # PEM; empty: a self-signed one under var/tls/ is made
    tls_key: str = ""
    users: tuple[UserConfig, ...] = ()
    # Failed AUTH attempts one session may make before it is disconnected.
    max_auth_failures: int = 3
    timeout: Duration = Duration(300.0)
    # Sessions this process serves at once, in total and per client address; past them a
    # new connection gets 421 4.7.0 and is closed.
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    # DATA beyond this size goes to an unlinked temporary file (in the queue directory,
    # or the system's temporary directory with a PostgreSQL queue) instead of memory.
    data_spool_threshold: Size = Size(256 * 1024)

    def validate(self) -> None:
        ListenConfig.check_networks("trusted_networks", self.trusted_networks)
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ValueError("max_connections and max_connections_per_ip must be at least 1")
        check_tls_pair(self.tls_cert, self.tls_key)


@dataclass(frozen=True)
class RetryConfig:
    schedule: tuple[Duration, ...] = tuple(
        Duration(parse_duration(s)) for s in ("30s", "2m", "10m", "30m", "1h", "2h")
    )
    max_age: Duration = Duration(3 * 86400.0)
    concurrency: int = 32
    # Send RFC 3464 bounces to the sender when a message fails for good.
    bounces: bool = True

    def validate(self) -> None:
        if not self.schedule:
            raise ValueError("retry.schedule must list at least one delay")
        if self.concurrency < 1:
            raise ValueError("retry.concurrency must be at least 1")


@dataclass(frozen=True)
class RoutingConfig:
    """Breaker and health tuning; the defaults suit providers that fail for minutes."""

    failures_to_open: int = 5  # consecutive failures that open an upstream's breaker
    cooldown: Duration = Duration(10.0)  # first open period; doubles on each failed probe
    cooldown_max: Duration = Duration(300.0)
    health_half_life: Duration = Duration(60.0)  # how fast a failed upstream's score heals


@dataclass(frozen=True)
class UpstreamConfig:
    """Settings every upstream has; the type's own keys are checked by its Settings class."""

    name: str
    type: str
    priority: int = 1
    weight: int = 1
    max_rate: float = 0.0  # messages per second; 0 = unlimited
    max_concurrency: int = 16
    timeout: Duration = Duration(30.0)
    # The provider's event webhooks (delivered, bounced, complained...) are taken at
    # POST /webhooks/<name>; `webhook` holds the provider's verification settings, checked
    # by relay.events (its Settings per upstream type).
    events: bool = False
    webhook: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


COMMON_UPSTREAM_KEYS = {f.name for f in dataclasses.fields(UpstreamConfig)} - {"options"}


@dataclass(frozen=True)
class DKIMConfig:
    domain: str
    selector: str
    private_key: Secret


SuppressionReason = Literal["hard_bounce", "complaint", "unsubscribe"]
SUPPRESSION_REASONS: tuple[SuppressionReason, ...] = typing.get_args(SuppressionReason)


@dataclass(frozen=True)
class SuppressionConfig:
    """Addresses that must not be mailed again (hard bounces, complaints): every
    provider punishes senders who keep mailing them."""

    enabled: bool = True
    # Which provider events add the address (manual adds and imports always work).
    on: tuple[SuppressionReason, ...] = ("hard_bounce", "complaint")
    # How long an entry lasts, per reason ("30d"); a reason not listed never expires.
    expire_after: dict[str, Duration] = field(default_factory=dict)
    # "global": the address is suppressed for every sender; "sender_domain": only for
    # mail from the domain whose message bounced (or was complained about).
    scope: Literal["global", "sender_domain"] = "global"
    # "refuse": 550 at RCPT TO (and 422 from the HTTP API); "bounce": accept, then fail
    # the recipient at dispatch with a DSN to the sender.
    action: Literal["refuse", "bounce"] = "refuse"

    def validate(self) -> None:
        for reason in self.expire_after:
            if reason not in SUPPRESSION_REASONS:
                known = ", ".join(SUPPRESSION_REASONS)
                raise ValueError(f"suppression.expire_after: unknown reason {reason!r} ({known})")


LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class LogConfig:
    """The relay's log on stderr (relay.logs): `text` lines for a terminal, or `json`, one
    object per line with each message event's fields, for a log stack. `relay serve
    --log-level` overrides `level`."""

    format: LogFormat = "text"
    level: LogLevel = "info"


@dataclass(frozen=True)
class EventsConfig:
    """What the relay does with the providers' events (relay.events)."""

    # A provider-side drop (not the recipient's fault) re-sends the recipient through
    # another upstream; for that, a handed-over message's body is kept this long.
    requeue: bool = True
    keep_body: Duration = Duration(2 * 3600.0)
    # A hard bounce after hand-over sends the sender an RFC 3464 report.
    bounce_reports: bool = True
    # The largest webhook body taken (providers batch events).
    max_body: Size = Size(10 * 1000**2)
    # Webhook requests worked on at once by the web server's process; more wait their
    # turn (the provider's connection stays open). Events are bookkeeping: a flood of them
    # must not take the CPU that mail intake needs.
    concurrency: int = 2

    def validate(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise ValueError("events.concurrency must be between 1 and 256")


WEBHOOK_EVENTS = (
    "sent",
    "failed",
    "delivered",
    "deferred",
    "bounced",
    "complained",
    "dropped",
    "rejected",
    "unsubscribed",
    "requeued",
)


@dataclass(frozen=True)
class WebhookConfig:
    """An application's URL the relay POSTs each message event to, signed (relay.events.
    outbox): what Postal's MessageSent/MessageDeliveryFailed/MessageBounced give apps."""

    url: str
    secret: TokenSecret
    name: str = ""  # default: the URL's host
    events: tuple[str, ...] = WEBHOOK_EVENTS
    timeout: Duration = Duration(10.0)
    # Give up on an event after this long (then it stays, dead, for the operator).
    max_age: Duration = Duration(3 * 86400.0)

    def validate(self) -> None:
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(f"webhook url {self.url!r} must be http:// or https://")
        for event in self.events:
            if event not in WEBHOOK_EVENTS:
                known = ", ".join(WEBHOOK_EVENTS)
                raise ValueError(f"webhook events: unknown event {event!r} (known: {known})")

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).hostname or self.url


TokenRole = Literal["read", "submit", "admin"]
MetricsAccess = Literal["loopback", "token", "open"]


class TokenSecret(Secret):
    """A secret that must come from `env:` or `file:` (an API token, never in the file)."""


@dataclass(frozen=True)
class WebToken:
    """A bearer token for the page and the API. `read`: the page and GET API; `submit`:
    POST messages only; `admin`: everything."""

    name: str
    token: TokenSecret
    role: TokenRole = "read"
    # For `submit` and `admin` tokens: the senders messages sent with this token may use.
    allowed_senders: tuple[str, ...] = ("*",)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", self.name):
            raise ValueError(
                f"token name {self.name!r}: use letters, digits, '_', '.', '@', '-' (at most 64)"
            )
        unresolved = self.token.startswith(("env:", "file:"))  # commands without secrets
        if not unresolved and len(self.token) < 16:
            raise ValueError(
                f"token {self.name!r}: the token is shorter than 16 characters; make one"
                " with `relay token new`"
            )
        check_sender_patterns(f"token {self.name!r}", self.allowed_senders)


@dataclass(frozen=True)
class WebConfig:
    listen: Address = Address("127.0.0.1:8025")
    tokens: tuple[WebToken, ...] = ()
    # HTTPS on the web listener: both PEM files, or neither (plain HTTP).
    tls_cert: str = ""
    tls_key: str = ""
    # Who may read /metrics: loopback clients only without a token (the default), a
    # `read` token from anywhere (`token`), or anyone (`open`).
    metrics: MetricsAccess = "loopback"
    # A listener on a non-loopback address with no token refuses to start unless this is
    # set: the page and API are then closed to everyone, which must be a choice.
    allow_no_tokens: bool = False
    # How long a page login lasts.
    session_lifetime: Duration = Duration(12 * 3600.0)

    def validate(self) -> None:
        names = [t.name for t in self.tokens]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"tokens: the name {name!r} is used twice")
        secrets = [t.token for t in self.tokens]
        if len(set(secrets)) != len(secrets):
            raise ValueError("tokens: two entries have the same token; give each its own")
        check_tls_pair(self.tls_cert, self.tls_key)

    @property
    def loopback_only(self) -> bool:
        host = self.listen.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    smtp: SMTPConfig = SMTPConfig()
    retry: RetryConfig = RetryConfig()
    routing: RoutingConfig = RoutingConfig()
    upstream: tuple[UpstreamConfig, ...] = ()
    dkim: tuple[DKIMConfig, ...] = ()
    web: WebConfig = WebConfig()
    inbound: dict[str, Any] = field(default_factory=dict)
    suppression: SuppressionConfig = SuppressionConfig()
    events: EventsConfig = EventsConfig()
    webhook: tuple[WebhookConfig, ...] = ()
    log: LogConfig = LogConfig()
    # Filled in by the loader, never from the file:
    path: Path = Path("config.toml")
    warnings: tuple[str, ...] = ()  # what check-config prints and serve logs
    internal_fields: ClassVar[frozenset[str]] = frozenset({"path", "warnings"})

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str | Path) -> Path:
        """Paths in the file are relative to the file, not to the working directory."""
        p = Path(relative)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def queue_dir(self) -> Path:
        return self.resolve(self.server.queue)


def _split_upstreams(raw: Any) -> Any:
    """Move each upstream's type-specific keys under `options` for the common builder."""
    if not isinstance(raw, list):
        return raw
    out = []
    for item in raw:
        if isinstance(item, dict):
            common = {k: v for k, v in item.items() if k in COMMON_UPSTREAM_KEYS}
            common["options"] = {k: v for k, v in item.items() if k not in COMMON_UPSTREAM_KEYS}
            out.append(common)
        else:
            out.append(item)
    return out


def parse(data: dict[str, Any], path: Path, *, secrets: bool = True) -> Config:
    """The file's tables as a Config; see `relay.checks` for the sections not checked here.

    `secrets=False` leaves `env:`/`file:` values unresolved (commands that use none)."""
    global _base_dir_for_secrets, _resolve_secrets
    data = dict(data)
    if "upstream" in data:
        data["upstream"] = _split_upstreams(data["upstream"])
    _base_dir_for_secrets, _resolve_secrets = path.parent, secrets
    _warnings.clear()
    try:
        cfg = build(Config, data)
    finally:
        _base_dir_for_secrets, _resolve_secrets = None, True
    cfg = dataclasses.replace(cfg, path=path, warnings=take_warnings())
    for section, names in (
        ("upstream", [u.name for u in cfg.upstream]),
        ("webhook", [w.label for w in cfg.webhook]),
    ):
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{section}: the name {name!r} is used twice")
    return cfg


def load(path: str | Path, *, secrets: bool = True) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path.resolve(), secrets=secrets)
