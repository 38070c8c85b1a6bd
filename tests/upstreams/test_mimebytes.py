"""The byte-level multipart splitter must read every message it accepts exactly as the email
package's parser does: the JSON providers' requests and refusals are compared, byte for
byte, between the two paths (the email package's stays the reference), on generated
messages and on the upstream tests' samples."""

from __future__ import annotations

import base64
import quopri
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.message import Envelope
from relay.upstreams import mime_json, mimebytes
from relay.upstreams.http import HTTPUpstream
from relay.upstreams.mimebytes import parse_headers
from relay.upstreams.postmark import PostmarkUpstream
from relay.upstreams.sendgrid import SendGridUpstream
from relay.wire import crlf_only
from tests.upstreams.conftest import ENVELOPE, MESSAGE, RICH, RICH_ENVELOPE
from tests.upstreams.test_mime_json import SINGLE_PART
from tests.upstreams.test_mime_json import test_lossy_conversions_are_refused as _refused

ENV = Envelope("a@example.com", ("to@example.net",), queue_id="01QID")
HEAD = (
    b"From: Ann <a@example.com>\r\nTo: to@example.net\r\n"
    b"Subject: =?utf-8?q?Scan_f=C3=BCr?= you\r\nX-Mailer: Scan2Mail\r\nMIME-Version: 1.0\r\n"
)
UPSTREAMS: tuple[HTTPUpstream, ...] = (
    SendGridUpstream("sg", api_key="k", base_url="http://x", timeout=1.0),
    PostmarkUpstream("pm", api_key="k", base_url="http://x", timeout=1.0),
)


def _outcomes(envelope: Envelope, data: bytes) -> list[bytes | str]:
    """Each JSON provider's request body, its refusal, or the exception it raised, for
    one fresh conversion."""
    out: list[bytes | str] = []
    with mock.patch.object(mime_json, "_recent", type(mime_json._recent)()):
        for upstream in UPSTREAMS:
            try:
                why = upstream.refusal(envelope, data)
                out.append(why if why is not None else upstream.build(envelope, data).data)
            except Exception as exc:
                out.append(f"raised {exc!r}")
    return out


@contextmanager
def _splits() -> Iterator[list[bool]]:
    """What `split` answered, for every message converted inside the block."""
    answers: list[bool] = []
    real = mimebytes.split

    def recording(*args: object, **kwargs: object) -> bool:
        answer = real(*args, **kwargs)  # type: ignore[arg-type]
        answers.append(answer)
        return answer

    with mock.patch.object(mime_json, "split", recording):
        yield answers


def _compare(envelope: Envelope, data: bytes) -> bool:
    """Assert both paths agree; return whether the splitter took the message."""
    with _splits() as answers:
        fast = _outcomes(envelope, data)
    with mock.patch.object(mime_json, "split", return_value=False):
        reference = _outcomes(envelope, data)
    assert fast == reference
    return any(answers)


# -- generated messages ----------------------------------------------------------------------

_BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
_BOUNDARY = st.one_of(
    st.text(_BCHARS, min_size=1, max_size=30),
    st.sampled_from(["b1", "----=_Part_0_1.2", "=_abc", "x y", "-", "--", "b1--"]),
)
_TEXT_LINE = st.one_of(
    st.sampled_from(
        [
            b"",
            b"plain words",
            b"--",
            b"-- ",
            b"---------- forwarded ----------",
            "Grüße €".encode(),
            b"caf\xe9",
            b"\xff\xfe",
            b'quote " back\\slash\ttab \x01',
            b" leading space",
            b"trailing space ",
            b"=3D not qp",
        ]
    ),
    st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
_CHARSETS = st.sampled_from(
    [
        *("", "; charset=utf-8", "; charset=iso-8859-1", "; charset=us-ascii", '; charset="UTF-8"'),
        *(
            "; charset=utf-16",
            "; charset=unknown-8bit",
            "; charset*=utf-8''utf-8",
            "; charset=cp1252",
        ),
    ]
)
_FILENAMES = st.sampled_from(
    [
        "",
        '; filename="scan.pdf"',
        "; filename=plain.txt",
        "; filename*=utf-8''Rechnung%20M%C3%A4rz.pdf",
        '; filename*0="long"; filename*1="-name.pdf"',
        '; filename="=?utf-8?q?R=C3=A9sum=C3=A9?=.pdf"',
    ]
)


def _rarely(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws (st.integers leans towards its bounds)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def _text_body(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(_TEXT_LINE, max_size=8))
    return b"".join(line + b"\r\n" for line in lines)


@st.composite
def _leaf(draw: st.DrawFn, delimiters: list[bytes]) -> bytes:
    """A part: headers in some order and case, then a body in its transfer encoding."""
    ctype = draw(
        st.sampled_from(
            [
                *("text/plain", "text/html", "application/pdf", "image/png", "text/csv"),
                *("text/calendar", "application/octet-stream", "message/rfc822", "TEXT/Plain", ""),
            ]
        )
    )
    cte = draw(
        st.sampled_from(["", "7bit", "8bit", "binary", "quoted-printable", "base64", "BASE64 "])
    )
    disposition = draw(st.sampled_from(["", "inline", "attachment"]))
    headers: list[bytes] = []
    if ctype:
        headers.append(f"Content-Type: {ctype}{draw(_CHARSETS)}".encode())
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}".encode())
    if disposition or draw(st.booleans()):
        filename = draw(_FILENAMES)
        headers.append(f"Content-Disposition: {disposition or 'attachment'}{filename}".encode())
    if draw(st.booleans()):
        headers.append(b"Content-ID: <cid" + str(draw(st.integers(0, 9))).encode() + b"@x>")
    if draw(st.booleans()):
        headers.append(b"X-Part: folded\r\n\tvalue")
    ordered = draw(st.permutations(headers))
    content = draw(_text_body())
    if cte.strip().lower() == "base64":
        raw = draw(st.one_of(st.binary(max_size=300), st.just(content)))
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        mangle = draw(st.sampled_from(["", "", "", "no-padding", "stray", "long-lines", "--"]))
        if mangle == "no-padding":
            body = body.replace(b"=", b"")
        elif mangle == "stray":
            body = b"!" + body
        elif mangle == "long-lines":
            body = base64.b64encode(raw) + b"\r\n"
        elif mangle == "--" and delimiters:
            body += draw(st.sampled_from(delimiters)) + b"x\r\n"
    elif cte == "quoted-printable":
        body = quopri.encodestring(content.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    else:
        body = content
        if draw(st.booleans()) and delimiters:
            # A line that looks like a delimiter and is not one, anywhere in the body.
            near = draw(st.sampled_from(delimiters))
            line = draw(st.sampled_from([near + b"x", b" " + near, near[:-1], b"x" + near]))
            lines = body.split(b"\r\n")
            lines.insert(draw(st.integers(0, len(lines) - 1)), line)
            body = b"\r\n".join(lines)
    head = b"".join(h + b"\r\n" for h in ordered)
    if draw(_rarely(21)):
        return head + body  # no blank line after the headers
    return head + b"\r\n" + body


@st.composite
def _multipart_body(draw: st.DrawFn, boundary: str, depth: int, outer: list[bytes]) -> bytes:
    """The body of a multipart with `boundary`: preamble, parts, close, epilogue."""
    delimiter = b"--" + boundary.encode()
    delimiters = [*outer, delimiter]
    out = b""
    if draw(st.booleans()):
        out += draw(_text_body())
    count = draw(st.integers(1, 4))
    for _ in range(count):
        out += delimiter + draw(st.sampled_from([b"", b"", b" ", b"\t \t"])) + b"\r\n"
        if depth < 3 and draw(_rarely(4)):
            inner = draw(_BOUNDARY.filter(lambda b: b.strip() == b and b != boundary))
            subtype = draw(st.sampled_from(["alternative", "related", "mixed"] * 3 + ["signed"]))
            out += f'Content-Type: multipart/{subtype}; boundary="{inner}"\r\n\r\n'.encode()
            out += draw(_multipart_body(inner, depth + 1, delimiters))
        else:
            out += draw(_leaf(delimiters))
        if draw(_rarely(31)):
            out += delimiter + b"\r\n"  # a delimiter line right after another
    ending = draw(st.sampled_from(["close"] * 8 + ["close-padded", "none"]))
    if ending == "close":
        out += delimiter + b"--\r\n"
    elif ending == "close-padded":
        out += delimiter + b"-- \t\r\n"
    if draw(st.booleans()):
        out += draw(_text_body())
        if draw(st.booleans()):
            out += delimiter + b"\r\n" + delimiter + b"--\r\n"  # epilogue, not parts
    return out


@st.composite
def multipart_messages(draw: st.DrawFn) -> bytes:
    boundary = draw(_BOUNDARY.filter(lambda b: b.strip() == b))
    subtype = draw(st.sampled_from(["mixed"] * 4 + ["alternative", "related", "report"]))
    quoted = f'"{boundary}"' if draw(st.booleans()) or not boundary.isalnum() else boundary
    head = HEAD + f"Content-Type: multipart/{subtype}; boundary={quoted}\r\n\r\n".encode()
    data = head + draw(_multipart_body(boundary, 1, []))
    if draw(_rarely(11)):
        data = data.rstrip(b"\r\n")  # the close delimiter at the very end, no line end
    if draw(_rarely(11)):
        data = data.replace(b"\r\n", b"\n")
    if draw(_rarely(21)):
        at = draw(st.integers(len(head), max(len(head), len(data) - 1)))
        data = data[:at] + draw(st.sampled_from([b"\r", b"\n"])) + data[at:]
    return data


@settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=multipart_messages(), trust_crlf=st.booleans())
@example(data=RICH, trust_crlf=True)
def test_generated_multipart_messages_convert_as_the_email_package_reads_them(
    data: bytes, trust_crlf: bool
) -> None:
    envelope = Envelope(
        "a@example.com",
        ("to@example.net",),
        queue_id="01QID",
        # The listener's promise, made only when it holds.
        crlf_only=trust_crlf and crlf_only(data),
    )
    _compare(envelope, data)


def test_the_generator_mostly_makes_messages_the_splitter_takes() -> None:
    """Without this, the comparison above could pass by always falling back."""
    taken = []

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=multipart_messages())
    def run(data: bytes) -> None:
        with _splits() as answers:
            _outcomes(ENV, data)
        taken.append(any(answers))

    run()
    assert sum(taken) > len(taken) * 0.25, f"{sum(taken)} of {len(taken)} split"


