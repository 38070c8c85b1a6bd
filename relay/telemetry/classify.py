"""Which result an SMTP reply to a message means, for `relay_messages_received_total`.

A client offers a message once per transaction; the transaction ends with the reply to
DATA (after the content) or earlier with a refused MAIL. 2xx: accepted; 4xx: deferred
(the client keeps it and tries again); 5xx: refused, with the class of the enhanced status
code (RFC 3463) as the reason, so an operator sees "size" or "policy" without reading
logs. The classes are few and fixed: label values must not grow with what clients send.
"""

from __future__ import annotations

ACCEPTED = "accepted"
DEFERRED = "deferred"

# RFC 3463 section 3: the subject digit of an enhanced status code.
_REFUSED_BY_SUBJECT = {
    "1": "refused_address",
    "2": "refused_address",
    "3": "refused_system",
    "4": "refused_routing",
    "5": "refused_protocol",
    "6": "refused_content",
    "7": "refused_policy",
}
REFUSED_ADDRESS = _REFUSED_BY_SUBJECT["1"]
REFUSED_POLICY = _REFUSED_BY_SUBJECT["7"]
REFUSED_SIZE = "refused_size"  # X.3.4: message too big for the system
REFUSED_OTHER = "refused_other"


def reply_result(reply: str) -> str:
    """The result label for a final reply such as "552 5.3.4 Message too big"."""
    first = reply[:1]
    if first == "2":
        return ACCEPTED
    if first == "4":
        return DEFERRED
    enhanced = reply[4:].split(" ", 1)[0].split(".")
    if len(enhanced) != 3:
        return REFUSED_OTHER
    if enhanced[1] == "3" and enhanced[2] == "4":
        return REFUSED_SIZE
    return _REFUSED_BY_SUBJECT.get(enhanced[1], REFUSED_OTHER)
