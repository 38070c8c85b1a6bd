"""JSON from outside, decoded with limits on size and nesting *before* the decoder runs.

Python's JSON decoder recurses once per `[` or `{`: a body of ten thousand `[` raises
`RecursionError`, which is not a `ValueError`, so callers that catch "bad JSON" miss it (the
SNS endpoint answered 500, the SQS consumer's task died, a hostile `x-amz-matdesc` turned
into an endlessly retried "internal error"). Every inbound decoder of untrusted JSON (SNS
bodies, the SNS `Message`, SQS bodies, S3 metadata, stored work) goes through `loads()`,
which refuses such input with `JSONLimitError`, a `ValueError` carrying a reason fit for
an HTTP 400 detail or a timeline.

Nothing AWS sends is deep (an SES notification is about five levels) or large (SNS and SQS
messages are at most 256 KiB and 1 MiB, S3 user metadata 2 KiB), so the defaults leave
wide headroom while keeping the decoder's stack and memory small.

The depth check runs at C speed: strings are cut out with one regex, the brackets left
become +1/-1 steps whose running sum is the decoder's depth; input with no more openers
than `max_depth` skips it altogether.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, Final

#: Nesting levels allowed: AWS notifications use about five.
MAX_DEPTH: Final = 32
#: Characters allowed: beyond any SNS (256 KiB) or SQS (1 MiB) message.
MAX_SIZE: Final = 4 * 1024 * 1024

# A JSON string (escapes included); an unterminated one runs to the end, so the scan stays
# linear on hostile input (the decoder then refuses it).
_STRING: Final = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class JSONLimitError(ValueError):
    """The input is refused before decoding: too large or too deeply nested."""


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH, max_size: int = MAX_SIZE) -> Any:
    """`json.loads(data)` for untrusted input. Raises `JSONLimitError` past the limits and
    `ValueError` (including `UnicodeDecodeError`) for anything that is not JSON."""
    if len(data) > max_size:
        raise JSONLimitError(f"JSON text of {len(data)} characters is over the {max_size} limit")
    # As json.loads decodes bytes (UTF-8, -16 or -32), so the scan sees the decoder's text.
    text = (
        data.decode(json.detect_encoding(data), "surrogatepass")
        if isinstance(data, bytes)
        else data
    )
    if not _within_depth(text, max_depth):
        raise JSONLimitError(f"JSON nested more than {max_depth} levels deep")
    return json.loads(text)


def _within_depth(text: str, max_depth: int) -> bool:
    """Whether the decoder would never hold more than `max_depth` open arrays or objects:
    the highest running count of openers minus closers, outside strings."""
    if text.count("[") + text.count("{") <= max_depth:
        return True  # cannot be deeper than the number of openers
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    steps = array("b", brackets.translate(_STEPS))  # +1 per opener, -1 per closer
    return max(accumulate(steps), default=0) <= max_depth
