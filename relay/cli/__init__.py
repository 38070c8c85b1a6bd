"""`relay` command line: serve, check-config, queue (postqueue/postsuper), suppression,
user, dkim.

Queue commands go through `relay.queue.admin`, the same code the HTTP API calls, on
whichever engine the config names; they work whether or not the server runs. A running
server sees their changes at once on PostgreSQL, within a second on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib.metadata
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from relay.cli.common import load, with_admin
from relay.cli.queue import add_queue_commands
from relay.cli.suppression import add_suppression_commands

DEFAULT_CONFIG = os.environ.get("RELAY_CONFIG", "config.toml")


# -- commands ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    from relay import logs

    # Before the supervisor forks: the workers inherit the handler and log the same way.
    logs.configure(cfg.log, level=args.log_level)
    for warning in cfg.warnings:
        logging.getLogger("relay.app").warning(
            "config: %s", warning, extra={"event": "config_warning"}
        )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from relay.cpus import worker_count

    workers = worker_count(cfg.server.workers)
    # Before a worker exists or prometheus_client is loaded: where the workers' metric
    # values go, so that /metrics adds them up (see relay.telemetry.multiprocess).
    from relay.telemetry import multiprocess

    values = multiprocess.prepare(workers)
    try:
        if workers > 1:
            from relay import supervisor

            return supervisor.run(cfg, workers)
        from relay.app import serve

        asyncio.run(serve(cfg))
        return 0
    finally:
        multiprocess.cleanup(values)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    for warning in cfg.warnings:
        print(f"relay: warning: {warning}", file=sys.stderr)
    queue_state = with_admin(args, lambda a: a.queue.check())
    print(
        f"{args.config}: ok ({len(cfg.smtp.listen)} listener(s), "
        f"{len(cfg.upstream)} upstream(s), queue {queue_state})"
    )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config as the server will, then SIGHUP the server (its pid file)."""
    from relay.config import ConfigError
    from relay.reload import ReloadError, request_reload

    try:
        pid, cfg = request_reload(args.config)
    except ConfigError as exc:
        print(f"relay: {exc}\nrelay: not reloaded: the server keeps its config", file=sys.stderr)
        return 1
    except ReloadError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    for warning in cfg.warnings:
        print(f"relay: warning: {warning}", file=sys.stderr)
    print(f"relay: asked process {pid} to reload {args.config}; its log says what changed")
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


def cmd_token_new(args: argparse.Namespace) -> int:
    """A random token and the config entry that uses it (the token itself goes in the
    environment or a file: the config names where, never the value)."""
    token = secrets.token_urlsafe(32)
    variable = "RELAY_TOKEN_" + args.name.upper().replace("-", "_").replace(".", "_")
    print(f"# the token (keep it secret): export {variable}={token}")
    print("[[web.tokens]]")
    print(f'name = "{args.name}"')
    print(f'token = "env:{variable}"   # or "file:/etc/relay/{args.name}.token"')
    print(f'role = "{args.role}"')
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="SMTP relay gateway")
    p.add_argument("--version", action="version", version=f"relay {_version()}")
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="config file (default: $RELAY_CONFIG or ./config.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the relay")
    s.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="overrides [log] level for this run",
    )
    s.set_defaults(func=cmd_serve)
    sub.add_parser("check-config", help="validate the config file").set_defaults(
        func=cmd_check_config
    )

    sub.add_parser(
        "reload",
        help="check the config file, then tell the running server to reload it (SIGHUP)",
    ).set_defaults(func=cmd_reload)

    add_queue_commands(sub)
    add_suppression_commands(sub)

    u = sub.add_parser("user", help="SMTP users").add_subparsers(dest="user_command", required=True)
    ua = u.add_parser(
        "add",
        help="print a config entry with a hashed password (prompts, or reads one line from stdin)",
    )
    ua.add_argument("name")
    ua.set_defaults(func=cmd_user_add)

    t = sub.add_parser("token", help="web page and API tokens").add_subparsers(
        dest="token_command", required=True
    )
    tn = t.add_parser("new", help="print a random token and its [[web.tokens]] entry")
    tn.add_argument("name")
    tn.add_argument("--role", choices=("read", "submit", "admin"), default="admin")
    tn.set_defaults(func=cmd_token_new)

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
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `relay queue list | head`: the reader left; say nothing more, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    return result


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    raise SystemExit(main())
