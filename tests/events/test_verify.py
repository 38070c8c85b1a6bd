"""The shared webhook checks: what each refuses, and that the refusals say why."""

from __future__ import annotations

import base64

import pytest

from relay.events.base import Malformed, Unauthenticated
from relay.events.verify import (
    basic_credentials,
    check_basic_auth,
    check_fresh,
    epoch,
    equal,
    hashed_key,
    header,
    hmac_sha256_hex,
    load_json,
)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def test_header_lookup_ignores_case() -> None:
    assert (
        header(
            {"X-Twilio-Email-Event-Webhook-Timestamp": "1"},
            "x-twilio-email-event-webhook-timestamp",
        )
        == "1"
    )
    assert header({}, "Authorization") is None


def test_fresh_timestamps_pass_and_old_or_future_ones_are_refused() -> None:
    check_fresh(1000.0, now=1500.0, max_age=600)
    check_fresh(1200.0, now=1000.0, max_age=600, max_skew=300)
    with pytest.raises(Unauthenticated, match="700s old"):
        check_fresh(800.0, now=1500.0, max_age=600)
    with pytest.raises(Unauthenticated, match="in the future"):
        check_fresh(2000.0, now=1000.0, max_age=600, max_skew=300)


def test_basic_auth_takes_the_configured_pair_only() -> None:
    check_basic_auth(basic("ses", "pa:ss"), user="ses", password="pa:ss")
    assert basic_credentials(basic("ses", "pa:ss")) == ("ses", "pa:ss")
    with pytest.raises(Unauthenticated, match="do not match"):
        check_basic_auth(basic("ses", "wrong"), user="ses", password="pa:ss")
    with pytest.raises(Unauthenticated, match="do not match"):
        check_basic_auth(basic("other", "pa:ss"), user="ses", password="pa:ss")
    with pytest.raises(Unauthenticated, match="no HTTP Basic credentials"):
        check_basic_auth({}, user="ses", password="pa:ss")
    with pytest.raises(Unauthenticated, match="no HTTP Basic credentials"):
        check_basic_auth({"Authorization": "Basic !!notbase64"}, user="ses", password="x")
    with pytest.raises(Unauthenticated, match="no HTTP Basic credentials"):
        check_basic_auth({"Authorization": "Bearer abc"}, user="ses", password="x")


def test_equal_and_hmac() -> None:
    assert equal("abc", b"abc") and not equal("abc", "abd")
    # RFC 4231 test case 2.
    assert hmac_sha256_hex("Jefe", "what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_json_and_timestamps() -> None:
    assert load_json(b'[{"a": 1}]') == [{"a": 1}]
    with pytest.raises(Malformed, match="not JSON"):
        load_json(b"{nope")
    with pytest.raises(Malformed, match="nested"):
        load_json(b"[" * 100 + b"]" * 100)
    assert epoch(1714564800, what="t") == 1714564800.0
    assert epoch("1714564800.5", what="t") == 1714564800.5
    assert epoch("2024-05-01T12:00:00.000Z", what="t") == 1714564800.0
    with pytest.raises(Malformed, match="no time zone"):
        epoch("2024-05-01T12:00:00", what="t")
    with pytest.raises(Malformed, match="not a timestamp"):
        epoch(None, what="t")
    with pytest.raises(Malformed, match="neither"):
        epoch("yesterday", what="t")


def test_hashed_keys_are_stable_and_distinct() -> None:
    assert hashed_key("postmark", "a", 1) == hashed_key("postmark", "a", 1)
    assert hashed_key("postmark", "a", 1) != hashed_key("postmark", "a1")
    assert hashed_key("postmark", "a").startswith("postmark:")
