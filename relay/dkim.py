"""DKIM signing on the way out (RFC 6376), and key generation for `relay dkim keygen`.

Receivers judge a message by the DKIM signature of the domain in its From header (DMARC
alignment), so the key is chosen by that domain. One key per sender domain, configured as
`[[dkim]]` tables; keys are parsed and checked once, at startup, so a bad key fails
`check-config` rather than the first message.

Signing prepends a DKIM-Signature and changes nothing else: relaxed/relaxed canonicalization
survives the header refolding and whitespace changes some providers make, and only headers
that are present are signed (signing an absent header forbids a provider from adding it,
and providers add Message-ID or Date). From is signed once more than it occurs
("oversigning"), so nobody can add a second From that a mail client would show instead.

The signature is computed here (canonicalization per RFC 6376 3.4.2 and 3.4.4, RSA by
`cryptography`, i.e. OpenSSL) rather than by dkimpy, whose pure-Python RSA took 13 ms of
CPU per message (a ceiling of about 75 signed messages a second per core); dkimpy stays
in the tests as the independent verifier.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.durable import write_new
from relay.message import split_message

if TYPE_CHECKING:
    from relay.config import Config, DKIMConfig

log = logging.getLogger("relay.dkim")

#: Headers signed when present, in this order. These are what a recipient sees or what
#: changes how the body is read; trace and transport headers are left out on purpose.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
#: Smallest RSA key receivers still accept (RFC 8301 requires verifiers to reject < 1024).
MIN_KEY_BITS = 1024
#: Longest character-string in a DNS TXT record (RFC 1035 section 3.3).
TXT_CHUNK = 255


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One parsed [[dkim]] entry; `domain` is lower-case ASCII (A-label) as used in d=."""

    domain: str
    selector: str
    pem: bytes  # PKCS#1 PEM with LF line ends
    bits: int
    key: rsa.RSAPrivateKey


def _a_label(domain: str) -> str:
    """Lower-case ASCII form of a domain, so that bücher.example matches xn--bcher-kva.example."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def load_key(domain: str, selector: str, private_key: str) -> SigningKey:
    """Parse and check one private key; ValueError names the domain when it is unusable."""
    where = f"dkim key for domain {domain!r} (selector {selector!r})"
    if not domain or not selector:
        raise ValueError(f"{where}: domain and selector must not be empty")
    try:
        key = serialization.load_pem_private_key(private_key.strip().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"{where}: private_key is not an unencrypted PEM private key ({exc})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            f"{where}: private_key must be an RSA key (rsa-sha256), got {type(key).__name__}"
        )
    if key.key_size < MIN_KEY_BITS:
        raise ValueError(
            f"{where}: the key has {key.key_size} bits; receivers reject "
            f"fewer than {MIN_KEY_BITS} (2048 recommended)"
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return SigningKey(_a_label(domain), selector.strip(), pem, key.key_size, key)


class DKIMSigner:
    """Signs messages with the key of their From domain; a message without one is untouched."""

    def __init__(
        self, keys: Iterable[SigningKey], *, headers: Sequence[str] = DEFAULT_SIGNED_HEADERS
    ) -> None:
        self._keys: dict[str, SigningKey] = {}
        for key in keys:
            if key.domain in self._keys:
                raise ValueError(
                    f"dkim: domain {key.domain!r} is configured twice; "
                    "use one key per sender domain"
                )
            self._keys[key.domain] = key
        self.headers = tuple(h.lower() for h in headers)
        if "from" not in self.headers:
            raise ValueError("dkim: the signed header list must include From (RFC 6376 5.4)")

    @classmethod
    def from_configs(cls, configs: Iterable[DKIMConfig]) -> DKIMSigner:
        """Build from `[[dkim]]` tables (private_key is the resolved PEM text)."""
        return cls(load_key(c.domain, c.selector, str(c.private_key)) for c in configs)

    @classmethod
    def from_config(cls, config: Config) -> DKIMSigner:
        return cls.from_configs(config.dkim)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def key_for(self, domain: str) -> SigningKey | None:
        """The key for `domain`, else for its closest configured parent domain.

        A parent key still aligns under DMARC's default relaxed mode (mail.example.com
        signed with d=example.com passes), so one key can cover a domain's subdomains.
        """
        name = _a_label(domain)
        while name:
            key = self._keys.get(name)
            if key is not None:
                return key
            _, dot, name = name.partition(".")
            if not dot or "." not in name:  # never fall back to a bare TLD
                break
        return None

    def choose_key(self, data: bytes, envelope_from: str = "") -> SigningKey | None:
        """The key for the header From domain, falling back to the envelope sender's."""
        for candidate in (*header_from_domains(data), _domain_of(envelope_from)):
            if candidate:
                key = self.key_for(candidate)
                if key is not None:
                    return key
        return None

    def sign(
        self, data: bytes, *, envelope_from: str = "", skip_headers: Collection[str] = ()
    ) -> bytes:
        """Return `data` with a DKIM-Signature prepended, or `data` itself if no key matches.

        `skip_headers` leaves fields out of the signature that the next hop will rewrite
        (SES replaces Message-ID and Date; see `SESUpstream.dkim_skip_headers`).
        """
        key = self.choose_key(data, envelope_from)
        if key is None:
            return data
        head, body = split_message(data)
        present = {name.lower() for name, _ in iter_headers(head)}
        skip = {h.lower() for h in skip_headers}
        if "from" not in present:
            log.warning("dkim: message has no From header; not signing")
            return data
        include = [h for h in self.headers if h in present and h not in skip]
        include.append("from")  # oversign: a From added in transit breaks the signature
        linesep = b"\r\n" if b"\r\n" in data[: data.find(b"\n") + 1] else b"\n"
        return signature_header(key, head, body, include, linesep, int(time.time())) + data


