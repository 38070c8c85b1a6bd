"""Envelope addresses (RFC 5321 4.1.2, RFC 6531 3.3), parsed by hand.

aiosmtpd hands MAIL/RCPT arguments to the email package's RFC 5322 header parser, which
accepts an unclosed `<x@example.com` and raises AttributeError/IndexError on unclosed
address literals (`<user@[1.2.3.4>`); the exception text then reached clients. The
envelope grammar is small and strict, so it is written out here: `split_path` finds the
path and the parameters (a syntax error is 501), `mailbox_problem` judges the mailbox.
"""

from __future__ import annotations

import enum
import ipaddress
import re

# RFC 6531 adds any non-ASCII character (surrogates excepted: they stand for bytes that
# were not UTF-8) to atext, qtext and domain labels.
_UTF8 = r"\u0080-\ud7ff\ue000-\U0010ffff"
# RFC 5321 4.1.2: Dot-string, Quoted-string (qtextSMTP or a quoted pair), and labels.
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
_LET_DIG = rf"[A-Za-z0-9{_UTF8}]"
_LABEL = re.compile(rf"{_LET_DIG}(?:[A-Za-z0-9\-{_UTF8}]*{_LET_DIG})?")
# RFC 5321 4.5.3.1.1 and 4.5.3.1.2.
MAX_LOCAL_PART, MAX_DOMAIN = 64, 255


class Problem(enum.Enum):
    SYNTAX = "syntax"
    NO_DOMAIN = "no domain"
    NEEDS_SMTPUTF8 = "needs SMTPUTF8"


def split_path(arg: str) -> tuple[str, str] | None:
    """`<mailbox> params` → (mailbox, params); None when the path is malformed.

    The closing `>` is the first one outside a quoted local part. A bare address without
    angle brackets is taken as Postfix takes it (old clients send `MAIL FROM:a@b`).
    """
    text = arg.lstrip()
    if not text.startswith("<"):
        mailbox, _, rest = text.partition(" ")
        if not mailbox or "<" in mailbox or ">" in mailbox:
            return None
        return mailbox, rest
    end = _closing_bracket(text)
    if end is None:
        return None
    rest = text[end + 1 :]
    if rest and not rest.startswith(" "):
        return None
    path = text[1:end]
    if path.startswith("@"):
        # A source route (`<@a,@b:user@c>`): RFC 5321 4.1.2 says to ignore it.
        _, colon, path = path.partition(":")
        if not colon:
            return None
    return path, rest.strip()


def _closing_bracket(text: str) -> int | None:
    if '"' not in text:  # no quoted local part (nearly every address): no scan in Python
        end = text.find(">", 1)
        return end if end > 0 else None
    quoted = escaped = False
    for i, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return None


def mailbox_problem(mailbox: str, *, smtputf8: bool) -> Problem | None:
    """What is wrong with `local@domain`, or None. Non-ASCII needs SMTPUTF8 (RFC 6531)."""
    local, at, domain = mailbox.rpartition("@")
    if not at:
        return Problem.NO_DOMAIN if _valid_local(mailbox) else Problem.SYNTAX
    if not (_valid_local(local) and _valid_domain(domain)):
        return Problem.SYNTAX
    if not smtputf8 and not mailbox.isascii():
        return Problem.NEEDS_SMTPUTF8
    return None


def _valid_local(local: str) -> bool:
    if not local or len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        return False
    return bool(_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local))


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _valid_literal(domain)
    return all(_LABEL.fullmatch(label) and len(label) <= 63 for label in domain.split("."))


def _valid_literal(domain: str) -> bool:
    if not domain.endswith("]"):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True
