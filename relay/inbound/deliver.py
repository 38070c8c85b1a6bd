"""Inbound destinations: where a decrypted, parsed message ends up.

Each destination is a class with `async deliver(raw, parsed, recipients) -> str` (a short
description of what was done, for the timeline) that raises `relay.outcomes`'
`TransientError` (retry later, with backoff) or `PermanentError` (dead-letter, no retry),
so the queue worker treats inbound and outbound failures alike (DESIGN.md invariant 3):

- `maildir`: the Maildir protocol (write in tmp/, fsync, rename into new/, fsync the
  directory), into one Maildir or one per recipient;
- `smtp` / `lmtp`: forward to a downstream server. SMTP goes through aiosmtplib. LMTP
  (RFC 2033) answers DATA once *per recipient*, which aiosmtplib's single-reply DATA can't
  read, so it uses a small client of its own over TCP or a Unix socket (Dovecot, Cyrus);
- `webhook`: an HTTP POST, multipart (a JSON part with the parsed fields, one part per
  attachment) or the raw MIME, signed with HMAC-SHA256 over `timestamp + "." + body`;
- `directory`: attachments only, as files for a document system: safe names, written
  under a hidden temporary name and then linked into place, never overwriting.

When some recipients succeed and others fail, the error raised is a `PartialDelivery`
(a TransientError or PermanentError) whose `delivered` lists the ones that need no retry.

Config: each type has a frozen settings dataclass, built from the route's `destination`
table by `build_destination_config()` with `relay.config.build` (unknown keys, wrong
types and bad values are reported with their key), and made into an object by
`create_destination()`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import aiosmtplib

from relay.config import ConfigError, Duration, Secret, build
from relay.durable import deliver_to_maildir, fsync_dir, make_maildir, write_new
from relay.inbound.parse import ParsedMessage, safe_filename
from relay.outcomes import PermanentError, RecipientRefusal, TransientError, UpstreamError
from relay.upstreams.http import retry_after as http_retry_after
from relay.wire import dot_stuff

log = logging.getLogger("relay.inbound")

# -- outcomes ----------------------------------------------------------------------------


class PartialDelivery(UpstreamError):
    """Raised after some recipients were served: retry (or fail) only the rest."""

    def __init__(
        self, reason: str, *, delivered: Sequence[str], refused: Mapping[str, RecipientRefusal]
    ) -> None:
        super().__init__(reason)
        self.delivered = tuple(delivered)
        self.refused = dict(refused)


class PartialTransient(PartialDelivery, TransientError):
    """Some recipients got the message; at least one failure is worth retrying."""


class PartialPermanent(PartialDelivery, PermanentError):
    """Some recipients got the message; the others never will."""


def _raise_for_refusals(
    what: str, delivered: Sequence[str], refused: Mapping[str, RecipientRefusal]
) -> None:
    """Turn per-recipient refusals into the right error; return if there were none."""
    if not refused:
        return
    detail = "; ".join(f"{r}: {v.reason}" for r, v in refused.items())
    transient = any(not v.permanent for v in refused.values())
    if not delivered:
        if transient:
            raise TransientError(f"{what}: every recipient deferred: {detail}")
        raise PermanentError(f"{what}: every recipient refused: {detail}")
    cls = PartialTransient if transient else PartialPermanent
    raise cls(
        f"{what}: {len(refused)} of {len(refused) + len(delivered)} recipients failed: {detail}",
        delivered=delivered,
        refused=refused,
    )


# -- settings -----------------------------------------------------------------------------

TLSMode = Literal["none", "opportunistic", "starttls", "implicit"]
_SMTP_TIMEOUT = Duration(60.0)
_WEBHOOK_TIMEOUT = Duration(30.0)


@dataclass(frozen=True)
class MaildirDestinationConfig:
    path: str
    # One Maildir per recipient (path/<address>/), or every message in `path` itself.
    per_recipient: bool = False


@dataclass(frozen=True)
class SMTPDestinationConfig:
    host: str = ""
    port: int = 25
    # A Unix socket instead of host:port (LMTP to a local Dovecot or Cyrus).
    socket: str = ""
    protocol: Literal["smtp", "lmtp"] = "smtp"
    # opportunistic: STARTTLS when offered. LMTP is local delivery and runs without TLS.
    tls: TLSMode = "opportunistic"
    verify_tls: bool = True
    username: str | None = None
    password: Secret | None = None
    # Envelope sender; empty: the original MAIL FROM SES received, else the null sender.
    mail_from: str = ""
    local_hostname: str = ""
    timeout: Duration = _SMTP_TIMEOUT

    def validate(self) -> None:
        if bool(self.host) == bool(self.socket):
            raise ValueError("give exactly one of host or socket")
        if self.socket and self.protocol != "lmtp":
            raise ValueError('socket is only supported with protocol = "lmtp"')
        if self.protocol == "lmtp" and self.tls in ("starttls", "implicit"):
            raise ValueError('LMTP runs without TLS: set tls = "none"')
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password must be given together")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")


@dataclass(frozen=True)
class WebhookDestinationConfig:
    url: str
    # Shared secret for the X-Relay-Signature header; strongly recommended.
    secret: Secret | None = None
    mode: Literal["multipart", "raw"] = "multipart"
    timeout: Duration = _WEBHOOK_TIMEOUT
    headers: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host/..., got {self.url!r}")


@dataclass(frozen=True)
class DirectoryDestinationConfig:
    path: str
    # A subdirectory per recipient (path/<address>/), or every file in `path` itself.
    per_recipient: bool = False


DestinationConfig = (
    MaildirDestinationConfig
    | SMTPDestinationConfig
    | WebhookDestinationConfig
    | DirectoryDestinationConfig
)


# -- the interface ---------------------------------------------------------------------------


class Destination(abc.ABC):
    """Somewhere inbound mail is delivered. Created from config; `start()` before use."""

    type_name: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Create directories or sessions; called once before the first delivery."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() created; called once at shutdown."""

    @abc.abstractmethod
    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        """Deliver the message for `recipients`; `sender` is the original envelope sender
        (SES `mail.source`), `delivery_id` a stable id (the work's dedupe key) that
        receivers can use to drop a redelivery. Returns what was done, for the timeline."""


