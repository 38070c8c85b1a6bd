"""The suppression list: search it, add an address, lift one (admin).

Changes go through this process's `SuppressionList`, so the relay refuses (or takes) the
address from the next RCPT TO on; the entry names the logged-in token as its source.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from relay.suppression import REASON_TEXT, check_address, check_scope, operator_entry
from relay.web.auth import Principal
from relay.web.context import CONTEXT, WebContext
from relay.web.pages.guard import page
from relay.web.pages.render import render

PAGE_SIZE = 100
ADD_FIELDS = ("address", "scope", "reason", "expires", "detail")
MAX_SEARCH = 320
REASONS = ("manual", "hard_bounce", "complaint", "unsubscribe")


async def _show(
    request: web.Request,
    *,
    form: dict[str, str] | None = None,
    error: str = "",
    error_field: str = "",
    done: str = "",
    status: int = 200,
) -> web.Response:
    ctx = request.app[CONTEXT]
    search = request.query.get("search", "").strip()[:MAX_SEARCH]
    after = request.query.get("after", "").strip()[:MAX_SEARCH] or None
    store = ctx.suppressions.store if ctx.suppressions is not None else ctx.queue.suppressions
    rows = await store.list(contains=search or None, after=after, limit=PAGE_SIZE + 1)
    entries = rows[:PAGE_SIZE]
    more = ""
    if len(rows) > PAGE_SIZE:
        more = "/suppressions?" + urlencode({"search": search, "after": entries[-1].cursor})
    return render(
        request,
        "suppressions.html",
        {
            "entries": entries,
            "search": search,
            "paged": after is not None,
            "first": "/suppressions?" + urlencode({"search": search})
            if search
            else "/suppressions",
            "more": more,
            "form": form or dict.fromkeys(ADD_FIELDS, ""),
            "reasons": REASONS,
            "reason_text": REASON_TEXT,
            "error": error,
            "error_field": error_field,
            "done": done,
            "refusing": _policy(ctx),
        },
        status=status,
        section="suppressions",
    )


def _policy(ctx: WebContext) -> str:
    """One sentence on what the relay does with a listed address now."""
    cfg = ctx.config.suppression
    if not cfg.enabled:
        return (
            "The list is not applied ([suppression] enabled = false): listed addresses are mailed."
        )
    if cfg.action == "refuse":
        return "Listed addresses are refused at RCPT TO (550 5.1.1) and by the HTTP API (422)."
    return "Listed addresses are accepted, then failed at dispatch with a bounce to the sender."


@page()
async def suppression_list(request: web.Request, principal: Principal) -> web.StreamResponse:
    done = request.query.get("done", "")
    address = request.query.get("address", "")
    text = {"added": f"{address} is suppressed.", "removed": f"{address} may be mailed again."}
    return await _show(request, done=text.get(done, "") if address else "")


@page("admin")
async def suppression_add(request: web.Request, principal: Principal) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    posted = await request.post()
    form = {k: str(posted.get(k) or "").strip() for k in ADD_FIELDS}
    try:
        field = "address"
        check_address(form["address"])
        field = "scope"
        check_scope(form["scope"])
        field = "reason"
        if form["reason"] and form["reason"] not in REASONS:
            raise ValueError(f"choose one of {', '.join(REASONS)}")
        field = "detail"
        if len(form["detail"]) > 1000:
            raise ValueError("a note of at most 1000 characters")
        field = "expires"
        entry = operator_entry(
            form["address"],
            source=principal.actor,
            now=ctx.clock(),
            reason=form["reason"] or None,
            scope=form["scope"],
            expires=form["expires"] or None,
            detail=form["detail"],
        )
    except ValueError as exc:
        return await _show(
            request, form=form, error=f"{field}: {exc}", error_field=field, status=400
        )
    if ctx.suppressions is not None:
        await ctx.suppressions.add([entry])
    else:
        await ctx.queue.suppressions.add([entry])
    raise web.HTTPSeeOther(
        "/suppressions?" + urlencode({"done": "added", "address": entry.address})
    )


@page("admin")
async def suppression_remove(request: web.Request, principal: Principal) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    posted = await request.post()
    try:
        address = check_address(str(posted.get("address") or ""))
        scope = check_scope(str(posted.get("scope") or ""))
    except ValueError as exc:
        return await _show(request, error=str(exc), status=400)
    if ctx.suppressions is not None:
        removed = await ctx.suppressions.remove(address, scope=scope)
    else:
        removed = await ctx.queue.suppressions.remove(address, scope=scope)
    if not removed:
        return await _show(
            request, error=f"{address} was not on the list (removed meanwhile?)", status=404
        )
    raise web.HTTPSeeOther("/suppressions?" + urlencode({"done": "removed", "address": address}))
