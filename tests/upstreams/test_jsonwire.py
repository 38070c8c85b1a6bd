"""The pre-serialised JSON of the HTTP upstreams must be byte for byte what json.dumps of
the decoded text gives, however the text falls across the windows it is escaped in."""

from __future__ import annotations

import base64
import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.message import Envelope
from relay.upstreams import jsonwire
from relay.upstreams.jsonwire import Escaped, canonical_base64, escaped_text, plain, serialise
from relay.upstreams.mime_json import convert
from relay.upstreams.postmark import PostmarkUpstream
from relay.upstreams.sendgrid import SendGridUpstream
from relay.upstreams.sparkpost import SparkPostUpstream

_PIECES = st.sampled_from(
    [
        *(b"a", b"Z ", b"\r\n", b"\r", b"\n", b'"', b"\\", b"\t", b"\x00", b"\x1f", b"\x7f"),
        *("é".encode(), "€".encode(), b"\xff", b"\xc3", b"\xe9"),
    ]
)
_TEXT = st.lists(_PIECES, max_size=60).map(b"".join)


@settings(max_examples=300, database=None)
@given(
    data=_TEXT,
    codec=st.sampled_from(["utf-8", "ascii", "iso8859-1", "cp1252"]),
    crlf_to_lf=st.booleans(),
    window=st.integers(1, 8),
)
def test_escaped_text_is_what_json_dumps_writes(
    data: bytes, codec: str, crlf_to_lf: bool, window: int
) -> None:
    text = data.decode(codec, "replace")
    if crlf_to_lf:
        text = text.replace("\r\n", "\n")
    with mock.patch.object(jsonwire, "WINDOW", window):
        chunks = escaped_text(b"xx" + data, 2, 2 + len(data), codec=codec, crlf_to_lf=crlf_to_lf)
    assert b"".join(chunks) == json.dumps(text).encode()[1:-1]


@settings(max_examples=200, database=None)
@given(
    content=st.binary(max_size=300),
    window=st.integers(1, 100),
    line_end=st.sampled_from([b"\r\n", b"\n", b"\r"]),
)
def test_canonical_base64_is_passed_on_without_its_line_breaks(
    content: bytes, window: int, line_end: bytes
) -> None:
    """Any line end goes: the email package decodes the lines joined (bytes.splitlines)."""
    mime = base64.encodebytes(content).replace(b"\n", line_end)
    with mock.patch.object(jsonwire, "WINDOW", window):
        chunks = canonical_base64(mime, 0, len(mime))
    assert chunks is not None
    assert b"".join(chunks) == base64.b64encode(content)


@pytest.mark.parametrize(
    "text",
    [
        b"JVBERi0xLjR=\r\n",  # stray bits in the last quantum
        b"JVBE Ri0x\r\n",  # a space
        b"JVB=ERi0\r\n",  # padding in the middle
        b"JVBERi0\r\n",  # not a multiple of four
        b"JVBERi0xLjQ=\nJVBE\n",  # padding, then more
        b"JV===\r\n",
    ],
)
def test_base64_that_encoding_would_not_give_back_is_not_passed_on(text: bytes) -> None:
    assert canonical_base64(text, 0, len(text)) is None


def test_serialise_splices_escaped_values_where_json_dumps_would_write_them() -> None:
    document = {
        "a": Escaped.of('quote " and \u00fc'),
        "list": [{"value": Escaped((b"one", b"two"))}, "\x00 looks like a slot"],
        "n": 1,
    }
    body = b"".join(serialise(document))
    assert body == json.dumps(plain(document)).encode()
    assert json.loads(body)["list"][0]["value"] == "onetwo"


_HEAD = b"From: Ann <a@example.com>\r\nTo: b@example.org\r\nSubject: s\r\n"
_BODIES = [
    b'Content-Type: text/plain; charset=utf-8\r\n\r\nQuote " back\\slash\ttab \x01\r\n'
    b"bare\nLF and bare\rCR\r\n",
    b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xfc\xdfe\r\n",
    b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>" + "Grüße €".encode() * 30000 + b"</p>",
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n8-bit in ascii \xc3\xa9\r\n",
    b"Content-Type: text/plain; charset=utf-16\r\n\r\nab\r\n",
    b"\r\n" + b"a line of plain text\r\n" * 20000,
    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(bytes(range(256)) * 500).replace(b"\n", b"\r\n"),
]


@pytest.mark.parametrize("body", _BODIES)
def test_json_providers_send_the_plain_document_byte_for_byte(body: bytes) -> None:
    """Whatever path a body takes (bytes escaped in windows, or the email package's
    decoding), the request is json.dumps of the document with those values as text."""
    envelope = Envelope("a@example.com", ("b@example.org",), queue_id="01QID")
    data = _HEAD + b"MIME-Version: 1.0\r\n" + body
    for upstream in (
        SendGridUpstream("sg", api_key="k", base_url="http://x", timeout=1.0),
        PostmarkUpstream("pm", api_key="k", base_url="http://x", timeout=1.0),
    ):
        document = upstream.payload(convert(envelope, data))
        sent = upstream.build(envelope, data)
        assert sent.data == json.dumps(plain(document)).encode()
    sparkpost = SparkPostUpstream("sp", api_key="k", base_url="http://x", timeout=1.0)
    if sparkpost.refusal(envelope, data) is None:
        sent_mime = json.loads(sparkpost.build(envelope, data).data)["content"]["email_rfc822"]
        assert sent_mime == data.decode()


def test_a_message_body_is_held_once_beside_the_queued_bytes() -> None:
    """Issue 14: a 5 MB message is never held more than twice on this path."""
    import tracemalloc

    envelope = Envelope("a@example.com", ("b@example.org",))
    data = _HEAD + b"\r\n" + b"x" * 78 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 64_000
    upstream = SendGridUpstream("sg", api_key="k", base_url="http://x", timeout=1.0)
    tracemalloc.start()
    try:
        request = upstream.build(envelope, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not isinstance(request.body, bytes)  # chunks, not joined
    assert peak < 1.2 * len(data)