# -- the upstream tests' samples ---------------------------------------------------------------


def _refusal_samples() -> list[bytes]:
    marks = getattr(_refused, "pytestmark", [])
    (params,) = [m.args[1] for m in marks if m.name == "parametrize"]
    return [data for data, _ in params]


@pytest.mark.parametrize(
    ("envelope", "data"),
    [
        (RICH_ENVELOPE, RICH),
        (ENVELOPE, MESSAGE),
        *((ENV, data) for data in _refusal_samples()),
        *((ENV, HEAD + body) for body in SINGLE_PART),
    ],
)
def test_sample_messages_give_the_same_requests_and_refusals(
    envelope: Envelope, data: bytes
) -> None:
    _compare(envelope, data)


def test_the_rich_sample_is_split_not_parsed_whole() -> None:
    assert _compare(RICH_ENVELOPE, RICH)


# -- the shapes read here, and the ones left to the email package ------------------------------


def _scan(boundary: bytes, body: bytes) -> bytes:
    return (
        HEAD
        + b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + body.replace(b"\n", b"\r\n")
    )


TEXT_AND_PDF = (
    b"--b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    + "Gescannt \u2013 Seite 1\n".encode()
    + b"--b1\nContent-Type: application/pdf\nContent-Disposition: attachment; "
    b'filename="scan.pdf"\nContent-Transfer-Encoding: base64\n\n'
    + base64.encodebytes(bytes(range(256)) * 8)
    + b"--b1--\n"
)


