"""Send a test message: the same path as POST /api/v1/messages, from a form, to check a
configuration end to end (the token's allowed senders and limits apply)."""

from __future__ import annotations

import re

from aiohttp import web

from relay.web.auth import Principal
from relay.web.context import CONTEXT
from relay.web.pages.guard import page
from relay.web.pages.render import render

FIELDS = ("from", "to", "subject", "body")
MESSAGE_ID = re.compile(r"^[0-9A-Z]{10,40}$")


def _show(
    request: web.Request,
    principal: Principal,
    form: dict[str, str],
    *,
    error: str = "",
    field: str = "",
    sent: str = "",
    status: int = 200,
) -> web.Response:
    return render(
        request,
        "send.html",
        {
            "form": form,
            "error": error,
            "error_field": field,
            "sent": sent,
            "may_send": principal.can("submit"),
        },
        status=status,
        section="send",
    )


@page()
async def send_form(request: web.Request, principal: Principal) -> web.StreamResponse:
    sent = request.query.get("sent", "")
    form = dict.fromkeys(FIELDS, "")
    form["subject"] = "Test message from the relay"
    form["body"] = "This is a test message sent from the relay's status page."
    return _show(request, principal, form, sent=sent if MESSAGE_ID.match(sent) else "")


@page("submit")
async def send(request: web.Request, principal: Principal) -> web.StreamResponse:
    from relay.web.api.submit import Origin, SubmitError, count_submission, submit_json

    posted = await request.post()
    form = {k: str(posted.get(k) or "") for k in FIELDS}
    recipients = [r.strip() for r in re.split(r"[,;\s]+", form["to"]) if r.strip()]
    payload = {
        "from": form["from"].strip(),
        "to": recipients,
        "subject": form["subject"],
        "text": form["body"],
    }
    ctx = request.app[CONTEXT]
    try:
        origin = Origin(client=request.remote or "unknown", tls=request.secure, via="page")
        msg_id, _ = await submit_json(ctx, principal, payload, origin=origin)
    except SubmitError as exc:
        count_submission(ctx, "page", exc)
        return _show(
            request,
            principal,
            form,
            error=exc.message,
            field=exc.field or "",
            status=exc.status,
        )
    count_submission(ctx, "page", None)
    raise web.HTTPSeeOther(f"/send?sent={msg_id}")
