"""Starting the configured SMTP listeners on the running event loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from relay.config import Config
from relay.smtp.auth import Authenticator
from relay.smtp.handler import RelayHandler, Submit
from relay.smtp.server import RelaySMTP
from relay.smtp.tls import ensure_self_signed, server_tls_context

log = logging.getLogger("relay.smtp")


class ProtocolFactory:
    """Makes each connection's protocol: the first in full, the rest cloned from it."""

    def __init__(self, build: Callable[[], RelaySMTP]) -> None:
        self.build = build
        self.template: RelaySMTP | None = None

    def __call__(self) -> RelaySMTP:
        if self.template is None:
            self.template = self.build()  # kept aside: it never serves a connection
        return RelaySMTP.from_template(self.template)


def tls_context(config: Config) -> ssl.SSLContext | None:
    smtp = config.smtp
    if all(listen.tls == "none" for listen in smtp.listen):
        return None
    if smtp.tls_cert:
        cert, key = config.resolve(smtp.tls_cert), config.resolve(smtp.tls_key)
    else:
        cert, key = ensure_self_signed(config.resolve("var/tls"), config.server.hostname)
    return server_tls_context(cert=cert, key=key, min_version=smtp.tls_min_version)


async def start_listeners(
    config: Config, submit: Submit, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    smtp = config.smtp
    ctx = tls_context(config)
    authenticator = Authenticator(smtp.users)
    servers = []
    for listen in smtp.listen:
        handler = RelayHandler(
            listener=listen,
            smtp=smtp,
            hostname=config.server.hostname,
            authenticator=authenticator,
            submit=submit,
        )
        implicit = listen.tls == "implicit"

        def build(handler: RelayHandler = handler, implicit: bool = implicit) -> RelaySMTP:
            cfg = handler.listener
            return RelaySMTP(
                handler,
                authenticator=authenticator,
                implicit_tls=implicit,
                max_auth_failures=smtp.max_auth_failures,
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=True,
                hostname=config.server.hostname,
                ident="relay",
                tls_context=ctx if cfg.tls == "starttls" else None,
                require_starttls=False,
                timeout=smtp.timeout,
                auth_required=cfg.auth == "required",
                auth_require_tls=cfg.auth_require_tls and not implicit,
                auth_exclude_mechanism=["PLAIN", "LOGIN"] if cfg.auth == "none" else [],
            )

        factory = ProtocolFactory(build)
        server = await asyncio.get_running_loop().create_server(
            factory,
            host=listen.address.host,
            port=listen.address.port,
            ssl=ctx if implicit else None,
            reuse_address=True,
            reuse_port=reuse_port,
            family=socket.AF_UNSPEC,
        )
        for sock in server.sockets:
            log.info(
                "SMTP listening on %s (tls=%s, auth=%s)",
                sock.getsockname()[:2],
                listen.tls,
                listen.auth,
            )
        servers.append(server)
    return servers
