"""Where the relay's log lines go, and in which shape (`[log] format`, `[log] level`).

Everything goes to stderr, one line per record: journald, `docker logs` and any log
shipper take it from there, so the relay never opens, rotates or reopens a log file.

`text` is the line an operator reads in a terminal. `json` is one object per line for a
log stack: the message events (received, attempt, deferred, sent, failed, dsn, the
providers' events) carry their facts as fields (`msg_id`, `client`, `upstream`,
`outcome`, `duration_ms`, `reason`, ...), passed by the call sites through `extra=`, so
"what happened to message X" is one query on `msg_id`, the way `grep ID mail.log` is for
Postfix. Both shapes come from the same log call: the text line is the JSON `msg`.

Nothing secret may reach the log at any level. The relay's own lines never carry
passwords, tokens, webhook secrets or message content; two libraries would at DEBUG:
aiosmtpd's `mail.log` echoes every line a client sends (a password typed after a refused
AUTH, message text sent after a refused DATA), and botocore/urllib3 log request headers
and bodies (a raw message handed to SES). The first is filtered here, the others are kept
at INFO whatever the relay's level.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from relay.config import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Loggers whose DEBUG output carries credentials or message content (request headers
#: with signatures, raw request bodies): never below INFO.
GUARDED_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore", "psycopg")

#: The attributes every LogRecord has: anything else on a record came through `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
#: How many attributes a record has before makeRecord adds the `extra=` ones after them.
_STANDARD_COUNT = len(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
#: The first keys of every JSON line, in this order; the record's own fields follow.
_HEAD = ("ts", "level", "logger", "event", "msg")
# Made once: json.dumps with any option builds a new encoder for every call, which
# costs twice the encoding itself.
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is the `exc` string)."""

    def __init__(self) -> None:
        super().__init__()
        # time.strftime is the slow part of a timestamp: once a second is enough.
        self._second: tuple[int, str] = (-1, "")

    def timestamp(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds: `2025-01-31T09:15:02.417Z`."""
        second = int(created)
        cached_second, prefix = self._second
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)
        return f"{prefix}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = record.__dict__
        event = fields.get("event")
        if event is not None:
            line["event"] = event
        line["msg"] = record.getMessage()
        line["pid"] = _pid
        # Only the keys after the standard ones can have come through `extra=` (a
        # formatter may have added `message` or `exc_text` since: hence the check).
        for key in list(fields)[_STANDARD_COUNT:]:
            value = fields[key]
            if value is not None and key not in _RECORD_ATTRIBUTES and key not in _HEAD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return _encode(line)
        except (TypeError, ValueError) as exc:  # a field JSON cannot hold (a cycle, odd keys)
            kept = {key: line[key] for key in (*_HEAD, "pid", "exc") if key in line}
            return _encode({**kept, "log_error": f"fields left out: {exc}"})


# The pid on every JSON line tells the workers of `server.workers = N` apart; looked up
# once per process, not once per line.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


# -- aiosmtpd's mail.log ---------------------------------------------------------------------

#: SMTP verbs whose whole line may be logged (AUTH keeps its mechanism only).
_COMMANDS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN"}
    | {"HELP", "STARTTLS", "AUTH", "PROXY"}
)


def _client_line(line: object) -> object:
    """A line a client sent, as far as it may be logged: a command, not what follows it."""
    if not isinstance(line, bytes | str):
        return line
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    words = raw.split(maxsplit=2)
    verb = words[0].decode("ascii", "replace").upper() if words else ""
    if verb == "AUTH":
        mechanism = words[1].decode("ascii", "replace") if len(words) > 1 else ""
        return f"AUTH {mechanism} [rest not logged]".rstrip()
    if verb in _COMMANDS:
        return line
    return f"[{len(raw)} bytes not logged: not a command]"


class MailLogRedactor(logging.Filter):
    """Drops from aiosmtpd's DEBUG lines whatever a client sent that is not a command.

    aiosmtpd logs every line it reads as a command. Most are, but after a refused AUTH
    a client may send its base64 password as the next line, and after a refused DATA its
    message text; aiosmtpd's own masking covers only `AUTH <mechanism> <response>`.
    """

    #: aiosmtpd's format strings that carry a client's line, and the argument that is it.
    CLIENT_LINES = {
        "%r >> %r": 1,
        "_handle_client readline: %r": 0,
    }
    #: Format strings whose argument is never logged (a failed base64 AUTH answer).
    HIDDEN = {
        "%r can't decode base64: %s": 1,
        "DATA readline: %s": 0,
    }

    def filter(self, record: logging.LogRecord) -> bool:
        fmt = record.msg
        if not isinstance(fmt, str) or not isinstance(record.args, tuple):
            return True
        index = self.CLIENT_LINES.get(fmt)
        if index is not None and index < len(record.args):
            args = list(record.args)
            args[index] = _client_line(args[index])
            record.args = tuple(args)
        index = self.HIDDEN.get(fmt)
        if index is not None and index < len(record.args):
            args = list(record.args)
            args[index] = "[not logged]"
            record.args = tuple(args)
        return True


# -- setup -----------------------------------------------------------------------------------


class RelayLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs (and replaces when called again)."""


_redactor = MailLogRedactor()


def level_number(name: str) -> int:
    """`"info"` → logging.INFO; a ValueError naming the choices for anything else."""
    number = logging.getLevelName(name.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {name!r}: use debug, info, warning or error")
    return number


def configure(
    settings: LogConfig,
    *,
    level: str | None = None,
    stream: TextIO | None = None,
    guarded: Iterable[str] = GUARDED_LIBRARIES,
) -> logging.Handler:
    """Send every record to stderr (or `stream`) in `settings.format` at `level` (the
    command line's `--log-level`) or `settings.level`.

    Called before the supervisor forks, so the workers inherit the handler and write the
    same lines; calling it again replaces the handler (a reload that changes `[log]`)."""
    number = level_number(level or settings.level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RelayLogHandler)]:
        root.removeHandler(old)
        old.close()
    handler = RelayLogHandler(stream if stream is not None else sys.stderr)
    formatter = JSONFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(number)
    # No caller lookup, thread or process names in the records (neither shape uses
    # them): the logging HOWTO's own advice, and a few percent of a busy relay's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in guarded:
        logging.getLogger(name).setLevel(max(number, logging.INFO))
    mail_log = logging.getLogger("mail.log")
    # aiosmtpd logs every command at INFO (about ten lines a session); the relay's own
    # loggers already say what happened to each message, once. At DEBUG the protocol
    # trace is wanted, with what clients send that is not a command left out.
    mail_log.setLevel(number if number <= logging.DEBUG else logging.WARNING)
    if _redactor not in mail_log.filters:
        mail_log.addFilter(_redactor)
    return handler
