"""Reading what an API request carries: bodies with a size cap, JSON, and the search
filters. Every problem is a 4xx `SubmitError` naming the parameter or field at fault,
never a 5xx: the API is fuzzed with invalid input in the tests."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.message import Status
from relay.queue.base import SEARCH_KINDS, MessageQuery
from relay.web.api.compose import SubmitError, invalid
from relay.web.errors import json_error

#: What GET /api/v1/messages and the bulk retry filter understand.
FILTERS = ("state", "kind", "sender", "recipient", "subject", "upstream", "since", "until")
STATES = tuple(s.value for s in Status)
KINDS = SEARCH_KINDS
MESSAGE_ID = re.compile(r"[0-9A-Z]{1,40}")
MAX_FILTER_TEXT = 320
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
SMALL_BODY = 64 * 1024
JSON_TYPES = ("application/json",)


async def read_body(request: web.Request, *, limit: int) -> bytes:
    """The request body, refusing (413) one longer than `limit` before reading it when
    Content-Length says so, else as soon as more than `limit` bytes arrived."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> SubmitError:
    return SubmitError(
        413,
        "request_too_large",
        f"the request body is {size}{'+' if size > limit else ''} bytes; this endpoint takes"
        f" at most {limit} (smtp.max_message_size sets the limit for messages)",
        "body",
    )


def is_json(request: web.Request) -> bool:
    ctype = request.content_type
    return ctype in JSON_TYPES or ctype.endswith("+json")


def parse_json(data: bytes) -> Any:
    """The JSON document in `data`; 400 naming where it is broken."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise SubmitError(
            400,
            "invalid_json",
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "body",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise SubmitError(
            400, "invalid_json", f"the body is not valid JSON: {exc}", "body"
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def json_object(
    request: web.Request, *, limit: int, empty_ok: bool = False
) -> dict[str, Any]:
    """A JSON object body (an empty body counts as {} when `empty_ok`)."""
    data = await read_body(request, limit=limit)
    if not data.strip() and empty_ok:
        return {}
    if not is_json(request):
        raise SubmitError(
            415, "unsupported_media_type", "send the body as Content-Type: application/json", None
        )
    payload = parse_json(data)
    if not isinstance(payload, dict):
        raise SubmitError(400, "invalid_json", "the body must be a JSON object", "body")
    return payload


def message_query(params: dict[str, Any], *, max_limit: int = MAX_LIMIT) -> MessageQuery:
    """A MessageQuery from query parameters or a JSON filter: each value checked, unknown
    names refused (a misspelt filter must not silently match everything)."""
    known = (*FILTERS, "before", "limit")
    for name in params:
        if name not in known:
            raise invalid(name, f"unknown parameter; the filters are {', '.join(known)}")
    state = _choice(params, "state", STATES)
    kind = _choice(params, "kind", KINDS)
    texts = {
        name: _filter_text(params, name) for name in ("sender", "recipient", "subject", "upstream")
    }
    since, until = _time(params, "since"), _time(params, "until")
    before = params.get("before")
    if before is not None and (not isinstance(before, str) or not MESSAGE_ID.fullmatch(before)):
        raise invalid("before", "use the next_cursor value of the previous page")
    return MessageQuery(
        state=state,
        kind=kind,
        since=since,
        until=until,
        before=before,
        limit=_limit(params.get("limit"), max_limit),
        **texts,
    )


def _choice(params: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise invalid(name, f"must be one of {', '.join(allowed)}")
    return str(value)


def _filter_text(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(name, "must be a string")
    if len(value) > MAX_FILTER_TEXT:
        raise invalid(name, f"is longer than {MAX_FILTER_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate is no text to search
        raise invalid(name, "is not Unicode text (it holds a lone surrogate)") from None
    return value


def _time(params: dict[str, Any], name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise invalid(name, "must be epoch seconds or an ISO 8601 time")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise invalid(
                    name, "must be epoch seconds or an ISO 8601 time (2026-01-31T12:00:00Z)"
                ) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    else:
        raise invalid(name, "must be epoch seconds or an ISO 8601 time")
    if not 0 <= seconds < 1e11:
        raise invalid(name, "is not a time this relay can have seen")
    return seconds


def _limit(value: Any, maximum: int) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    if isinstance(value, bool):
        raise invalid("limit", f"must be a whole number from 1 to {maximum}")
    try:
        limit = int(value) if isinstance(value, (int, str)) else -1
    except ValueError:
        limit = -1
    if not 1 <= limit <= maximum:
        raise invalid("limit", f"must be a whole number from 1 to {maximum}")
    return limit


def error_response(exc: SubmitError) -> web.Response:
    """The JSON 4xx (or 503 with Retry-After) a refused request gets."""
    extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
    response = json_error(exc.status, exc.code, exc.message, **extra)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def single_params(request: web.Request) -> dict[str, str]:
    """Query parameters that may appear once each (a repeat is refused by name)."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name in params:
            raise invalid(name, "given more than once")
        params[name] = value
    return params
