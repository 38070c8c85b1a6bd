"""The page's formats and its server-drawn charts, apart from any server."""

from __future__ import annotations

import jinja2
import pytest

from relay.dispatch.routing import BreakerState
from relay.web.pages.charts import nice_ceiling, throughput_chart
from relay.web.pages.forms import FormError, message_query, parse_time
from relay.web.pages.guard import safe_next
from relay.web.pages.render import TEMPLATES, ago, duration, event_extra, percent, utc


def test_times_read_as_utc_and_distance_from_now() -> None:
    assert utc(0) == "1970-01-01 00:00:00 UTC"
    assert ago(1000.0, 1002.0) == "just now"
    assert ago(1000.0, 1000.0 + 180) == "3 min ago"
    assert ago(1000.0 + 7200, 1000.0) == "in 2 h"
    assert duration(0.25) == "250 ms" and duration(4.24) == "4.2 s"
    assert duration(190) == "3 min 10 s" and duration(None) == "\u2013"
    assert percent(0.9876) == "98.8 %" and percent(1.0) == "100 %"


@pytest.mark.parametrize(
    ("value", "top"), [(0, 1), (0.5, 1), (3, 5), (7, 10), (13, 20), (101, 200), (500, 500)]
)
def test_axis_tops_are_round(value: float, top: float) -> None:
    assert nice_ceiling(value) == top


def test_the_chart_stacks_outcomes_and_escapes_its_tooltips() -> None:
    series = [
        {"start": 60.0 * i, "received": i, "sent": i, "deferred": 1, "failed": 0} for i in range(4)
    ]
    chart = throughput_chart(series, title='a <b> "title"')
    svg = str(chart.svg)
    assert svg.count('class="bar sent"') == 3  # the first interval sent nothing
    assert svg.count('class="bar deferred"') == 4
    assert 'aria-label="a &lt;b&gt; &quot;title&quot;"' in svg
    assert chart.totals == {"received": 6, "sent": 6, "deferred": 4, "failed": 0}
    assert chart.y_labels == ("5", "2.5", "0")
    assert chart.x_labels == ("00:00", "00:02", "00:04")
    assert not chart.empty
    assert throughput_chart([], title="nothing").empty


def test_search_times_are_utc_dates_or_epoch_seconds() -> None:
    assert parse_time("since", "1970-01-02T00:00") == 86400.0
    assert parse_time("since", "86400") == 86400.0
    assert parse_time("since", " ") is None
    with pytest.raises(FormError, match="since: write a UTC time"):
        parse_time("since", "last week")
    query = message_query({"recipient": " alice ", "state": "held", "until": "1970-01-02"})
    assert (query.recipient, query.state, query.until) == ("alice", "held", 86400.0)
    with pytest.raises(FormError, match="state: one of"):
        message_query({"state": "lost"})


def test_event_details_are_text_not_python() -> None:
    event = {
        "at": 1.0,
        "type": "sent",
        "deliveries": [{"upstream": "ses", "provider_id": "X1", "recipients": ["a@b.c"]}],
        "next_attempt": 0.0,
        "empty": [],
    }
    assert event_extra(event) == [
        ("deliveries", "upstream ses, provider id X1, recipients a@b.c"),
        ("next attempt", "1970-01-01 00:00:00 UTC"),
    ]


def test_after_login_only_paths_on_this_site() -> None:
    assert safe_next("/messages?state=failed") == "/messages?state=failed"
    for target in (None, "", "//evil.example", "https://evil.example", "/\\evil", "/login"):
        assert safe_next(target) == "/"
    # Browsers drop tabs and line breaks from a URL before reading it, so "/\t/evil"
    # is "//evil": off the site. A header cannot carry a line break at all.
    for target in ("/\t/evil.example", "/\n/evil.example", "/\r\n/evil", "/a\x00", "/\\/evil"):
        assert safe_next(target) == "/", repr(target)


def test_a_probing_breaker_reads_as_probing() -> None:
    """The routing state's words (BreakerState) as the page shows and styles them."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    breaker = env.get_template("macros.html").module.breaker  # type: ignore[attr-defined]
    css = (TEMPLATES.parent / "static" / "relay.css").read_text()
    shown = {
        BreakerState.CLOSED.value: "breaker closed",
        BreakerState.OPEN.value: "breaker open",
        BreakerState.HALF_OPEN.value: "probing",
    }
    for state, text in shown.items():
        html = str(breaker(state))
        assert f">{text}</span>" in html, html
        assert f".breaker-{state} " in css, state
    for state in (BreakerState.OPEN, BreakerState.HALF_OPEN):  # the overview's card border
        assert f".upstream.up-{state.value} " in css, state
