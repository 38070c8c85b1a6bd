"""The OpenAPI document against the running server: every documented operation, called
with generated valid and invalid input, answers a documented status with a body that
matches the documented schema, and never a 5xx.

Hypothesis drives plain blocking HTTP calls, so the relay runs on its own event loop in a
thread (`LiveRelay`); everything else is as in the other API tests: real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import http.client
import json
import string
import threading
import urllib.parse
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from relay.app import Relay
from relay.web.api.openapi import document
from relay.web.api.routes import PREFIX, ROUTES
from tests.conftest import relay_config
from tests.web.conftest import TOKENS, token_entries

T = TypeVar("T")
DOC = document("test")
COMPONENTS = DOC["components"]["schemas"]
SCHEMA_OF_SUBMISSION = COMPONENTS["Submission"]


def inline(schema: Any) -> Any:
    """The schema with every #/components/schemas/ reference replaced by its target."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return inline(COMPONENTS[ref.rsplit("/", 1)[1]])
        return {k: inline(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline(v) for v in schema]
    return schema


class LiveRelay:
    """A relay serving from its own loop in a thread, for blocking clients."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.run(self.relay.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] = (),  # type: ignore[assignment]
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        token: str = "ops",
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.relay.web_port, timeout=30)
        try:
            # A lone surrogate goes out as the bytes it would be (invalid UTF-8), as a
            # careless client would send it; the relay must still answer as documented.
            encoded = urllib.parse.urlencode(query, errors="surrogatepass") if query else ""
            target = path + ("?" + encoded if query else "")
            sent = {"Authorization": f"Bearer {TOKENS[token][1]}", **(headers or {})}
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            ctype = (response.getheader("Content-Type") or "").split(";")[0].strip()
            return response.status, ctype, response.read()
        finally:
            conn.close()


@pytest.fixture
def live(tmp_path: Path, tls_files: tuple[str, str], password_hash: str) -> Iterator[LiveRelay]:
    config = relay_config(
        tmp_path,
        tls_files=tls_files,
        password_hash=password_hash,
        web={"listen": "127.0.0.1:0", "tokens": token_entries(tmp_path)},
        smtp={"max_message_size": "200KB"},
    )
    relay = Relay(config)
    live = LiveRelay(relay)
    live.run(relay.start())
    yield live
    live.close()


def test_the_document_is_valid_openapi_and_lists_exactly_the_routes() -> None:
    validate_spec(DOC)
    documented = {(method.upper(), path) for path, ops in DOC["paths"].items() for method in ops}
    served = {(r.method, PREFIX + r.path) for r in ROUTES}
    assert documented == served


def test_the_served_document_is_this_document(live: LiveRelay) -> None:
    status, ctype, body = live.request("GET", "/api/v1/openapi.json")
    assert (status, ctype) == (200, "application/json")
    served = json.loads(body)
    assert served["paths"] == json.loads(json.dumps(DOC["paths"]))


# -- generated calls ------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes | None


# JSON bodies may carry any code point, lone surrogates included ("\ud800" escapes).
EVERY_CHARACTER = st.characters(blacklist_categories=())


def from_schema(schema: dict[str, Any], alphabet: Any = None) -> Any:
    """Values of the JSON Schema subset the document uses for requests."""

    def inner(sub: dict[str, Any]) -> Any:
        return from_schema(sub, alphabet)

    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema.get("type", "string")
    if isinstance(kinds, list):
        return st.one_of([inner({**schema, "type": k}) for k in kinds])
    if kinds == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"])
        return st.text(
            alphabet if alphabet is not None else st.characters(),
            min_size=schema.get("minLength", 0),
            max_size=min(schema.get("maxLength", 60), 60),
        )
    if kinds == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kinds == "number":
        return st.integers(0, 2**33) | st.floats(0, 1e10)
    if kinds == "boolean":
        return st.booleans()
    if kinds == "null":
        return st.none()
    if kinds == "array":
        return st.lists(inner(schema.get("items", {})), max_size=4)
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: inner(v) for k, v in properties.items() if k in required},
            optional={k: inner(v) for k, v in properties.items() if k not in required},
        )
    extra = schema.get("additionalProperties", {})
    return st.dictionaries(
        st.text(alphabet if alphabet is not None else st.characters(), min_size=1, max_size=12),
        inner(extra if isinstance(extra, dict) else {}),
        max_size=min(schema.get("maxProperties", 3), 3),
    )


# Values that broke (or could break) a JSON API: controls, line separators, a lone
# surrogate, a huge string, odd numbers, nesting.
HOSTILE: list[Any] = [
    "\ud800",
    "a\udcff",
    "\x00",
    "x\r\nBcc: victim@example.net",
    "x\u2028y",
    "\x85",
    "=?utf-8?q?=0D=0A?=",
    "x" * 5000,
    "",
    " ",
    10**400,
    -1,
    1.5,
    [],
    {},
    [[[[[]]]]],
    {"": ""},
    {"X-A": "\ud800"},
    [{"filename": "\ud800", "content": ""}],
    ["\ud800@example.org"],
]


def one_field_off(schema: dict[str, Any]) -> Any:
    """A request that would be valid but for one field: generated past the first checks,
    to where the value is used (a Submission's addresses are valid, then one field is any
    value of its schema, any character included, or any JSON)."""
    properties = schema.get("properties", {})
    if "from" not in properties:
        return from_schema(schema)

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        value = {"from": draw(ADDRESSES), "to": [draw(ADDRESSES)], "text": "x"}
        name = draw(st.sampled_from(sorted(properties)))
        value[name] = draw(
            st.sampled_from(HOSTILE) | from_schema(properties[name], EVERY_CHARACTER) | ANY_JSON
        )
        return value

    return build()


def as_param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(EVERY_CHARACTER),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
PARAM_TEXT = st.text(max_size=40)
ADDRESSES = st.from_regex(r"\A[a-z][a-z0-9]{0,6}(\.[a-z0-9]{1,5})?@example\.(org|com)\Z")


def operation_calls(path: str, method: str, op: dict[str, Any], ids: list[str]) -> Any:
    """Calls of one operation: each parameter and the body either generated from its
    documented schema, or something else (wrong types, unknown names, random bytes)."""
    params = op.get("parameters", [])

    @st.composite
    def build(draw: Any) -> Call:
        concrete = path
        query: list[tuple[str, str]] = []
        headers: dict[str, str] = {}
        for param in params:
            schema = inline(param["schema"])
            if param["in"] == "path":
                choices = [*ids, "outbox"] if param["name"] == "id" else ["outbox"]
                value = draw(st.sampled_from(choices) | PARAM_TEXT.filter(bool))
                concrete = concrete.replace(
                    "{" + param["name"] + "}", urllib.parse.quote(value, safe="")
                )
                continue
            mode = draw(st.sampled_from(["omit", "valid", "other"]))
            if mode == "omit":
                continue
            value = draw(from_schema(schema) if mode == "valid" else PARAM_TEXT)
            if param["in"] == "header":
                if isinstance(value, str) and value.isascii() and value.isprintable():
                    headers[param["name"]] = value
            elif isinstance(value, list):
                query += [(param["name"], as_param(v)) for v in value]
            else:
                query.append((param["name"], as_param(value)))
        if draw(st.booleans()) and draw(st.booleans()):
            query.append((draw(st.text(string.ascii_lowercase, min_size=1, max_size=8)), "x"))
        body = None
        content = op.get("requestBody", {}).get("content", {})
        if content:
            kind = draw(st.sampled_from([*content, "junk"]))
            if kind == "application/json":
                schema = inline(content[kind]["schema"])
                value = draw(from_schema(schema) | from_schema(schema, EVERY_CHARACTER) | ANY_JSON)
                body = json.dumps(value).encode()
                headers["Content-Type"] = "application/json"
            elif kind == "message/rfc822":
                body = draw(st.binary(max_size=300) | st.just(b"Subject: x\r\n\r\nhi\r\n"))
                headers["Content-Type"] = "message/rfc822"
                if draw(st.booleans()):
                    query.append(("from", draw(ADDRESSES)))
                    query.append(("to", draw(ADDRESSES)))
            else:
                body = draw(st.binary(max_size=200))
                headers["Content-Type"] = draw(
                    st.sampled_from(["application/json", "text/plain", "application/xml"])
                )
        return Call(method.upper(), concrete, query, headers, body)

    return build()


def check_answer(op: dict[str, Any], call: Call, status: int, ctype: str, body: bytes) -> None:
    where = f"{call.method} {call.path} {call.query} -> {status} {body[:300]!r}"
    assert status < 500, where
    documented = op["responses"].get(str(status))
    assert documented is not None, f"undocumented status: {where}"
    for media, spec in documented.get("content", {}).items():
        if media == "application/json":
            assert ctype == "application/json", where
            schema = spec.get("schema")
            if schema is not None:
                errors = list(Draft202012Validator(inline(schema)).iter_errors(json.loads(body)))
                assert not errors, f"{where}: {errors[0].message} at {list(errors[0].path)}"
        else:
            assert ctype == media, where


OPERATIONS = [
    (path, method, op) for path, ops in DOC["paths"].items() for method, op in ops.items()
]


@pytest.mark.parametrize(
    ("path", "method", "op"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m, _ in OPERATIONS]
)
def test_every_operation_answers_as_documented(
    live: LiveRelay, path: str, method: str, op: dict[str, Any]
) -> None:
    ids = []
    for i in range(3):  # messages to act on: held, queued, deleted along the way
        status, _, body = live.request(
            "POST",
            "/api/v1/messages",
            token="app",
            headers={"Content-Type": "application/json"},
            body=json.dumps(
                {"from": "a@example.com", "to": [f"r{i}@example.org"], "text": "x"}
            ).encode(),
        )
        assert status == 202
        ids.append(json.loads(body)["id"])

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(call=operation_calls(path, method, op, ids))
    def calls_answer_as_documented(call: Call) -> None:
        status, ctype, body = live.request(
            call.method, call.path, query=call.query, headers=call.headers, body=call.body
        )
        check_answer(op, call, status, ctype, body)

    calls_answer_as_documented()


BODY_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\x00"), max_size=300
)
REQUIRED: dict[str, st.SearchStrategy[Any]] = {
    "from": ADDRESSES,
    "to": st.lists(ADDRESSES, min_size=1, max_size=3),
}
OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "cc": st.lists(ADDRESSES, max_size=2),
    "bcc": st.lists(ADDRESSES, max_size=2),
    "subject": st.text(st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=80),
    "text": BODY_TEXT,
    "html": BODY_TEXT,
}
VALID_SUBMISSIONS = st.fixed_dictionaries(REQUIRED, optional=OPTIONAL)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=VALID_SUBMISSIONS)
def test_a_valid_submission_is_queued_and_reads_back_as_sent(
    live: LiveRelay, message: dict[str, Any]
) -> None:
    status, _, body = live.request(
        "POST",
        "/api/v1/messages",
        token="app",
        headers={"Content-Type": "application/json"},
        body=json.dumps(message).encode(),
    )
    assert status == 202, body
    msg_id = json.loads(body)["id"]
    data = live.run(live.relay.queue.body(msg_id))
    if data is None:  # delivered already: the maildir has the same bytes
        return
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == message.get("subject", "").strip()
    assert parsed["Bcc"] is None
    row = live.run(live.relay.queue.get(msg_id))
    assert row is not None and row.mail_from == message["from"]
    everyone = message["to"] + message.get("cc", []) + message.get("bcc", [])
    assert row.meta["rcpts_original"] == list(dict.fromkeys(everyone))


def test_every_submission_field_takes_hostile_values_without_a_5xx(live: LiveRelay) -> None:
    """Each field of a valid submission replaced in turn by each HOSTILE value: what
    random generation reaches too rarely (one field of eleven, one value of twenty)."""
    op = DOC["paths"]["/api/v1/messages"]["post"]
    fields = sorted(inline(SCHEMA_OF_SUBMISSION)["properties"])
    for name in fields:
        for value in HOSTILE:
            message = {"from": "a@example.com", "to": ["b@example.org"], "text": "x", name: value}
            call = Call("POST", "/api/v1/messages", [], {}, json.dumps(message).encode())
            status, ctype, body = live.request(
                call.method,
                call.path,
                token="app",
                headers={"Content-Type": "application/json"},
                body=call.body,
            )
            check_answer(op, call, status, ctype, body)


def test_a_query_that_is_not_utf8_is_refused_as_documented(live: LiveRelay) -> None:
    """A lone surrogate the fuzzer drew (`until=\\ud800`) arrives as %ED%A0%80: not UTF-8.
    The answer is a documented 4xx, not a 500."""
    call = Call("GET", "/api/v1/messages", [("until", "\ud800")], {}, None)
    status, ctype, body = live.request(call.method, call.path, query=call.query)
    check_answer(DOC["paths"]["/api/v1/messages"]["get"], call, status, ctype, body)
    assert 400 <= status < 500, body
