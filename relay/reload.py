"""Reload without a restart: SIGHUP, `relay reload`, `Relay.reload()`.

Postfix's `postfix reload` keeps every session; so does this. The config file is read
again and checked whole (`relay.checks.load_checked`): a file with one wrong key is
refused, that key is logged, and the running config stays, all of it. A good file is put
in force in two steps. First everything that can fail is prepared while the old config
still serves: the new TLS pair is proven on a throwaway context, DKIM keys are loaded,
new and changed upstreams are built and started, new inbound destinations are started.
Only then is it swapped in, without an await in between, so no message sees half of it:

- SMTP users, their allowed senders, trusted networks, the recipient limit: at the next
  command of every session (open sessions stay open; a removed user's next MAIL fails);
- the TLS certificate and key: for handshakes that start afterwards;
- upstreams added, removed or changed (keys, secrets, priorities): a removed or replaced
  upstream gets no new attempts, those in flight finish on it, then it is closed; a kept
  name keeps its health and breaker (they are shared by name);
- `[routing]`, `[[dkim]]`, `[[inbound.route]]`, `[[web.tokens]]`;
- the providers' event endpoints (an upstream's `events` and `webhook` settings: a new
  signing key, an upstream that now takes events), `[events]`, `[suppression]` and the
  applications' `[[webhook]]`s.

Everything else that changed needs a restart (listener addresses and modes, the queue,
workers, the web listener, ...) and is named in the log, key by key; the relay runs on
with the old value of those keys. Values are never logged, only key names: many are
secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from relay import heap
from relay.checks import check, load_checked
from relay.config import Config, ConfigError, UpstreamConfig
from relay.queue import is_postgres
from relay.queue.admin import wake_waiting

if TYPE_CHECKING:
    import ssl

    from relay.certwatch import CertWatcher
    from relay.dispatch.routing import Router, UpstreamState
    from relay.dispatch.scheduler import Scheduler
    from relay.dkim import DKIMSigner
    from relay.events.base import ProviderWebhook
    from relay.events.outbox import WebhookSender
    from relay.events.registry import ProviderHooks
    from relay.events.service import EventService
    from relay.inbound.service import InboundService
    from relay.inbound.settings import InboundSettings
    from relay.queue.base import Queue
    from relay.smtp.live import LiveSMTP
    from relay.suppression import SuppressionList
    from relay.upstreams.base import Upstream
    from relay.web.auth import Access

log = logging.getLogger("relay.reload")

# Changed keys a reload puts in force; any other changed key needs a restart.
APPLIED = (
    "smtp.users",
    "smtp.trusted_networks",
    "smtp.max_recipients",
    "smtp.tls_cert",
    "smtp.tls_key",
    "routing.",
    "dkim",
    "web.tokens",
    "inbound.route",
    "upstream[",
    "events.",
    "suppression.",
    "webhook",
)
PID_FILE_NAME = "relay.pid"


class Relay(Protocol):
    """What a reload reaches in one relay process (relay.app.Relay)."""

    config: Config
    live_smtp: LiveSMTP
    cert_watcher: CertWatcher | None
    web_tls: ssl.SSLContext | None
    web_access: Access | None
    router: Router
    queue: Queue
    clock: Callable[[], float]
    upstreams: list[Upstream]
    outbound: Scheduler | None
    inbound: InboundService | None
    events: EventService | None
    provider_hooks: ProviderHooks | None
    suppression: SuppressionList | None
    webhook_sender: WebhookSender | None
    reload_lock: asyncio.Lock

    def track(self, work: Coroutine[Any, Any, object], *, name: str) -> asyncio.Task[object]: ...


class ReloadError(Exception):
    """`relay reload` cannot reach a running server (no pid file, a stale one)."""


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: the keys now in force, those waiting for a restart, or why
    nothing changed (`error`)."""

    applied: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- what changed ----------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → leaf value: `upstream[ses].options.region`, `smtp.listen[0].address`.
    Named entries (upstreams, users, tokens) are keyed by name, so reordering them or
    adding one in the middle is not a change to the others."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        internal: frozenset[str] = getattr(value, "internal_fields", frozenset())
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.name not in internal:
                out.update(flatten(getattr(value, f.name), _join(prefix, f.name)))
        return out
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, _join(prefix, str(key))))
        return out or {prefix: {}}
    if isinstance(value, (tuple, list)) and any(
        isinstance(v, dict) or dataclasses.is_dataclass(v) for v in value
    ):
        out = {}
        for index, item in enumerate(value):
            label = getattr(item, "name", None) or index
            out.update(flatten(item, f"{prefix}[{label}]"))
        return out
    return {prefix: value}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def changed_keys(old: Config, new: Config) -> list[str]:
    before, after = flatten(old), flatten(new)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def restart_keys(old: Config, new: Config, keys: Iterable[str]) -> tuple[str, ...]:
    """The changed keys a reload cannot put in force."""
    return tuple(key for key in keys if not key.startswith(APPLIED))


