"""Starting the configured SMTP listeners on the running event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from relay.config import Config, ListenConfig
from relay.queue import is_postgres
from relay.smtp.auth import Authenticator
from relay.smtp.drain import Listening, Sessions
from relay.smtp.handler import RelayHandler, Submit
from relay.smtp.limits import ConnectionLimits, LargeMessages
from relay.smtp.live import LiveSMTP
from relay.smtp.refusals import RefusalLog
from relay.smtp.server import RelaySMTP
from relay.smtp.tls import ensure_self_signed, server_tls_context

if TYPE_CHECKING:
    from relay.suppression import SuppressionList
    from relay.telemetry.core import Telemetry

log = logging.getLogger("relay.smtp")

# sysexits.h EX_CONFIG: the supervisor does not restart a worker that exits with it.
EX_CONFIG = os.EX_CONFIG


class ListenerError(SystemExit):
    """A listener that cannot be served (address in use, not resolvable, not ours).

    A SystemExit, so that `relay serve` ends with status 78 and the one line already
    logged, not a traceback, and `asyncio.run` still unwinds the process cleanly.
    """

    def __init__(self) -> None:
        super().__init__(EX_CONFIG)


class ProtocolFactory:
    """Makes each connection's protocol: the first in full, the rest cloned from it."""

    def __init__(self, build: Callable[[], RelaySMTP]) -> None:
        self.template = build()  # kept aside: it never serves a connection

    def __call__(self) -> RelaySMTP:
        return RelaySMTP.from_template(self.template)


def tls_files(config: Config) -> tuple[Path, Path] | None:
    """The certificate and key the listeners use, made once if self-signed.

    The supervisor calls this before forking workers, so that they never race to create
    the pair (two workers once ended up with one's key and the other's certificate).
    """
    smtp = config.smtp
    if all(listen.tls == "none" for listen in smtp.listen):
        return None
    if smtp.tls_cert:
        return config.resolve(smtp.tls_cert), config.resolve(smtp.tls_key)
    return ensure_self_signed(config.resolve("var/tls"), config.server.hostname)


def tls_context(config: Config) -> ssl.SSLContext | None:
    files = tls_files(config)
    if files is None:
        return None
    cert, key = files
    return server_tls_context(cert=cert, key=key, min_version=config.smtp.tls_min_version)


def spool_directory(config: Config) -> Path | None:
    """Where DATA past the spool threshold goes: beside the queue, whose disk the operator
    sized for mail (None, the system's temporary directory, with a PostgreSQL queue)."""
    if is_postgres(config.server.queue):
        return None
    directory = config.queue_dir / "incoming"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _warn_cleartext_auth(index: int, listen: ListenConfig) -> None:
    """Once at start, and only for a listener deliberately configured so: aiosmtpd warned
    on each worker's first connection, implicit-TLS listeners included."""
    if listen.auth != "none" and not listen.auth_require_tls and listen.tls != "implicit":
        log.warning(
            "smtp.listen[%d] (%s): AUTH is accepted without TLS (auth_require_tls = false); "
            "passwords can cross the network in clear",
            index,
            listen.address,
        )


async def start_listeners(
    config: Config,
    submit: Submit,
    *,
    reuse_port: bool = False,
    telemetry: Telemetry | None = None,
    suppressions: SuppressionList | None = None,
    live: LiveSMTP | None = None,
    sessions: Sessions | None = None,
) -> list[asyncio.Server]:
    """`live`, when given, is filled with what a reload changes (relay.reload)."""
    smtp = config.smtp
    files = tls_files(config)
    ctx = None
    if files is not None:
        ctx = server_tls_context(cert=files[0], key=files[1], min_version=smtp.tls_min_version)
    authenticator = Authenticator(smtp.users)
    if live is not None:
        live.authenticator, live.tls, live.tls_files = authenticator, ctx, files
    limits = ConnectionLimits(
        total=smtp.max_connections,
        per_ip=smtp.max_connections_per_ip,
        hostname=config.server.hostname,
    )
    large = LargeMessages()
    refusals = RefusalLog()
    spool_dir = spool_directory(config)
    servers: list[asyncio.Server] = []
    for index, listen in enumerate(smtp.listen):
        handler = RelayHandler(
            listener=listen,
            smtp=smtp,
            hostname=config.server.hostname,
            authenticator=authenticator,
            submit=submit,
            suppressions=suppressions,
        )
        if live is not None:
            live.handlers.append(handler)
        implicit = listen.tls == "implicit"

        def build(handler: RelayHandler = handler, implicit: bool = implicit) -> RelaySMTP:
            cfg = handler.listener
            protocol = RelaySMTP(
                handler,
                authenticator=authenticator,
                implicit_tls=implicit,
                max_auth_failures=smtp.max_auth_failures,
                limits=limits,
                large=large,
                refusals=refusals,
                spool_dir=spool_dir,
                spool_threshold=smtp.data_spool_threshold,
                telemetry=telemetry,
                listener_name=str(cfg.address),
                sessions=sessions,
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=True,
                hostname=config.server.hostname,
                ident="relay",
                tls_context=ctx if cfg.tls == "starttls" else None,
                require_starttls=False,
                timeout=smtp.timeout,
                auth_required=cfg.auth == "required",
                # Always True here, so aiosmtpd does not warn on each worker's first
                # connection; the listener's own setting is applied just below (on an
                # implicit-TLS port the channel is encrypted before AUTH can be sent).
                auth_require_tls=True,
                auth_exclude_mechanism=["PLAIN", "LOGIN"] if cfg.auth == "none" else [],
            )
            protocol._auth_require_tls = cfg.auth_require_tls and not implicit
            return protocol

        _warn_cleartext_auth(index, listen)
        factory = ProtocolFactory(build)
        try:
            server = await _serve(listen, factory, ctx if implicit else None, reuse_port)
        except OSError as exc:
            log.error(
                "cannot listen on %s (smtp.listen[%d]): %s",
                listen.address,
                index,
                exc.strerror or exc,
            )
            for started in servers:
                started.close()
            raise ListenerError() from None
        servers.append(server)
        if sessions is not None:  # closed and drained at shutdown (relay.smtp.drain)
            sessions.listeners.append(Listening(server, factory, ctx if implicit else None))
    return servers


async def _serve(
    listen: ListenConfig,
    factory: ProtocolFactory,
    ctx: ssl.SSLContext | None,
    reuse_port: bool,
) -> asyncio.Server:
    server = await asyncio.get_running_loop().create_server(
        factory,
        host=listen.address.host,
        port=listen.address.port,
        ssl=ctx,
        reuse_address=True,
        reuse_port=reuse_port,
        family=socket.AF_UNSPEC,
        backlog=listen.backlog,  # the kernel caps it at net.core.somaxconn
    )
    for sock in server.sockets:
        log.info(
            "SMTP listening on %s (tls=%s, auth=%s)",
            sock.getsockname()[:2],
            listen.tls,
            listen.auth,
            extra={"event": "listening", "listener": listen.address},
        )
    return server
