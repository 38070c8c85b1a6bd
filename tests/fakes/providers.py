"""Fake SendGrid, Mailgun, SparkPost and Postmark APIs: real aiohttp servers on loopback.

Each fake checks a request the way the real API documents (auth header, content type,
required fields, reserved headers, size limits) and answers with that provider's own
success and error shapes, so the upstreams' parsing is tested against what production
sends back. Accepted requests are recorded for tests to assert on.

Failures on command, for the next `times` requests (None: until `reset()`):
`fail(status)` answers that status in the provider's error shape, `hang()` holds the
request after reading it until `release()` (setting `hanging` so tests await it, never
sleep), `drop()` closes the connection after reading the request.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import itertools
import json
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDictProxy

FAKE_KEY = "test-key"


@dataclass(frozen=True)
class Recorded:
    """One accepted request: what the provider would have queued."""

    path: str
    headers: CIMultiDictProxy[str]
    body: Any  # parsed: a JSON document, or for forms {name: [values]}
    provider_id: str


class Rejection(Exception):
    """Answer with the provider's error shape (raised by `validate`)."""

    def __init__(self, status: int, message: str, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class _Mode:
    kind: Literal["status", "hang", "drop"]
    remaining: int | None
    status: int = 0
    message: str = ""
    code: str | int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeProvider(abc.ABC):
    """The shared server, failure switch and recorder; subclasses know one API."""

    #: aiohttp route path for the send endpoint.
    route: str = ""
    #: Status the provider answers for a message it refuses (what tests call "rejected").
    reject_status: int = 400
    #: Largest request body the provider takes, in bytes.
    max_size: int = 30 * 1000**2

    def __init__(self, api_key: str = FAKE_KEY) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.keep_requests = True  # the benchmark only counts, it does not keep them
        self.accepted_count = 0
        self.requests_seen = 0  # every request, refused or not
        self.arrivals: list[float] = []  # time.monotonic() of each accepted request
        self.hanging = asyncio.Event()
        self._release = asyncio.Event()
        self._mode: _Mode | None = None
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- commands --

    def fail(
        self,
        status: int,
        *,
        times: int | None = 1,
        message: str = "",
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._mode = _Mode(
            "status", times, status, message or f"fake failure {status}", code, headers or {}
        )

    def hang(self, *, times: int | None = 1) -> None:
        self._mode = _Mode("hang", times)

    def drop(self, *, times: int | None = 1) -> None:
        self._mode = _Mode("drop", times)

    def reset(self) -> None:
        self._mode = None

    def release(self) -> None:
        """Let hung requests go (their connections are then dropped)."""
        self._release.set()

    # -- lifecycle --

    def app(self) -> web.Application:
        """The provider's aiohttp application (bench/provider.py serves it on its own)."""
        app = web.Application(client_max_size=self.max_size * 2)
        app.router.add_post(self.route, self._handle)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the handler --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # the whole request has arrived before any failure
        self.requests_seen += 1
        mode = self._take_mode()
        if mode is not None and mode.kind == "status":
            return self.error(mode.status, mode.message, mode.code, headers=mode.headers)
        if mode is not None:
            if mode.kind == "hang":
                self.hanging.set()
                await self._release.wait()
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable()  # never reaches the closed connection
        if not self.authorized(request):
            return self.error(401, "unauthorized")
        if len(raw) > self.max_size:
            return self.error(413, f"request of {len(raw)} bytes is over {self.max_size}")
        try:
            body = self.validate(request, raw)
        except Rejection as exc:
            return self.error(exc.status, exc.message, exc.code)
        pid = self.new_id(next(self._ids))
        self.accepted_count += 1
        self.arrivals.append(time.monotonic())
        if self.keep_requests:
            self.requests.append(Recorded(request.path, request.headers, body, pid))
        return self.accepted(pid, body)

    def _take_mode(self) -> _Mode | None:
        mode = self._mode
        if mode is None:
            return None
        if mode.remaining is not None:
            mode.remaining -= 1
            if mode.remaining <= 0:
                self._mode = None
        return mode

    # -- what subclasses provide --

    @abc.abstractmethod
    def authorized(self, request: web.Request) -> bool: ...

    @abc.abstractmethod
    def validate(self, request: web.Request, raw: bytes) -> Any:
        """Parse and check the request like the real API; raise Rejection to refuse."""

    @abc.abstractmethod
    def accepted(self, provider_id: str, body: Any) -> web.Response: ...

    @abc.abstractmethod
    def error(
        self,
        status: int,
        message: str,
        code: str | int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response: ...

    def new_id(self, n: int) -> str:
        return f"{type(self).__name__.lower()}-{n}"

    # -- helpers for subclasses --

    @staticmethod
    def json_body(request: web.Request, raw: bytes, status: int = 400) -> Any:
        if request.content_type != "application/json":
            raise Rejection(
                415, f"Content-Type must be application/json, not {request.content_type}"
            )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Rejection(status, f"invalid JSON: {exc}") from None


def _b64(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        return False
    return True


def _emails(items: object) -> list[str]:
    if not isinstance(items, list):
        return []
    return [str(i.get("email", "")) for i in items if isinstance(i, dict)]


# -- SendGrid ---------------------------------------------------------------------------


class FakeSendGrid(FakeProvider):
    """POST /v3/mail/send: Bearer key, JSON, 202 + X-Message-Id; errors {"errors": [...]}."""

    route = "/v3/mail/send"
    max_size = 30 * 1000**2
    RESERVED = frozenset(
        {
            "x-sg-id",
            "x-sg-eid",
            "received",
            "dkim-signature",
            "content-type",
            "content-transfer-encoding",
            "to",
            "from",
            "subject",
            "reply-to",
            "cc",
            "bcc",
        }
    )

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def validate(self, request: web.Request, raw: bytes) -> Any:
        doc = self.json_body(request, raw)
        personalizations = doc.get("personalizations")
        if not isinstance(personalizations, list) or not 1 <= len(personalizations) <= 1000:
            raise Rejection(
                400,
                "The personalizations field is required and must have at "
                "least one personalization.",
                "personalizations",
            )
        for p in personalizations:
            if not _emails(p.get("to")) or not all(_emails(p.get("to"))):
                raise Rejection(
                    400,
                    "The to array is required for all personalization "
                    "objects, and must have at least one email object with a "
                    "valid email address.",
                    "personalizations.0.to",
                )
            everyone = [e.lower() for k in ("to", "cc", "bcc") for e in _emails(p.get(k))]
            if len(everyone) != len(set(everyone)):
                raise Rejection(
                    400,
                    "Each email address in the personalization block should "
                    "be unique between to, cc, and bcc.",
                    "personalizations.0",
                )
        if not isinstance(doc.get("from"), dict) or not doc["from"].get("email"):
            raise Rejection(400, "The from object must be provided for every email send.", "from")
        if not doc.get("subject") and not all(p.get("subject") for p in personalizations):
            raise Rejection(400, "The subject is required.", "subject")
        content = doc.get("content")
        if (
            not isinstance(content, list)
            or not content
            or not all(isinstance(c, dict) and c.get("type") and c.get("value") for c in content)
        ):
            raise Rejection(
                400,
                "Unless a valid template_id is provided, the content parameter is required.",
                "content",
            )
        types = [c["type"] for c in content]
        if "text/plain" in types and types[0] != "text/plain":
            raise Rejection(
                400,
                "If present, text/plain must be first, followed by "
                "text/html, followed by any other content.",
                "content",
            )
        for a in doc.get("attachments", []):
            if not _b64(a.get("content")) or not a.get("filename"):
                raise Rejection(
                    400,
                    "The attachment content must be base64 encoded and have a filename.",
                    "attachments.0",
                )
            if a.get("disposition", "attachment") not in ("inline", "attachment"):
                raise Rejection(400, "Invalid disposition.", "attachments.0.disposition")
            if a.get("disposition") == "inline" and not a.get("content_id"):
                raise Rejection(
                    400,
                    "The content_id is required for inline attachments.",
                    "attachments.0.content_id",
                )
        headers = doc.get("headers", {})
        for name, value in headers.items():
            if name.lower() in self.RESERVED or not isinstance(value, str):
                raise Rejection(400, f"The {name} header is reserved or not a string.", "headers")
        if "reply_to" in doc and "reply_to_list" in doc:
            raise Rejection(400, "reply_to and reply_to_list are mutually exclusive.", "reply_to")
        if not all(isinstance(v, str) for v in doc.get("custom_args", {}).values()):
            raise Rejection(400, "custom_args values must be strings.", "custom_args")
        return doc

    def accepted(self, provider_id: str, body: Any) -> web.Response:
        return web.Response(status=202, headers={"X-Message-Id": provider_id})

    def error(
        self,
        status: int,
        message: str,
        code: str | int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status == 401:
            message = "The provided authorization grant is invalid, expired, or revoked"
        return web.json_response(
            {"errors": [{"message": message, "field": code, "help": None}]},
            status=status,
            headers=headers,
        )


# -- Mailgun ----------------------------------------------------------------------------


class FakeMailgun(FakeProvider):
    """POST /v3/{domain}/messages.mime: Basic api:key, multipart form with `to` and the
    `message` file; 200 {"id", "message"}; errors {"message"}; bad key: "Forbidden"."""

    route = "/v3/{domain}/messages.mime"
    max_size = 25 * 1000**2

    def __init__(self, api_key: str = FAKE_KEY, domain: str = "mg.example.com") -> None:
        super().__init__(api_key)
        self.domain = domain

    def authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"api:{self.api_key}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    def validate(self, request: web.Request, raw: bytes) -> Any:
        if request.match_info["domain"] != self.domain:
            raise Rejection(404, f"Domain not found: {request.match_info['domain']}")
        form = _parse_form(request.headers.get("Content-Type", ""), raw)
        if not form.get("to"):
            raise Rejection(400, "'to' parameter is missing")
        if not form.get("message"):
            raise Rejection(400, "'message' parameter is missing")
        for name, values in form.items():
            # Custom variables (v:NAME) come back in every event's user-variables: one
            # value per name, and a name after the prefix.
            if name.startswith("v:") and (name == "v:" or len(values) != 1):
                raise Rejection(400, f"'{name}' must be one custom variable with one value")
        return form

    def new_id(self, n: int) -> str:
        return f"20240101000000.{n}.fake@{self.domain}"

    def accepted(self, provider_id: str, body: Any) -> web.Response:
        return web.json_response({"id": f"<{provider_id}>", "message": "Queued. Thank you."})

    def error(
        self,
        status: int,
        message: str,
        code: str | int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status == 401:
            return web.Response(status=401, text="Forbidden", headers=headers)
        return web.json_response({"message": message}, status=status, headers=headers)


def _parse_form(content_type: str, raw: bytes) -> dict[str, list[Any]]:
    """multipart/form-data → {name: [str, or bytes for file parts]}, checked strictly."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise Rejection(400, "expected multipart/form-data")
    delimiter = b"--" + boundary.encode()
    chunks = raw.split(b"\r\n" + delimiter)
    if not chunks[0].startswith(delimiter) or not chunks[-1].startswith(b"--"):
        raise Rejection(400, "malformed multipart body")
    form: dict[str, list[Any]] = {}
    for chunk in [chunks[0][len(delimiter) :], *chunks[1:-1]]:
        head, sep, value = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise Rejection(400, "malformed multipart part")
        part = Message()
        for line in head.decode().split("\r\n"):
            name, _, val = line.partition(":")
            part[name.strip()] = val.strip()
        field_name = part.get_param("name", header="Content-Disposition")
        is_file = part.get_param("filename", header="Content-Disposition") is not None
        form.setdefault(str(field_name), []).append(value if is_file else value.decode())
    return form


# -- SparkPost --------------------------------------------------------------------------


class FakeSparkPost(FakeProvider):
    """POST /api/v1/transmissions: Authorization is the key; JSON; 200 {"results": {...}};
    errors {"errors": [{"message", "code", "description"}]}."""

    route = "/api/v1/transmissions"
    reject_status = 422
    DEFAULT_CODES = {400: "1902", 403: "1100", 420: "2101", 422: "1300"}

    def authorized(self, request: web.Request) -> bool:
        basic = base64.b64encode(f"{self.api_key}:".encode()).decode()
        return request.headers.get("Authorization") in (self.api_key, f"Basic {basic}")

    def validate(self, request: web.Request, raw: bytes) -> Any:
        doc = self.json_body(request, raw, status=422)
        recipients = doc.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise Rejection(422, "recipients is a required field", "1400")
        for r in recipients:
            address = r.get("address") if isinstance(r, dict) else None
            email = address.get("email") if isinstance(address, dict) else address
            if not isinstance(email, str) or "@" not in email:
                raise Rejection(422, "Invalid recipient address", "1300")
        content = doc.get("content")
        if not isinstance(content, dict):
            raise Rejection(422, "content is a required field", "1400")
        if "email_rfc822" in content and {"html", "text", "template_id"} & content.keys():
            raise Rejection(422, "Invalid combination of fields", "1301")
        if not isinstance(content.get("email_rfc822", content.get("text")), str):
            raise Rejection(422, "content must have email_rfc822, text or html", "1400")
        if "metadata" in doc and not isinstance(doc["metadata"], dict):
            raise Rejection(422, "metadata must be a JSON object", "1300")
        return doc

    def accepted(self, provider_id: str, body: Any) -> web.Response:
        return web.json_response(
            {
                "results": {
                    "total_rejected_recipients": 0,
                    "total_accepted_recipients": len(body["recipients"]),
                    "id": provider_id,
                }
            }
        )

    def new_id(self, n: int) -> str:
        return str(84_000_000_000_000_000 + n)  # SparkPost ids are long decimal strings

    def error(
        self,
        status: int,
        message: str,
        code: str | int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status == 401:
            return web.json_response({"errors": [{"message": "Unauthorized."}]}, status=401)
        code = code or self.DEFAULT_CODES.get(status)
        entry = {"message": message, **({"code": str(code)} if code else {})}
        return web.json_response({"errors": [entry]}, status=status, headers=headers)


# -- Postmark ---------------------------------------------------------------------------


class FakePostmark(FakeProvider):
    """POST /email: X-Postmark-Server-Token; JSON; 200 {"MessageID", "ErrorCode": 0, ...};
    errors {"ErrorCode", "Message"}, 422 for a refused message."""

    route = "/email"
    reject_status = 422
    max_size = 10 * 1000**2
    DEFAULT_CODES = {401: 10, 422: 300, 429: 429}

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("X-Postmark-Server-Token") == self.api_key

    def validate(self, request: web.Request, raw: bytes) -> Any:
        if request.content_type != "application/json":
            raise Rejection(422, "JSON required", 409)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Rejection(422, "Invalid JSON", 402) from None
        if not doc.get("From"):
            raise Rejection(422, "Invalid 'From' address: ''.", 300)
        if not doc.get("To"):
            raise Rejection(422, "Zero recipients specified", 300)
        count = sum(
            len(str(doc.get(k) or "").split(",")) for k in ("To", "Cc", "Bcc") if doc.get(k)
        )
        if count > 50:
            raise Rejection(422, "Maximum of 50 recipients allowed.", 300)
        if not doc.get("TextBody") and not doc.get("HtmlBody"):
            raise Rejection(422, "Provide either email TextBody or HtmlBody or both.", 300)
        for a in doc.get("Attachments", []):
            if not a.get("Name") or not a.get("ContentType") or not _b64(a.get("Content")):
                raise Rejection(422, "Attachments need Name, ContentType and base64 Content.", 300)
        for h in doc.get("Headers", []):
            if not isinstance(h, dict) or not h.get("Name") or not isinstance(h.get("Value"), str):
                raise Rejection(422, "Headers must be a list of Name/Value objects.", 403)
        return doc

    def accepted(self, provider_id: str, body: Any) -> web.Response:
        return web.json_response(
            {
                "To": body["To"],
                "SubmittedAt": "2024-01-01T00:00:00Z",
                "MessageID": provider_id,
                "ErrorCode": 0,
                "Message": "OK",
            }
        )

    def error(
        self,
        status: int,
        message: str,
        code: str | int | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        if status == 401:
            code, message = 10, "Request does not contain a valid Server token."
        code = code if code is not None else self.DEFAULT_CODES.get(status, 0)
        return web.json_response(
            {"ErrorCode": code, "Message": message}, status=status, headers=headers
        )
