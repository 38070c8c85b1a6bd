"""/api/v1/suppressions: read (role read) and change (role admin) the suppression list.

Changes go through this process's `SuppressionList` when it has one, so the next SMTP
RCPT or HTTP submission in this process already sees them (the other processes follow
within their poll interval). Each entry added here names the token as its source.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.queue.base import Suppression, SuppressionStore
from relay.suppression import check_address, check_scope, operator_entry
from relay.web.api.compose import invalid
from relay.web.api.inputs import (
    MAX_FILTER_TEXT,
    SMALL_BODY,
    json_object,
    single_params,
)
from relay.web.auth import require
from relay.web.context import CONTEXT, WebContext
from relay.web.errors import http_error

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
FIELDS = ("address", "reason", "scope", "expires", "detail")


def _ctx(request: web.Request) -> WebContext:
    return request.app[CONTEXT]


def _store(ctx: WebContext) -> SuppressionStore:
    return ctx.suppressions.store if ctx.suppressions is not None else ctx.queue.suppressions


def entry_json(entry: Suppression) -> dict[str, Any]:
    return entry.as_dict()


def _limit(params: dict[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid("limit", f"give a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


async def list_suppressions(request: web.Request) -> web.Response:
    require(request, "read")
    params = single_params(request)
    unknown = sorted(set(params) - {"search", "after", "limit"})
    if unknown:
        raise invalid(unknown[0], "unknown parameter; this takes search, after and limit")
    limit = _limit(params)
    search = params.get("search") or None
    after = params.get("after") or None
    for name, value in (("search", search), ("after", after)):
        if value is not None and len(value) > MAX_FILTER_TEXT:
            raise invalid(name, f"at most {MAX_FILTER_TEXT} characters")
    rows = await _store(_ctx(request)).list(contains=search, after=after, limit=limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return web.json_response(
        {
            "suppressions": [entry_json(e) for e in page],
            "next_cursor": page[-1].cursor if more else None,
        }
    )


async def add_suppression(request: web.Request) -> web.Response:
    principal = require(request, "admin")
    ctx = _ctx(request)
    payload = await json_object(request, limit=SMALL_BODY)
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise invalid(unknown[0], f"unknown field; give {', '.join(FIELDS)}")
    if "address" not in payload:
        raise invalid("address", "required: the address to stop mailing")
    for name in FIELDS:
        value = payload.get(name)
        if name == "expires" and isinstance(value, int | float) and not isinstance(value, bool):
            continue
        if value is not None and not isinstance(value, str):
            raise invalid(name, "must be a string")
    entry = _entry(payload, source=principal.actor, now=ctx.clock())
    if ctx.suppressions is not None:
        await ctx.suppressions.add([entry])
    else:
        await ctx.queue.suppressions.add([entry])
    return web.json_response({"suppression": entry_json(entry)}, status=201)


def _entry(payload: dict[str, Any], *, source: str, now: float) -> Suppression:
    """The entry the payload asks for; a wrong value is a 400 naming its field."""
    detail = payload.get("detail") or ""
    if len(detail) > 1000:
        raise invalid("detail", "at most 1000 characters")
    try:
        check_address(payload["address"])
    except ValueError as exc:
        raise invalid("address", str(exc)) from None
    try:
        check_scope(payload.get("scope"))
    except ValueError as exc:
        raise invalid("scope", str(exc)) from None
    try:
        return operator_entry(
            payload["address"],
            source=source,
            now=now,
            reason=payload.get("reason"),
            scope=payload.get("scope"),
            expires=payload.get("expires"),
            detail=detail,
        )
    except ValueError as exc:
        field = "expires" if str(exc).startswith("expires") else "reason"
        raise invalid(field, str(exc)) from None


async def remove_suppression(request: web.Request) -> web.Response:
    require(request, "admin")
    ctx = _ctx(request)
    params = single_params(request)
    unknown = sorted(set(params) - {"scope"})
    if unknown:
        raise invalid(unknown[0], "unknown parameter; this takes scope")
    try:
        address = check_address(request.match_info["address"])
    except ValueError as exc:
        raise invalid("address", str(exc)) from None
    scope: str | None = None
    if "scope" in params:
        try:
            scope = check_scope(params["scope"])
        except ValueError as exc:
            raise invalid("scope", str(exc)) from None
    if ctx.suppressions is not None:
        removed = await ctx.suppressions.remove(address, scope=scope)
    else:
        removed = await ctx.queue.suppressions.remove(address, scope=scope)
    if not removed:
        where = "" if scope is None else f" in scope {scope or '(every sender)'!r}"
        raise http_error(404, "not_found", f"{address} is not on the suppression list{where}")
    return web.json_response({"address": address, "scope": scope, "removed": removed})