@pytest.mark.parametrize(
    ("data", "split"),
    [
        (_scan(b"b1", TEXT_AND_PDF), True),
        (_scan(b"b1", b"preamble\n--b1x\n" + TEXT_AND_PDF + b"epilogue\n--b1\n"), True),
        (_scan(b"b1", TEXT_AND_PDF.replace(b"--b1\n", b"--b1 \t\n")), True),
        (_scan(b"b1", TEXT_AND_PDF).rstrip(b"\r\n"), True),  # close delimiter at the end
        (_scan(b"b1", b"--b1\n\nno headers at all\n--b1--\n"), True),
        (_scan(b"b1", b"--b1\nContent-Type: text/plain\n\n--b1--\n"), True),  # empty body
        (_scan(b"b1", b"--b1\nContent-Type: text/plain\n\n-- \nsig\n--b1--\n"), True),
        (_scan(b"b1", b"--b1\n\ntext x--b1\n\nmore\n--b1--\n"), True),  # not at a line start
        (_scan(b"b1", TEXT_AND_PDF.replace(b"--b1--\n", b"")), False),  # never closed
        (_scan(b"b1", b"--b1\n--b1\nContent-Type: text/plain\n\nx\n--b1--\n"), False),
        (_scan(b"b1", b"--b1\nContent-Type: text/plain\nx\n--b1--\n"), False),  # no blank
        (_scan(b"b1", b"--b1--\n--b1\n\nx\n--b1--\n"), False),  # closed before it opens
        (
            _scan(b"b1", b"--b1\nContent-Type: message/rfc822\n\nSubject: x\n\nbody\n--b1--\n"),
            False,
        ),
        (
            _scan(
                b"b",
                b'--b\nContent-Type: multipart/alternative; boundary="b-1"\n\n'
                b"--b-1\n\nx\n--b-1--\n--b--\n",
            ),
            True,  # "--b-1" is no delimiter of the outer "b"
        ),
        # Left to the email package:
        (
            _scan(
                b"b1",
                b'--b1\nContent-Type: multipart/alternative; boundary="b1--"\n\n'
                b"--b1--\n\ninner\n--b1----\n--b1\n\nafter\n--b1--\n",
            ),
            False,  # the inner delimiter is the outer close delimiter
        ),
        (_scan("\u00e9".encode(), b"--\xc3\xa9\n\nx\n--\xc3\xa9--\n"), False),
        (_scan(b"b1", TEXT_AND_PDF).replace(b"Seite 1\r\n", b"Seite 1\n"), False),  # bare LF
        (_scan(b"b1", TEXT_AND_PDF).replace(b"Seite 1\r\n", b"Seite\r1\r\n"), False),  # bare CR
    ],
)
def test_which_shapes_are_split_and_that_both_paths_agree(data: bytes, split: bool) -> None:
    assert _compare(ENV, data) is split


def test_a_bare_line_end_is_only_looked_for_when_the_listener_did_not() -> None:
    data = _scan(b"b1", TEXT_AND_PDF)
    with mock.patch.object(mimebytes, "crlf_only", side_effect=AssertionError("scanned")):
        trusted = Envelope("a@example.com", ("to@example.net",), crlf_only=True)
        assert _compare(trusted, data)
    end = data.index(b"\r\n\r\n") + 4
    assert not mimebytes.split(
        data.replace(b"Seite 1\r\n", b"Seite 1\n"),
        parse_headers(data[:end]),
        end,
        crlf_checked=False,
    )


def test_split_parts_carry_their_body_as_positions_not_copies() -> None:
    data = _scan(b"b1", TEXT_AND_PDF)
    end = data.index(b"\r\n\r\n") + 4
    message = parse_headers(data[:end])
    assert mimebytes.split(data, message, end, crlf_checked=False)
    payload = message.get_payload()
    assert isinstance(payload, list)
    text, pdf = payload
    assert isinstance(text, mimebytes.SlicedPart) and isinstance(pdf, mimebytes.SlicedPart)
    assert text.source is data and pdf.source is data
    assert data[text.body_start : text.body_end] == "Gescannt \u2013 Seite 1".encode()
    assert data[pdf.body_end : pdf.body_end + 8] == b"\r\n--b1--"


def test_a_scan_is_held_about_once_beside_the_queued_bytes() -> None:
    """Issue 14: a 5 MB message is never held more than twice on its way to a provider."""
    pdf = base64.encodebytes(bytes(range(256)) * 8000)  # 2 MB, 2.8 MB of base64
    data = _scan(b"b1", TEXT_AND_PDF.replace(base64.encodebytes(bytes(range(256)) * 8), pdf))
    upstream = UPSTREAMS[0]
    tracemalloc.start()
    try:
        assert upstream.refusal(ENV, data) is None
        request = upstream.build(ENV, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not isinstance(request.body, bytes)  # chunks, not joined
    assert peak < 1.2 * len(data), peak / len(data)