# -- maildir ---------------------------------------------------------------------------------


def _recipient_dir(base: Path, recipient: str) -> Path:
    return base / safe_filename(recipient.strip().lower(), default="unknown-recipient")


class MaildirDestination(Destination):
    """Maildir delivery: readers never see a half-written file, a crash leaves none in new/."""

    type_name = "maildir"

    def __init__(self, name: str, path: Path, *, per_recipient: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self.per_recipient = per_recipient

    async def start(self) -> None:
        if not self.per_recipient:
            await asyncio.to_thread(make_maildir, self.path)

    @staticmethod
    def _deliver_one(maildir: Path, raw: bytes) -> str:
        make_maildir(maildir)  # recipients' Maildirs appear as mail first arrives
        return deliver_to_maildir(maildir, raw)

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not self.per_recipient:
            try:
                unique = await asyncio.to_thread(self._deliver_one, self.path, raw)
            except OSError as exc:
                raise TransientError(
                    f"maildir {self.path}: {exc.strerror or exc}", upstream_wide=True
                ) from exc
            return f"maildir {self.path}/new/{unique}"
        if not recipients:
            raise PermanentError("maildir per_recipient: the message has no recipients")
        delivered: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        names: list[str] = []
        for rcpt in recipients:
            folder = _recipient_dir(self.path, rcpt)
            try:
                unique = await asyncio.to_thread(self._deliver_one, folder, raw)
            except OSError as exc:
                refused[rcpt] = RecipientRefusal(False, f"{folder}: {exc.strerror or exc}")
                continue
            delivered.append(rcpt)
            names.append(f"{folder.name}/new/{unique}")
        _raise_for_refusals(f"maildir {self.path}", delivered, refused)
        return f"maildir {self.path}: " + ", ".join(names)


# -- directory (attachments) -------------------------------------------------------------------


def _numbered(name: str, n: int, max_bytes: int = 255) -> str:
    """`report.pdf` -> `report-2.pdf`, trimmed so the result still fits `max_bytes`."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    else:
        ext = "." + ext
    suffix = f"-{n}{ext}"
    budget = max_bytes - len(suffix.encode("utf-8"))
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return stem + suffix


_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _place_file(directory: Path, name: str, data: bytes) -> str:
    """Write `data` as `name` in `directory` without ever replacing an existing file.

    The bytes go to a hidden temporary file first (watchers ignore dot files), are
    fsynced, then hard-linked to the final name: link() fails instead of overwriting, and
    the file appears complete or not at all. File systems without hard links get an
    O_EXCL create instead (still no overwrite, but the file is visible while written).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = f".relay-tmp-{secrets.token_hex(8)}"
    write_new(directory / tmp, data)
    try:
        candidate = name
        for n in range(1, 10_000):
            try:
                os.link(directory / tmp, directory / candidate)
            except FileExistsError:
                candidate = _numbered(name, n)
                continue
            except OSError as exc:
                if exc.errno not in _LINK_UNSUPPORTED:
                    raise
                return _place_file_excl(directory, name, data)
            fsync_dir(directory)
            return candidate
        raise FileExistsError(errno.EEXIST, "no free file name", name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / tmp)


def _place_file_excl(directory: Path, name: str, data: bytes) -> str:
    candidate = name
    for n in range(1, 10_000):
        try:
            write_new(directory / candidate, data)
        except FileExistsError:
            candidate = _numbered(name, n)
            continue
        fsync_dir(directory)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free file name", name)


class DirectoryDestination(Destination):
    """Attachments as files for a document system. The message itself is not kept."""

    type_name = "directory"

    def __init__(self, name: str, path: Path, *, per_recipient: bool = False) -> None:
        super().__init__(name)
        self.path = path
        self.per_recipient = per_recipient

    async def start(self) -> None:
        await asyncio.to_thread(self.path.mkdir, parents=True, exist_ok=True)

    def _write_all(self, folder: Path, parsed: ParsedMessage) -> list[str]:
        return [_place_file(folder, a.filename, a.data) for a in parsed.attachments]

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not parsed.attachments:
            return f"directory {self.path}: no attachments to write"
        folders = (
            [_recipient_dir(self.path, r) for r in recipients]
            if self.per_recipient
            else [self.path]
        )
        if not folders:
            raise PermanentError("directory per_recipient: the message has no recipients")
        written: list[str] = []
        delivered: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        for i, folder in enumerate(folders):
            try:
                names = await asyncio.to_thread(self._write_all, folder, parsed)
            except OSError as exc:
                if not self.per_recipient:
                    raise TransientError(
                        f"directory {folder}: {exc.strerror or exc}", upstream_wide=True
                    ) from exc
                refused[recipients[i]] = RecipientRefusal(False, f"{folder}: {exc.strerror or exc}")
                continue
            if self.per_recipient:
                delivered.append(recipients[i])
            written.extend(str((folder / n).relative_to(self.path)) for n in names)
        _raise_for_refusals(f"directory {self.path}", delivered, refused)
        return f"directory {self.path}: " + ", ".join(written)


# -- SMTP and LMTP ---------------------------------------------------------------------------


def _refusal(code: int, message: str) -> RecipientRefusal:
    return RecipientRefusal(permanent=500 <= code < 600, reason=f"{code} {message}".strip())


def _reply_error(what: str, code: int, message: str, *, ambiguous: bool = False) -> Exception:
    reason = f"{what}: {code} {message}".strip()
    if 500 <= code < 600:
        return PermanentError(reason)
    return TransientError(reason, ambiguous=ambiguous)


class SMTPDestination(Destination):
    """Forwarding to a downstream SMTP server with aiosmtplib: 4xx retry, 5xx permanent."""

    type_name = "smtp"

    def __init__(
        self,
        name: str,
        settings: SMTPDestinationConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.tls_context = tls_context
        self.where = f"smtp {settings.host}:{settings.port}"

    def _envelope_sender(self, parsed: ParsedMessage, sender: str | None) -> str:
        return self.settings.mail_from or sender or ""

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        s = self.settings
        if not recipients:
            raise PermanentError(f"{self.where}: the message has no recipients")
        mail_from = self._envelope_sender(parsed, sender)
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=float(s.timeout),
            use_tls=s.tls == "implicit",
            start_tls={"none": False, "opportunistic": None, "starttls": True, "implicit": False}[
                s.tls
            ],
            validate_certs=s.verify_tls,
            tls_context=self.tls_context,
            username=s.username or None,
            password=str(s.password) if s.password else None,
            local_hostname=s.local_hostname or None,
        )
        sent_data = False
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            options: list[str] = []
            if not all(a.isascii() for a in (mail_from, *recipients)):
                options.append("SMTPUTF8")
            if not raw.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            sent_data = True
            errors, reply = await client.sendmail(
                mail_from, list(recipients), raw, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = {e.recipient: _refusal(e.code, e.message) for e in exc.recipients}
            _raise_for_refusals(self.where, [], refused)
            raise AssertionError("unreachable") from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise TransientError(
                f"{self.where}: authentication failed: {exc.code} {exc.message}", upstream_wide=True
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _reply_error(self.where, exc.code, exc.message) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise TransientError(f"{self.where}: {exc}", upstream_wide=True) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Connection refused, reset, or timed out. After DATA started, the server may
            # have taken the message: a retry may duplicate (ambiguous).
            raise TransientError(
                f"{self.where}: {exc!r}",
                upstream_wide=True,
                ambiguous=sent_data and not isinstance(exc, aiosmtplib.SMTPConnectError),
            ) from exc
        finally:
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()
                client.close()
        refused = {r: _refusal(code, msg) for r, (code, msg) in errors.items()}
        delivered = [r for r in recipients if r not in refused]
        _raise_for_refusals(self.where, delivered, refused)
        return f"{self.where}: {reply}"


class LMTPProtocolError(Exception):
    """The LMTP server's answer made no sense (not a reply line, closed early)."""


class LMTPDestination(SMTPDestination):
    """LMTP (RFC 2033): one reply per recipient after DATA, so a mailbox over quota defers
    only its own recipient. Over TCP or a Unix socket; no TLS (local delivery)."""

    type_name = "lmtp"

    def __init__(
        self,
        name: str,
        settings: SMTPDestinationConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(name, settings, tls_context=tls_context)
        self.where = (
            f"lmtp unix:{settings.socket}"
            if settings.socket
            else f"lmtp {settings.host}:{settings.port}"
        )

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        if not recipients:
            raise PermanentError(f"{self.where}: the message has no recipients")
        mail_from = self._envelope_sender(parsed, sender)
        stage = "connect"
        try:
            async with asyncio.timeout(float(self.settings.timeout)):
                if self.settings.socket:
                    reader, writer = await asyncio.open_unix_connection(self.settings.socket)
                else:
                    reader, writer = await asyncio.open_connection(
                        self.settings.host, self.settings.port
                    )
                try:
                    stage = "transaction"
                    delivered, refused, last = await self._transaction(
                        reader, writer, mail_from, recipients, raw
                    )
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, LMTPProtocolError, asyncio.IncompleteReadError) as exc:
            raise TransientError(
                f"{self.where}: {exc!r}", upstream_wide=True, ambiguous=stage != "connect"
            ) from exc
        _raise_for_refusals(self.where, delivered, refused)
        return f"{self.where}: {last}"

    async def _transaction(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mail_from: str,
        recipients: Sequence[str],
        raw: bytes,
    ) -> tuple[list[str], dict[str, RecipientRefusal], str]:
        async def command(line: str) -> tuple[int, str]:
            writer.write(line.encode("utf-8") + b"\r\n")
            await writer.drain()
            return await self._reply(reader)

        code, text = await self._reply(reader)
        if code != 220:
            raise _reply_error(f"{self.where} greeting", code, text)
        hostname = self.settings.local_hostname or socket.gethostname()
        code, text = await command(f"LHLO {hostname}")
        if code != 250:
            raise _reply_error(f"{self.where} LHLO", code, text)
        utf8 = "" if all(a.isascii() for a in (mail_from, *recipients)) else " SMTPUTF8"
        code, text = await command(f"MAIL FROM:<{mail_from}>{utf8}")
        if code != 250:
            raise _reply_error(f"{self.where} MAIL FROM", code, text)
        accepted: list[str] = []
        refused: dict[str, RecipientRefusal] = {}
        for rcpt in recipients:
            code, text = await command(f"RCPT TO:<{rcpt}>")
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                refused[rcpt] = _refusal(code, text)
        if not accepted:
            await command("RSET")
            return [], refused, ""
        code, text = await command("DATA")
        if code != 354:
            raise _reply_error(f"{self.where} DATA", code, text)
        writer.write(dot_stuff(raw))
        await writer.drain()
        delivered: list[str] = []
        last = ""
        for rcpt in accepted:  # RFC 2033 4.2: one reply per accepted RCPT, in order
            code, text = await self._reply(reader)
            if code == 250:
                delivered.append(rcpt)
                last = f"{code} {text}"
            else:
                refused[rcpt] = _refusal(code, text)
        with contextlib.suppress(OSError, LMTPProtocolError, asyncio.IncompleteReadError):
            await command("QUIT")
        return delivered, refused, last

    @staticmethod
    async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = await reader.readuntil(b"\n")
            if (
                len(line) < 4
                or not line[:3].isdigit()
                or line[3:4] not in (b" ", b"-", b"\r", b"\n")
            ):
                raise LMTPProtocolError(f"not a reply line: {line[:80]!r}")
            lines.append(line[4:].decode("utf-8", "replace").strip())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)


# -- webhook ---------------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"
DELIVERY_HEADER = "X-Relay-Delivery-Id"


def sign_webhook(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body).

    The timestamp is inside the MAC so a receiver can refuse old requests (replays); the
    receiver recomputes this over the exact body bytes and compares in constant time.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")


def _disposition(name: str, filename: str | None = None) -> str:
    out = f'form-data; name="{_quoted(name)}"'
    if filename is not None:
        ascii_name = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
        out += f'; filename="{_quoted(ascii_name)}"'
        if ascii_name != filename:
            out += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return out


def build_multipart(fields: Mapping[str, Any], parsed: ParsedMessage) -> tuple[bytes, str]:
    """multipart/form-data (RFC 7578): part `message` (JSON), then `attachment` parts."""
    boundary = "relay-" + secrets.token_hex(16)
    chunks: list[bytes] = []

    def part(disposition: str, content_type: str, data: bytes) -> None:
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")

    part(
        _disposition("message"),
        "application/json",
        json.dumps(fields, ensure_ascii=False).encode("utf-8"),
    )
    for att in parsed.attachments:
        part(_disposition("attachment", att.filename), att.content_type, att.data)
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class WebhookDestination(Destination):
    """POST to an application. 2xx done; 408/429/5xx/timeouts retry; other 4xx permanent."""

    type_name = "webhook"

    def __init__(
        self,
        name: str,
        settings: WebhookDestinationConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._get_session()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.settings.timeout))
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build_request(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The exact body and headers to send (public so tests and docs can show them)."""
        s = self.settings
        headers = dict(s.headers)
        if s.mode == "raw":
            body, ctype = raw, "message/rfc822"
            headers["X-Relay-Recipients"] = ", ".join(recipients)
            if sender is not None:
                headers["X-Relay-Sender"] = sender
        else:
            fields = {
                **parsed.to_json(),
                "recipients": list(recipients),
                "sender": sender,
                "delivery_id": delivery_id,
            }
            body, ctype = build_multipart(fields, parsed)
        headers["Content-Type"] = ctype
        timestamp = str(int(self.clock()))
        headers[TIMESTAMP_HEADER] = timestamp
        if delivery_id:
            headers[DELIVERY_HEADER] = delivery_id
        if s.secret:
            headers[SIGNATURE_HEADER] = sign_webhook(str(s.secret), timestamp, body)
        return body, headers

    async def deliver(
        self,
        raw: bytes,
        parsed: ParsedMessage,
        recipients: Sequence[str],
        *,
        sender: str | None = None,
        delivery_id: str | None = None,
    ) -> str:
        url = self.settings.url
        body, headers = self.build_request(
            raw, parsed, recipients, sender=sender, delivery_id=delivery_id
        )
        try:
            async with self._get_session().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                detail = (await resp.text(errors="replace"))[:200].strip()
                retry_after = http_retry_after(resp.headers, time.time())
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(
                f"webhook {url}: cannot connect: {exc.os_error!r}", upstream_wide=True
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have been received and processed before the failure.
            raise TransientError(
                f"webhook {url}: {exc!r}", upstream_wide=True, ambiguous=True
            ) from exc
        reason = f"webhook {url}: HTTP {status} {detail}".strip()
        if 200 <= status < 300:
            return f"webhook {url}: HTTP {status}"
        if status in (408, 429) or status >= 500:
            raise TransientError(reason, retry_after=retry_after, upstream_wide=status != 408)
        raise PermanentError(reason)


# -- from config -----------------------------------------------------------------------------

DESTINATION_SETTINGS: dict[str, type[Any]] = {
    "maildir": MaildirDestinationConfig,
    "smtp": SMTPDestinationConfig,
    "lmtp": SMTPDestinationConfig,
    "webhook": WebhookDestinationConfig,
    "directory": DirectoryDestinationConfig,
}


def build_destination_config(data: Any, key: str = "destination") -> DestinationConfig:
    """Validate a destination table (`type` plus that type's keys) into its dataclass."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a table, got {type(data).__name__}")
    kind = data.get("type")
    if kind not in DESTINATION_SETTINGS:
        known = ", ".join(sorted(DESTINATION_SETTINGS))
        raise ConfigError(f"{key}.type: unknown destination type {kind!r} (known: {known})")
    options = {k: v for k, v in data.items() if k != "type"}
    if kind == "lmtp":
        options.setdefault("protocol", "lmtp")
        options.setdefault("tls", "none")
        if options["protocol"] != "lmtp":
            raise ConfigError(f'{key}.protocol: type lmtp implies protocol "lmtp"')
    settings: DestinationConfig = build(DESTINATION_SETTINGS[kind], options, key)
    return settings


def create_destination(
    settings: DestinationConfig, *, name: str = "", base_dir: Path | None = None
) -> Destination:
    """The destination object for validated settings; relative paths resolve against
    `base_dir` (the config file's directory), as elsewhere in the config."""

    def resolve(path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or base_dir is None else base_dir / p

    if isinstance(settings, MaildirDestinationConfig):
        return MaildirDestination(
            name, resolve(settings.path), per_recipient=settings.per_recipient
        )
    if isinstance(settings, DirectoryDestinationConfig):
        return DirectoryDestination(
            name, resolve(settings.path), per_recipient=settings.per_recipient
        )
    if isinstance(settings, WebhookDestinationConfig):
        return WebhookDestination(name, settings)
    if settings.protocol == "lmtp":
        return LMTPDestination(name, settings)
    return SMTPDestination(name, settings)