def in_force(old: Config, new: Config) -> Config:
    """The config a relay runs with after reloading `new`: its reloadable parts, and the
    old values of everything that waits for a restart."""
    smtp = dataclasses.replace(
        old.smtp,
        users=new.smtp.users,
        trusted_networks=new.smtp.trusted_networks,
        max_recipients=new.smtp.max_recipients,
        tls_cert=new.smtp.tls_cert,
        tls_key=new.smtp.tls_key,
    )
    inbound = old.inbound
    if old.inbound and new.inbound:
        inbound = {**old.inbound, "route": new.inbound.get("route", ())}
    return dataclasses.replace(
        old,
        smtp=smtp,
        routing=new.routing,
        upstream=new.upstream,
        events=new.events,
        suppression=new.suppression,
        webhook=new.webhook,
        dkim=new.dkim,
        web=dataclasses.replace(old.web, tokens=new.web.tokens),
        inbound=inbound,
        path=new.path,
        warnings=new.warnings,
    )


# -- putting it in force -----------------------------------------------------------------


@dataclass
class _Prepared:
    """What the new config needs, made before anything running changes."""

    signer: DKIMSigner | None = None
    inbound: InboundSettings | None = None
    # (config, started upstream) for each upstream that is new or changed.
    upstreams: list[tuple[UpstreamConfig, Upstream]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # The upstreams' event endpoints, when this process serves them.
    hooks: dict[str, ProviderWebhook] | None = None

    async def discard(self) -> None:
        for _, upstream in self.upstreams:
            with contextlib.suppress(Exception):
                await upstream.close()


async def reload_relay(relay: Relay, new: Config | None = None) -> ReloadResult:
    """Re-read the config (or take `new`) and put what can change in force: see the
    module docstring. One reload at a time; a second SIGHUP meanwhile waits its turn."""
    from relay import sdnotify

    async with relay.reload_lock:
        sdnotify.reloading("reloading the config")
        try:
            return await _reload(relay, new)
        finally:
            sdnotify.ready("serving (config reloaded)")


async def _reload(relay: Relay, new: Config | None) -> ReloadResult:
    old = relay.config
    try:
        if new is None:
            new = load_checked(old.path)
        else:
            check(new)
    except ConfigError as exc:
        log.error("reload refused, the running config stays as it was: %s", exc)
        return ReloadResult(error=str(exc))
    keys = changed_keys(old, new)
    at_start = set(restart_keys(old, new, keys))
    needs_restart = tuple(k for k in keys if k in at_start or _web_tls_at_start(relay, k))
    applied = tuple(k for k in keys if k not in needs_restart)
    try:
        prepared = await _prepare(relay, old, new, applied)
    except Exception as exc:
        message = _describe(exc)
        log.error("reload refused, the running config stays as it was: %s", message)
        return ReloadResult(error=message)
    if prepared.inbound is not None and relay.inbound is not None:
        try:
            await relay.inbound.replace_routes(prepared.inbound)
        except Exception as exc:
            await prepared.discard()
            message = f"inbound.route: a destination cannot start: {_describe(exc)}"
            log.error("reload refused, the running config stays as it was: %s", message)
            return ReloadResult(error=message)
    retiring = _commit(relay, new, prepared)
    relay.config = in_force(old, new)
    if applied:
        relay.track(_refreeze_after(retiring), name="refreeze-heap")
    if prepared.upstreams and relay.outbound is not None:
        # A new or mended upstream (a backup added in an outage, a fixed key): the mail
        # waiting for one need not wait for its next retry step.
        relay.track(
            wake_waiting(relay.queue, now=relay.clock(), actor="reload"), name="reload-wake"
        )
    for warning in new.warnings:
        log.warning("config: %s", warning)
    if applied:
        log.info("config reloaded from %s: %s now in force", new.path, ", ".join(applied))
    else:
        log.info("config reloaded from %s: no reloadable setting changed", new.path)
    if needs_restart:
        log.warning(
            "config: these changes need a restart and are not in force yet: %s",
            ", ".join(needs_restart),
        )
    return ReloadResult(applied=applied, needs_restart=needs_restart)


def reloaded_for_restarts(config: Config) -> Config:
    """The supervisor's copy, for workers it starts again after a reload: the file's
    reloadable parts (each worker logs what changed; a bad file is logged there too)."""
    try:
        return in_force(config, load_checked(config.path))
    except ConfigError:
        return config


def _web_tls_at_start(relay: Relay, key: str) -> bool:
    """web.tls_* can be reloaded into a web server that serves TLS, not switch it on."""
    return key.startswith("web.tls_") and relay.web_tls is None


async def _prepare(relay: Relay, old: Config, new: Config, applied: Iterable[str]) -> _Prepared:
    """Everything that can fail, while the old config serves on untouched."""
    from relay.dkim import DKIMSigner
    from relay.smtp.listener import tls_files
    from relay.smtp.tls import server_tls_context

    prepared = _Prepared()
    live = relay.live_smtp
    if live.tls is not None:
        files = tls_files(new)
        if files is not None:
            # Proven here; loaded into the live context at commit (load_pair checks again).
            try:
                server_tls_context(
                    cert=files[0], key=files[1], min_version=old.smtp.tls_min_version
                )
            except Exception as exc:
                raise ConfigError(f"smtp.tls_cert / smtp.tls_key: {_describe(exc)}") from None
    if relay.web_tls is not None and new.web.tls_cert:
        cert, key = new.resolve(new.web.tls_cert), new.resolve(new.web.tls_key)
        try:
            server_tls_context(cert=cert, key=key, min_version="TLSv1.2")
        except Exception as exc:
            raise ConfigError(f"web.tls_cert / web.tls_key: {_describe(exc)}") from None
    prepared.signer = DKIMSigner.from_config(new) if new.dkim else None
    if relay.inbound is not None and any(k.startswith("inbound.route") for k in applied):
        from relay.inbound.settings import parse_inbound

        prepared.inbound = parse_inbound(new.inbound, new)
    current = {u.name: u for u in old.upstream}
    wanted = {u.name for u in new.upstream}
    prepared.removed = [name for name in current if name not in wanted]
    from relay.upstreams.registry import create_upstream

    try:
        for index, up in enumerate(new.upstream):
            if current.get(up.name) == up:
                continue
            upstream = create_upstream(up, f"upstream[{index}]", new)
            await upstream.start()
            prepared.upstreams.append((up, upstream))
        if relay.provider_hooks is not None:
            prepared.hooks = relay.provider_hooks.build(new)
    except BaseException:
        await prepared.discard()
        raise
    return prepared


def _commit(relay: Relay, new: Config, prepared: _Prepared) -> list[asyncio.Task[object]]:
    """Swap the prepared parts in. No await here: no message sees half a config. Returns
    the tasks that close what was replaced."""
    from relay.dispatch.outbound import OutboundWorker
    from relay.dispatch.routing import BreakerSettings

    relay.live_smtp.apply(new.smtp)
    watcher = relay.cert_watcher
    if watcher is not None:
        from relay.smtp.listener import tls_files

        files = tls_files(new)
        if relay.live_smtp.tls is not None and files is not None:
            problem = watcher.load("smtp", *files, min_version=relay.config.smtp.tls_min_version)
            if problem is not None:  # rewritten since it was proven: the watcher retries
                log.error("reload: the SMTP TLS certificate was not loaded: %s", problem)
        if relay.web_tls is not None and new.web.tls_cert:
            cert, key = new.resolve(new.web.tls_cert), new.resolve(new.web.tls_key)
            problem = watcher.load("web", cert, key, min_version="TLSv1.2")
            if problem is not None:
                log.error("reload: the web TLS certificate was not loaded: %s", problem)
    if relay.web_access is not None:
        relay.web_access.replace(new.web)
    r = new.routing
    router = relay.router
    router.adopt_settings(
        BreakerSettings(
            failures_to_open=r.failures_to_open,
            cooldown=r.cooldown,
            cooldown_max=r.cooldown_max,
            health_half_life=r.health_half_life,
        )
    )
    retiring = _swap_upstreams(relay, prepared) + _swap_events(relay, new, prepared)
    worker = relay.outbound.worker if relay.outbound is not None else None
    if isinstance(worker, OutboundWorker):
        worker.signer = prepared.signer
        worker.keep_body_for = frozenset(
            u.name for u in new.upstream if u.events and new.events.requeue
        )
        suppression = relay.suppression
        worker.suppressed = (
            suppression.suppressed
            if suppression is not None and new.suppression.action == "bounce"
            else None
        )
        events = relay.events
        worker.on_round = events.after_round if events is not None and new.webhook else None
    return retiring


async def _refreeze_after(retiring: list[asyncio.Task[object]]) -> None:
    """Once what the reload replaced has closed (an upstream after its attempts in flight),
    it is garbage: collect it from the heap frozen at start, and freeze what lives on."""
    await asyncio.gather(*retiring, return_exceptions=True)
    heap.refreeze()


def _swap_events(relay: Relay, new: Config, prepared: _Prepared) -> list[asyncio.Task[object]]:
    """The providers' endpoints, what their events do, the suppression rules and the
    applications' webhooks: each read per request or per event, so swapping is enough."""
    retiring: list[asyncio.Task[object]] = []
    if relay.provider_hooks is not None and prepared.hooks is not None:
        for hook in relay.provider_hooks.swap(prepared.hooks):
            retiring.append(relay.track(hook.close(), name=f"retire-webhook-{hook.name}"))
    if relay.events is not None:
        relay.events.reconfigure(new)
    if relay.suppression is not None:
        relay.suppression.config = new.suppression
    if relay.webhook_sender is not None:
        relay.webhook_sender.replace_hooks(new.webhook)
    return retiring


def _swap_upstreams(relay: Relay, prepared: _Prepared) -> list[asyncio.Task[object]]:
    router = relay.router
    before = {s.name: s for s in router.states}
    retired: list[UpstreamState] = []
    for up, upstream in prepared.upstreams:
        state = router.add(
            upstream,
            priority=up.priority,
            weight=up.weight,
            max_rate=up.max_rate,
            max_concurrency=up.max_concurrency,
        )
        previous = before.get(up.name)
        if previous is not None:
            state.inherit(previous)  # a changed upstream keeps its name's health
            state.probe_now()  # but not an open breaker's verdict on the old settings
            retired.append(previous)
        relay.upstreams.append(upstream)
        log.info("upstream %s %s", up.name, "replaced" if previous else "added")
    for name in prepared.removed:
        if name in before:
            retired.append(before[name])
            log.info("upstream %s removed: no new attempts go to it", name)
    closing: list[asyncio.Task[object]] = []
    for state in retired:
        router.retire(state)
        if state.upstream in relay.upstreams:
            relay.upstreams.remove(state.upstream)
        closing.append(relay.track(_close_when_idle(router, state), name=f"retire-{state.name}"))
    return closing


async def _close_when_idle(router: Router, state: UpstreamState) -> None:
    """Close a retired upstream once its attempts in flight have finished."""
    try:
        await router.wait_idle(state)
    finally:
        try:
            await state.upstream.close()
        except Exception:
            log.exception("closing the retired upstream %s failed", state.name)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- signals and the pid file ------------------------------------------------------------


def install_sighup(relay: Relay) -> None:
    """SIGHUP reloads (one at a time, in the order asked)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: relay.track(reload_relay(relay), name="reload"))


def pid_file(config: Config) -> Path:
    """Where `relay serve` writes its pid for `relay reload`: in the queue directory (the
    one place the relay surely may write), or `var/` beside the config with PostgreSQL."""
    if is_postgres(config.server.queue):
        return config.resolve("var") / PID_FILE_NAME
    return config.queue_dir / PID_FILE_NAME


def write_pid_file(config: Config) -> Path | None:
    path = pid_file(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write the pid file %s (relay reload needs it): %s", path, exc)
        return None
    return path


def remove_pid_file(path: Path | None) -> None:
    """Only our own: a second relay started by mistake must not remove the first's."""
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def running_pid(config: Config) -> int:
    """The pid of the relay serving `config`; ReloadError saying why there is none."""
    path = pid_file(config)
    try:
        pid = int(path.read_text().strip())
    except FileNotFoundError:
        raise ReloadError(
            f"no pid file at {path}: is `relay serve` running with this config? "
            "(under systemd use `systemctl reload relay`, in Docker `docker kill -s HUP`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ReloadError(f"cannot read the pid file {path}: {exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ReloadError(
            f"the pid file {path} names process {pid}, which is not running"
            " (a relay that was killed): start the relay"
        ) from None
    except PermissionError:
        raise ReloadError(
            f"process {pid} (from {path}) belongs to another user: run as that user"
        ) from None
    return pid


def request_reload(config_path: str | Path) -> tuple[int, Config]:
    """`relay reload`: check the file as the server will, then SIGHUP the server. A file
    the server would refuse is refused here, with its key, and no signal is sent."""
    config = load_checked(config_path)
    pid = running_pid(config)
    os.kill(pid, signal.SIGHUP)
    return pid, config