def signature_header(
    key: SigningKey,
    head: bytes,
    body: bytes,
    include: Sequence[str],
    linesep: bytes,
    now: int,
) -> bytes:
    """The DKIM-Signature field (relaxed/relaxed, rsa-sha256) for a message split into
    `head` and `body`, ending in `linesep`. `include` is the h= list, lower-case, repeats
    allowed (oversigning)."""
    body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode()
    tags = [
        "v=1",
        "a=rsa-sha256",
        "c=relaxed/relaxed",
        f"d={key.domain}",
        f"s={key.selector}",
        f"t={now}",
        "h=" + ":".join(include),
        f"bh={body_hash}",
        "b=",
    ]
    value = _fold(tags, linesep)
    signed = _selected_headers(head, include) + _relaxed_header(b"DKIM-Signature", value.encode())
    signature = key.key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    b64 = base64.b64encode(signature).decode()
    folded_b = (linesep.decode() + " ").join(b64[i : i + 72] for i in range(0, len(b64), 72))
    return b"DKIM-Signature: " + (value + folded_b).encode() + linesep


_FWS = re.compile(rb"[ \t]+")
_LINE_END = re.compile(rb"\r?\n")
_FIELD_START = re.compile(rb"\r?\n(?![ \t])")


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, whitespace runs as one space,
    none at either end of the value; no CRLF (the caller adds it).

    At the ends, "whitespace" is every ASCII space character (a CR before the CRLF, form
    feed, vertical tab), not only the RFC's SP and HTAB: that is what verifiers do (dkimpy
    strips them, OpenDKIM skips `isspace()`), and a signature is only worth what they
    accept. Inside the value only SP and HTAB runs are folded, where the RFC and dkimpy
    agree."""
    value = _FWS.sub(b" ", _LINE_END.sub(b"", value)).strip()
    return name.strip(b" \t").lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: whitespace runs as one space, none at line ends, no empty lines at
    the end, CRLF line ends (an LF-only message is hashed as it will travel)."""
    lines = [_FWS.sub(b" ", line).rstrip(b" ") for line in _LINE_END.split(body)]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def _selected_headers(head: bytes, include: Sequence[str]) -> bytes:
    """The canonical fields named by h=, each name taking that field's instances from the
    bottom up; a name with no instance left adds nothing (RFC 6376 5.4.2)."""
    instances: dict[bytes, list[bytes]] = {}
    for field in _FIELD_START.split(head):
        name, colon, value = field.partition(b":")
        if colon:
            instances.setdefault(name.strip().lower(), []).append(_relaxed_header(name, value))
    out = []
    for name in include:
        found = instances.get(name.encode())
        if found:
            out.append(found.pop() + b"\r\n")
    return b"".join(out)


