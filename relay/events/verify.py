"""Checks every provider's webhook module needs: the same rule, written once.

Each function raises the `relay.events.base` error whose HTTP status fits (Malformed 400,
Unauthenticated 401), with a reason an operator can act on, so a provider module reads as
a list of checks. Secrets and signatures are compared in constant time (`hmac.
compare_digest`): a comparison that stops at the first differing byte tells a patient
attacker, byte by byte, how much of a guess was right.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from relay.events.base import Malformed, Unauthenticated
from relay.inbound import jsonlimits
from relay.inbound.jsonlimits import JSONLimitError

#: How far ahead of the relay's clock a provider's timestamp may be (clock skew).
MAX_SKEW = 300.0


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value whatever its case: the server gives a case-insensitive mapping, but
    a plain dict (a test, a replayed request) may spell the name differently."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def equal(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time equality of a secret and what the request carried."""
    a = given.encode() if isinstance(given, str) else given
    b = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def hmac_sha256_hex(key: str | bytes, message: str | bytes) -> str:
    """HMAC-SHA256 as lowercase hex, the form Mailgun and the relay's own webhooks use."""
    k = key.encode() if isinstance(key, str) else key
    m = message.encode() if isinstance(message, str) else message
    return hmac.new(k, m, hashlib.sha256).hexdigest()


def check_fresh(
    sent_at: float,
    *,
    now: float,
    max_age: float,
    max_skew: float = MAX_SKEW,
    what: str = "timestamp",
) -> None:
    """Refuse a signed timestamp that is too old (a replay of a captured request) or too
    far in the future (a clock that is wrong, or a request made to be replayed later)."""
    age = now - sent_at
    if age > max_age:
        raise Unauthenticated(
            f"{what} is {age:.0f}s old, over the {max_age:.0f}s allowed (a replayed request,"
            " or a clock that is off: check NTP on this host)"
        )
    if age < -max_skew:
        raise Unauthenticated(
            f"{what} is {-age:.0f}s in the future, over the {max_skew:.0f}s allowed"
            " (check NTP on this host)"
        )


def basic_credentials(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The user and password of an `Authorization: Basic` header (RFC 7617), or None when
    there is none or it is not a well-formed Basic header."""
    value = header(headers, "Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def check_basic_auth(headers: Mapping[str, str], *, user: str, password: str) -> None:
    """Require HTTP Basic credentials equal to the configured ones.

    Both parts are compared, always, so the time taken does not tell a right user name
    from a wrong one.
    """
    given = basic_credentials(headers)
    if given is None:
        raise Unauthenticated(
            "no HTTP Basic credentials: put the configured user and password in the"
            " webhook URL (https://user:password@host/webhooks/<upstream>)"
        )
    user_ok = equal(given[0], user)
    password_ok = equal(given[1], password)
    if not (user_ok and password_ok):
        raise Unauthenticated("HTTP Basic credentials do not match the configured ones")


def load_json(body: bytes, *, what: str = "body") -> Any:
    """Decode a verified (or about to be verified) body; anything not JSON is Malformed.

    The size was capped by the endpoint (`[events] max_body`); nesting is capped here, as
    for every JSON the relay takes from outside (relay.inbound.jsonlimits).
    """
    try:
        return jsonlimits.loads(body, max_size=max(len(body), jsonlimits.MAX_SIZE))
    except JSONLimitError as exc:
        raise Malformed(f"{what} refused: {exc}") from None
    except ValueError as exc:
        raise Malformed(f"{what} is not JSON: {exc}") from None


def epoch(value: object, *, what: str) -> float:
    """Seconds since the epoch from a provider's timestamp: a number, a numeric string, or
    ISO 8601 with a time zone ("2024-05-01T12:00:00.000Z")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise Malformed(f"{what} {value!r} is neither epoch seconds nor ISO 8601") from None
        if parsed.tzinfo is None:
            raise Malformed(f"{what} {value!r} has no time zone")
        return parsed.timestamp()
    raise Malformed(f"{what} is missing or not a timestamp: {value!r}")


def hashed_key(provider: str, *fields: object) -> str:
    """An event key for a provider that sends no event id: the same fields give the same
    key, so a redelivered event is recognised (`ProviderEvent.key`)."""
    digest = hashlib.sha256("\x1f".join(str(f) for f in fields).encode("utf-8")).hexdigest()
    return f"{provider}:{digest[:32]}"


def required_string(doc: Mapping[str, Any], key: str, where: str) -> str:
    """A field the provider always sends as a non-empty string (else Malformed)."""
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{where}: {key!r} is missing or not a string")
    return value


def optional_string(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    """A field that may be absent; present, it is a string (anything else is not what the
    provider sends: Malformed)."""
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed(f"{where}: {key!r} is not a string")
    return value
