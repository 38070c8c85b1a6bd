"""Certificate renewal without a signal: the TLS files are watched, and reloaded in place.

certbot (and most ACME clients) renew every 60-90 days by writing new files and pointing
`live/` symlinks at them; an operator should not have to remember a deploy hook. Every
few seconds each watched pair is `stat`ed (cheap: no read, no parse); when the
certificate's or the key's inode, size or modification time changed, the pair is
checked on a throwaway context first and only then loaded into the live one with
`SSLContext.load_cert_chain`, which affects only handshakes that start afterwards: open
sessions keep the certificate they negotiated. A bad pair (half written, a key that does
not match) is logged and the old certificate stays; the next change is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.smtp.tls import server_tls_context

log = logging.getLogger("relay.tls")

#: Seconds between looks at the files (tests make it short and await `changed`).
WATCH_INTERVAL = 5.0

Stamp = tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or a symlink repointed (None: missing)."""
    try:
        st = os.stat(path)  # follows certbot's live/ symlinks to the archive files
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class WatchedPair:
    """One live context (the SMTP listeners', or the web server's) and its files."""

    name: str
    context: ssl.SSLContext
    cert: Path
    key: Path
    min_version: str
    stamp: Stamp = field(init=False)

    def __post_init__(self) -> None:
        self.stamp = self.current()

    def current(self) -> Stamp:
        return (_stat(self.cert), _stat(self.key))


class CertWatcher:
    """Watches pairs of TLS files and reloads each into its live context when it changes."""

    def __init__(
        self, *, interval: float | None = None, on_reload: Callable[[str], None] | None = None
    ) -> None:
        self.interval = WATCH_INTERVAL if interval is None else interval
        self.pairs: dict[str, WatchedPair] = {}
        # Set after every reload attempt (loaded or refused): what tests await.
        self.changed = asyncio.Event()
        self.on_reload = on_reload

    def watch(
        self, name: str, context: ssl.SSLContext, cert: Path, key: Path, *, min_version: str
    ) -> None:
        self.pairs[name] = WatchedPair(name, context, cert, key, min_version)

    def load(self, name: str, cert: Path, key: Path, *, min_version: str) -> str | None:
        """Load `cert`/`key` into the live context now (a reload): None when loaded, else
        why not (the old pair stays). Later changes to the new files are watched."""
        pair = self.pairs[name]
        problem = load_pair(pair.context, cert, key, min_version=min_version)
        if problem is None:
            pair.cert, pair.key, pair.min_version = cert, key, min_version
            pair.stamp = pair.current()
        return problem

    def check(self) -> list[str]:
        """Reload every pair whose files changed since the last look; their names."""
        reloaded: list[str] = []
        for pair in self.pairs.values():
            stamp = pair.current()
            if stamp == pair.stamp:
                continue
            # Remembered even when the new pair is bad: the error is logged once per
            # change, and the next write (the missing half) is tried again.
            pair.stamp = stamp
            problem = load_pair(pair.context, pair.cert, pair.key, min_version=pair.min_version)
            if problem is None:
                log.info(
                    "%s TLS certificate reloaded from %s (changed on disk); new handshakes use it",
                    pair.name,
                    pair.cert,
                )
                reloaded.append(pair.name)
                if self.on_reload is not None:
                    self.on_reload(pair.name)
            else:
                log.error(
                    "%s TLS certificate changed on disk but was not loaded, the previous one"
                    " stays: %s",
                    pair.name,
                    problem,
                )
            self.changed.set()
        return reloaded

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a watcher must never stop serving
                log.exception("checking the TLS files failed")


def load_pair(context: ssl.SSLContext, cert: Path, key: Path, *, min_version: str) -> str | None:
    """Load a certificate and key into a live context, after proving them on a fresh one:
    a failed `load_cert_chain` can leave a context with the new certificate and the old
    key. None when loaded, else what is wrong with the files."""
    try:
        server_tls_context(cert=cert, key=key, min_version=min_version)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"{cert} / {key}: {_describe(exc)}"
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:  # the files changed again in between
        return f"{cert} / {key}: {_describe(exc)}"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} (is the key the certificate's, and both PEM?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
