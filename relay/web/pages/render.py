"""Rendering the pages: the Jinja2 environment, the formats people read, and the headers
every page carries.

Autoescaping is on for every template (a subject such as `<script>` is text, never markup);
the only markup that bypasses it is the SVG the chart module builds from numbers. The
Content-Security-Policy allows scripts and styles from this server only, so even a
template mistake could not run an injected inline script.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from relay.web.auth import CSRF, CSRF_FIELD, PRINCIPAL
from relay.web.context import CONTEXT

TEMPLATES = Path(__file__).parent / "templates"
JINJA: web.AppKey[jinja2.Environment] = web.AppKey("pages_jinja")
DASH = "\u2013"  # an en dash: "no figure" in a table
NAV = (
    ("overview", "/", "Overview"),
    ("messages", "/messages", "Messages"),
    ("upstreams", "/upstreams", "Upstreams"),
    ("inbound", "/inbound", "Inbound"),
    ("suppressions", "/suppressions", "Suppressions"),
    ("send", "/send", "Send a test"),
)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def utc(t: float | None) -> str:
    """An epoch time as people read it, always in UTC (the server's and the viewer's
    zones may differ; the timeline must read the same to both)."""
    if t is None:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def iso(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ago(t: float | None, now: float) -> str:
    """'3 min ago' or 'in 2 h': how far a time is from now, at one useful precision."""
    if t is None:
        return ""
    delta = now - t
    if abs(delta) < 5:
        return "just now"
    text = _span(abs(delta))
    return f"{text} ago" if delta > 0 else f"in {text}"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


def duration(seconds: float | None) -> str:
    """A length of time: '850 ms', '4.2 s', '3 min 10 s', '2 h 5 min'."""
    if seconds is None:
        return DASH
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def percent(ratio: float | None) -> str:
    if ratio is None:
        return DASH
    return f"{ratio * 100:.1f} %" if ratio < 1 else "100 %"


def fine_percent(ratio: float | None) -> str:
    """Bounce and complaint rates: providers act at 0.1 % of complaints, so two decimals."""
    if ratio is None:
        return DASH
    return f"{ratio * 100:.2f} %"


# Timeline keys the list shows in their own columns; the rest go on a detail line.
EVENT_COLUMNS = frozenset(
    {"at", "type", "upstream", "outcome", "duration_ms", "by", "reason", "refused"}
)
TIME_KEYS = frozenset({"next_attempt", "retry_at", "until"})


def event_extra(event: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The details of a timeline event beyond its columns, as short readable text."""
    extra = []
    for key, value in event.items():
        if key in EVENT_COLUMNS or value in (None, "", [], {}):
            continue
        if key in TIME_KEYS and isinstance(value, int | float):
            text = utc(float(value))
        else:
            text = _plain(value)
        extra.append((key.replace("_", " "), text if len(text) <= 300 else text[:300] + "…"))
    return extra


def _plain(value: Any) -> str:
    """Nested detail (lists, objects) as short text rather than Python's repr."""
    if isinstance(value, list | tuple):
        return "; ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_plain(v)}" for k, v in value.items())
    return str(value)


def size(n: int | None) -> str:
    if n is None:
        return DASH
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        app_key=JINJA,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        default_helpers=False,
    )
    env.globals.update(
        utc=utc,
        iso=iso,
        ago=ago,
        duration=duration,
        percent=percent,
        fine_percent=fine_percent,
        event_extra=event_extra,
    )
    env.filters.update(size=size)


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
    section: str = "",
) -> web.Response:
    """A page (or a fragment) with the caller, its CSRF token and the clock in scope."""
    values: dict[str, Any] = {
        "principal": request[PRINCIPAL],
        "csrf": request[CSRF],
        "csrf_field": CSRF_FIELD,
        "now": request.app[CONTEXT].clock(),
        "nav": NAV,
        "section": section,
        "path": request.path_qs,
    }
    values.update(context or {})
    response = aiohttp_jinja2.render_template(
        template, request, values, app_key=JINJA, status=status
    )
    response.headers.update(SECURITY_HEADERS)
    return response
