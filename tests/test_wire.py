"""The DATA byte scanner: the C module (relay/_wirescan.c) and its Python twin in
relay/wire.py give the same answers on any bytes, and `make` builds the C one."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import wire

pieces = st.sampled_from([b"a", b"bc", b".", b"..", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n.", b" "])
streams = st.lists(pieces, max_size=60).map(b"".join)

try:
    from relay import _wirescan
except ImportError:  # the build test below says why it is missing
    _wirescan = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_wirescan is None, reason="relay/_wirescan.so is not built")


def test_make_builds_the_c_scanner() -> None:
    """Where `make` can build it (a C compiler and the interpreter's headers), it did, and
    the relay uses it: the Python twin is the fallback, not the norm."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which("cc") is None or not headers.exists():
        pytest.skip("no C compiler or Python.h here: the Python scanner is expected")
    assert wire.SCANNER == "c", "run `make relay/_wirescan.so` (make test does it)"


@needs_c
@given(streams)
@settings(max_examples=3000)
def test_crlf_only_agrees(data: bytes) -> None:
    assert _wirescan.crlf_only(data) is wire._crlf_only(data)


@needs_c
@given(streams, st.integers(0, 70), st.integers(0, 70))
@settings(max_examples=3000)
def test_unstuff_agrees(data: bytes, a: int, b: int) -> None:
    start, end = sorted((min(a, len(data)), min(b, len(data))))
    buffer = bytearray(data)
    assert _wirescan.unstuff(buffer, start, end) == wire._unstuff(buffer, start, end)


@needs_c
@given(streams, st.integers(-2, 70))
@settings(max_examples=3000)
def test_find_end_agrees(data: bytes, start: int) -> None:
    buffer = bytearray(data)
    start = max(start, 0)
    assert _wirescan.find_end(buffer, start) == wire._find_end(buffer, start)


@needs_c
@given(streams)
@settings(max_examples=3000)
def test_stuff_agrees(data: bytes) -> None:
    crlf = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert _wirescan.stuff(crlf) == wire._stuff(crlf)


@pytest.mark.parametrize(
    ("data", "unstuffed"),
    [
        (b"\r\n..a\r\n.\r\n", b"\r\n.a\r\n\r\n"),
        (b"\r\nplain\r\n", b"\r\nplain\r\n"),
        (b"\r\na\rb\r\n", None),  # bare CR: how SMTP smuggling hides a second message
        (b"\r\na\nb\r\n", None),  # bare LF
        (b"\n", None),
        (b"\r", None),
        (b"", b""),
    ],
)
def test_unstuff_examples(data: bytes, unstuffed: bytes | None) -> None:
    assert wire.unstuff(data, 0, len(data)) == unstuffed
    assert wire._unstuff(data, 0, len(data)) == unstuffed


def test_stuff_round_trip() -> None:
    message = b".top\r\nbody\r\n..two\r\n.\r\nend"
    payload = wire.dot_stuff(message)
    assert payload == b"..top\r\nbody\r\n...two\r\n..\r\nend\r\n.\r\n"
    lines = b"\r\n" + payload.removesuffix(b".\r\n")
    assert wire.unstuff(lines, 0, len(lines)) == b"\r\n" + message + b"\r\n"


@needs_c
def test_bad_arguments_are_errors_not_crashes() -> None:
    with pytest.raises(ValueError, match="within the buffer"):
        _wirescan.unstuff(b"abc", 2, 10)
    with pytest.raises(ValueError, match="within the buffer"):
        _wirescan.unstuff(b"abc", 2, 1)
    with pytest.raises(TypeError):
        _wirescan.unstuff(b"abc", 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _wirescan.crlf_only("text")  # type: ignore[arg-type]
