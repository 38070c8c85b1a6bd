"""Reading the search form: text fields, and times written as UTC dates or epoch seconds."""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping

from relay.queue.base import SEARCH_KINDS, MessageQuery
from relay.web.api.inputs import MESSAGE_ID

STATE_CHOICES = ("queued", "sending", "deferred", "held", "sent", "failed")
KIND_CHOICES = SEARCH_KINDS
TIME_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")
PAGE_SIZE = 50


class FormError(ValueError):
    """A field the operator filled in wrongly: the field and what to write instead."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_time(field: str, text: str) -> float | None:
    """A time from the form: '2025-06-01T14:30' (UTC, as the form says) or epoch seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in TIME_FORMATS:
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise FormError(field, f"{field}: write a UTC time such as 2025-06-01T14:30, not {text!r}")


def page_cursor(value: str) -> str | None:
    """A page cursor (a message id) or none; anything else is the form's error, never a
    string handed to the database."""
    value = value.strip()
    if not value:
        return None
    if not MESSAGE_ID.fullmatch(value):
        raise FormError("before", "before: not a page cursor; start from the first page")
    return value


def message_query(form: Mapping[str, str]) -> MessageQuery:
    """The search the form asks for (empty fields are no filter)."""

    def text(name: str) -> str | None:
        value = form.get(name, "").strip()
        return value or None

    state, kind = text("state"), text("kind")
    if state is not None and state not in STATE_CHOICES:
        raise FormError("state", f"state: one of {', '.join(STATE_CHOICES)}")
    if kind is not None and kind not in KIND_CHOICES:
        raise FormError("kind", f"kind: one of {', '.join(KIND_CHOICES)}")
    return MessageQuery(
        state=state,
        kind=kind,
        sender=text("sender"),
        recipient=text("recipient"),
        subject=text("subject"),
        upstream=text("upstream"),
        since=parse_time("since", form.get("since", "")),
        until=parse_time("until", form.get("until", "")),
        before=page_cursor(form.get("before", "")),
        limit=PAGE_SIZE,
    )
