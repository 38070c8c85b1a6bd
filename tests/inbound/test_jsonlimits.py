"""The bounded decoder every inbound path uses for JSON from outside."""

from __future__ import annotations

import json

import pytest

from relay.inbound.jsonlimits import MAX_DEPTH, JSONLimitError, loads


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_up_to_the_limit_decodes_and_one_more_is_refused() -> None:
    assert loads(nested(MAX_DEPTH)) == json.loads(nested(MAX_DEPTH))
    with pytest.raises(JSONLimitError, match=f"nested more than {MAX_DEPTH} levels"):
        loads(nested(MAX_DEPTH + 1))


@pytest.mark.parametrize(
    "hostile",
    ["[" * 100_000, '{"a":' * 50_000, '[{"a":' * 20_000, "[" * 10_000 + "]" * 10_000],
    ids=["arrays", "objects", "mixed", "balanced"],
)
def test_deep_nesting_is_refused_without_recursing(hostile: str) -> None:
    with pytest.raises(JSONLimitError):
        loads(hostile)
    with pytest.raises(JSONLimitError):
        loads(hostile.encode())


def test_brackets_inside_strings_do_not_count() -> None:
    doc = {"subject": "[" * 500 + '\\"{' * 100, "list": [[["ok"]]]}
    assert loads(json.dumps(doc)) == doc


def test_bytes_in_any_json_encoding_decode_like_json_loads() -> None:
    doc = {"a": ["ü", 1]}
    for encoding in ("utf-8", "utf-16", "utf-32"):
        assert loads(json.dumps(doc, ensure_ascii=False).encode(encoding)) == doc


def test_size_limit_and_ordinary_errors() -> None:
    with pytest.raises(JSONLimitError, match="over the 10 limit"):
        loads('"' + "x" * 20 + '"', max_size=10)
    with pytest.raises(ValueError, match="Expecting"):
        loads("{not json")
    with pytest.raises(ValueError):
        loads(b"\xff\xfe\xfd")
