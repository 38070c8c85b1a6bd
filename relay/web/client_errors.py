"""aiohttp's "Error handling request" tracebacks for what clients do (a request its parser
refuses, a connection dropped) become one line with the client address. Any port that
faces the network meets scanners, fuzzers and TLS spoken to a plain port; an operator
needs the address and the reason, not twenty lines per probe."""

from __future__ import annotations

import logging
import re

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("relay.web")


def _first_line(exc: HttpProcessingError) -> str:
    """aiohttp's fixed description of a protocol error, without the client's bytes that
    it quotes (never copied into a log line)."""
    line = exc.message.splitlines()[0] if exc.message else ""
    line = re.split(r":? b['\"]", line, maxsplit=1)[0].rstrip(": ")  # LineTooLong quotes
    return line or type(exc).__name__


class _ClientErrorFilter(logging.Filter):
    """On aiohttp's server logger: a traceback caused by the client (a request the parser
    refuses: WARNING; a connection lost: INFO) becomes one line from `relay.web` with the
    client address; every other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.WARNING or not isinstance(
            exc, HttpProcessingError | ConnectionError
        ):
            return True
        # aiohttp logs "Error handling request from %s" with the peer as the only argument.
        args = record.args if isinstance(record.args, tuple) else ()
        peer = args[0] if len(args) == 1 else "an unknown client"
        if isinstance(exc, HttpProcessingError):
            log.warning("http request from %s refused: %s %s", peer, exc.code, _first_line(exc))
        else:
            log.info("http connection from %s lost: %s", peer, exc)
        return False


def quiet_client_errors() -> None:
    """Install the filter on aiohttp's server logger (once, however often it is called)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorFilter) for f in logger.filters):
        logger.addFilter(_ClientErrorFilter())
