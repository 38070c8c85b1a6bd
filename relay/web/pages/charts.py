"""Throughput charts drawn on the server as SVG, from the stats series.

The plot is an SVG stretched to its box (bars and lines only, strokes that do not scale),
while the axis labels are HTML around it: text stays sharp and readable at any width,
from a phone to a wide screen, with no chart library and no script.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from html import escape
from typing import Any

from markupsafe import Markup

# Stacked from the bottom, in this order; "received" is drawn as a line over the bars.
STACK = ("sent", "deferred", "failed")
SLOT = 10.0  # viewBox units per interval
BAR = 7.0
HEIGHT = 100.0


@dataclass(frozen=True, slots=True)
class Chart:
    svg: Markup
    y_labels: tuple[str, str, str]  # top, middle, bottom
    x_labels: tuple[str, str, str]  # start, middle, end
    totals: dict[str, int]
    empty: bool


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times 10^k at or above `value` (an axis top people can read)."""
    if value <= 1:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return float(10 * magnitude)


def _count(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if value % 1 else f"{int(value)}"


def _clock(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def throughput_chart(series: list[dict[str, Any]], *, title: str) -> Chart:
    """A stacked bar per interval (sent, deferred, failed) with received as a line."""
    n = max(len(series), 1)
    totals = {k: int(sum(float(p.get(k) or 0) for p in series)) for k in ("received", *STACK)}
    peak = max(
        [float(p.get("received") or 0) for p in series]
        + [sum(float(p.get(k) or 0) for k in STACK) for p in series]
        + [0.0]
    )
    top = nice_ceiling(peak)
    scale = HEIGHT / top
    width = n * SLOT
    parts = [
        f'<svg class="plot" viewBox="0 0 {width:g} {HEIGHT:g}" preserveAspectRatio="none"'
        f' role="img" aria-label="{escape(title)}">'
    ]
    for y in (0.5, HEIGHT / 2, HEIGHT - 0.5):
        parts.append(
            f'<line class="grid" x1="0" x2="{width:g}" y1="{y:g}" y2="{y:g}"'
            ' vector-effect="non-scaling-stroke"/>'
        )
    points = []
    for i, p in enumerate(series):
        x = i * SLOT + (SLOT - BAR) / 2
        base = HEIGHT
        for key in STACK:
            value = float(p.get(key) or 0)
            if value <= 0:
                continue
            h = value * scale
            base -= h
            parts.append(
                f'<rect class="bar {key}" x="{x:g}" y="{base:.2f}" width="{BAR:g}"'
                f' height="{h:.2f}"/>'
            )
        start = float(p.get("start") or 0)
        tip = (
            f"{_clock(start)} UTC: received {_count(float(p.get('received') or 0))},"
            f" sent {_count(float(p.get('sent') or 0))},"
            f" deferred {_count(float(p.get('deferred') or 0))},"
            f" failed {_count(float(p.get('failed') or 0))}"
        )
        parts.append(
            f'<rect class="hit" x="{i * SLOT:g}" y="0" width="{SLOT:g}" height="{HEIGHT:g}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        received = float(p.get("received") or 0)
        points.append(f"{i * SLOT + SLOT / 2:g},{HEIGHT - received * scale:.2f}")
    if len(points) > 1:
        parts.append(
            f'<polyline class="line received" points="{" ".join(points)}"'
            ' vector-effect="non-scaling-stroke"/>'
        )
    parts.append("</svg>")
    if series:
        first = float(series[0].get("start") or 0)
        step = float(series[1]["start"]) - first if len(series) > 1 else 0.0
        end = float(series[-1].get("start") or 0) + step
        x_labels = (_clock(first), _clock((first + end) / 2), _clock(end))
    else:
        x_labels = ("", "", "")
    return Chart(
        svg=Markup("".join(parts)),
        y_labels=(_count(top), _count(top / 2), "0"),
        x_labels=x_labels,
        totals=totals,
        empty=peak == 0,
    )