def _fold(tags: Sequence[str], linesep: bytes) -> str:
    """The tag list as a folded field value, lines of at most 78 characters where the tags
    allow (h= may break after any colon); b= starts a line of its own and is left empty
    for the signature, which the caller appends."""
    words: list[str] = []
    for tag in tags[:-1]:
        names = tag.split(":") if tag.startswith("h=") else [tag]
        words += [n + ":" for n in names[:-1]] + [names[-1] + ";"]
    lines: list[str] = []
    line = "DKIM-Signature:"
    for word in words:
        joiner = "" if line.endswith(":") and line != "DKIM-Signature:" else " "
        if len(line) + len(joiner) + len(word) > 78:
            lines.append(line)
            line = word
        else:
            line += joiner + word
    lines += [line, tags[-1]]
    return (linesep.decode() + " ").join(lines)[len("DKIM-Signature: ") :]


# -- header access (bytes in, no full MIME parse: messages can be large) ----------------------


def iter_headers(head: bytes) -> Iterable[tuple[str, str]]:
    """(name, unfolded value) pairs; non-UTF-8 bytes are replaced, not fatal."""
    name: str | None = None
    parts: list[str] = []
    for raw in re.split(rb"\r?\n", head):
        line = raw.decode("utf-8", errors="replace")
        if line[:1] in (" ", "\t") and name is not None:
            parts.append(line)
            continue
        if name is not None:
            yield name, "".join(parts).strip()
        field_name, colon, value = line.partition(":")
        if colon and field_name.strip() and " " not in field_name.strip():
            name, parts = field_name.strip(), [value]
        else:
            name, parts = None, []
    if name is not None:
        yield name, "".join(parts).strip()


def header_values(data: bytes, field: str) -> list[str]:
    wanted = field.lower()
    return [v for n, v in iter_headers(split_message(data)[0]) if n.lower() == wanted]


def header_from_domains(data: bytes) -> list[str]:
    """Domains of the From header's addresses, in order."""
    return [d for _, addr in getaddresses(header_values(data, "from")) if (d := _domain_of(addr))]


def _domain_of(address: str) -> str:
    _, at, domain = address.strip().strip("<>").rpartition("@")
    return domain.strip() if at else ""


# -- keys and DNS records ----------------------------------------------------------------------


def public_key_b64(private_pem: bytes | str) -> str:
    """The p= value: the DER SubjectPublicKeyInfo of the key, base64."""
    data = private_pem.encode() if isinstance(private_pem, str) else private_pem
    key = serialization.load_pem_private_key(data, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def txt_record_value(private_pem: bytes | str) -> str:
    """What the TXT record must contain, as one string (what a resolver returns joined)."""
    return f"v=DKIM1; k=rsa; p={public_key_b64(private_pem)}"


def txt_record(domain: str, selector: str, private_pem: bytes | str) -> str:
    """A zone-file line, with the value split into 255-character strings."""
    value = txt_record_value(private_pem)
    chunks = [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{_a_label(domain)} IN TXT {quoted}"


def generate_key(
    domain: str, selector: str, directory: str | Path, bits: int = 2048
) -> tuple[Path, str]:
    """Create a private key file (mode 0600) and return it with the DNS TXT record to publish.

    The file is `<directory>/<domain>.<selector>.pem`; an existing file is never
    overwritten, since replacing a key whose public half is in DNS breaks every signature.
    """
    if bits < MIN_KEY_BITS:
        raise ValueError(f"bits must be at least {MIN_KEY_BITS}, got {bits}")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", selector):
        raise ValueError(f"selector {selector!r} is not a valid DNS label sequence")
    ascii_domain = _a_label(domain)
    if (
        not re.fullmatch(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", ascii_domain)
        or "." not in ascii_domain
    ):
        raise ValueError(f"domain {domain!r} is not a domain name such as example.com")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{ascii_domain}.{selector}.pem"
    try:
        write_new(path, pem, mode=0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; not overwriting a DKIM key (choose another selector to rotate)"
        ) from None
    path.chmod(0o600)  # the umask may only narrow it; make the mode explicit
    return path, txt_record(ascii_domain, selector, pem)
