"""Amazon SNS message verification for `POST /inbound/sns` (DESIGN.md invariant 6).

Anyone can POST JSON to the relay's web port, so nothing in an SNS body is trusted until:

1. the body is a JSON object of a known `Type` with every signed field present (else 400);
2. its `TopicArn` is on the operator's allowlist (a valid signature only proves that *some*
   AWS account's topic sent it, not that the topic is ours);
3. its `SigningCertURL` is https on `sns.<region>.amazonaws.com[.cn]`, for the topic's
   region, with a path ending in `.pem` -- checked *before* any fetch, so a forged body can
   never make the relay connect to a host of the attacker's choosing (SSRF);
4. its `Timestamp` is recent (replays of an old, genuinely signed body are refused);
5. its `Signature` verifies (RSA PKCS#1 v1.5; SignatureVersion 1 = SHA1, 2 = SHA256) over
   the string to sign: `Name\\nValue\\n` for a fixed, byte-sorted list of keys per type, with
   `Subject` only when present (AWS SNS developer guide, "Verifying the signatures of Amazon
   SNS messages").

`SNSVerifier.verify()` returns a typed `SNSMessage` or raises `SNSMalformed` (HTTP 400),
`SNSRejected` (403) or `SNSUnavailable` (503: the certificate could not be fetched, so SNS
should retry later rather than drop the notification).

The certificate is fetched through an injectable `Fetcher`. The default, `HTTPSFetcher`,
is aiohttp with a timeout, a size cap and normal TLS verification; tests give it their own
CA and an aiohttp resolver that maps the allowed AWS host name to a loopback server, so the
host check above runs unchanged in tests and in production.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.inbound import jsonlimits
from relay.inbound.jsonlimits import JSONLimitError

log = logging.getLogger("relay.inbound")

MessageType = Literal["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]

#: The keys of the string to sign, per message type, in the byte-sorted order SNS uses.
_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
SIGNED_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": _CONFIRMATION_KEYS,
    "UnsubscribeConfirmation": _CONFIRMATION_KEYS,
}
#: Keys that may be absent from the string to sign (and are then left out entirely).
OPTIONAL_SIGNED_KEYS: Final = frozenset({"Subject"})

_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {"1": hashes.SHA1, "2": hashes.SHA256}

# sns.<region>.amazonaws.com, and the China partition's amazonaws.com.cn. The region label
# is matched against the topic's region separately.
_SNS_HOST = re.compile(r"sns\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")
_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:([a-z0-9-]+):\d{12}:[A-Za-z0-9_.-]{1,256}")

# A signing certificate is a couple of kilobytes; anything much larger is not one.
MAX_CERT_BYTES: Final = 64 * 1024


class SNSError(Exception):
    """Base of the verification outcomes; `status` is the HTTP status to answer with."""

    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SNSMalformed(SNSError):
    """Not an SNS message at all (bad JSON, missing fields, unknown type): HTTP 400."""

    status = 400


class SNSRejected(SNSError):
    """A well-formed message we refuse to trust (signature, topic, age, cert URL): HTTP 403."""

    status = 403


class SNSUnavailable(SNSError):
    """The message could not be checked right now (certificate fetch failed): HTTP 503, so
    SNS retries it instead of the relay dropping a possibly genuine notification."""

    status = 503


class FetchFailed(Exception):
    """A fetcher could not get the URL (network error, timeout, non-200, too large)."""


#: Fetch a URL's body. Raises FetchFailed. Only ever called with URLs that passed the
#: host checks in this module.
Fetcher = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SNSMessage:
    """A verified SNS message. `message` is the payload (for SES, the notification JSON)."""

    type: MessageType
    message_id: str
    topic_arn: str
    message: str
    timestamp: datetime
    signature_version: str
    signing_cert_url: str
    subject: str | None = None
    subscribe_url: str | None = None
    token: str | None = None
    unsubscribe_url: str | None = None

    @property
    def dedupe_key(self) -> str:
        """SNS reuses the MessageId when it retries a delivery, so it identifies duplicates."""
        return f"sns:{self.message_id}"


# -- pure helpers --------------------------------------------------------------------------


def parse_body(body: bytes | str) -> dict[str, Any]:
    """Decode the POST body into the SNS JSON object, or raise SNSMalformed."""
    try:
        doc = jsonlimits.loads(body)
    except JSONLimitError as exc:
        raise SNSMalformed(f"body refused: {exc}") from None
    except ValueError as exc:
        raise SNSMalformed(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SNSMalformed("body is not a JSON object")
    msg_type = doc.get("Type")
    if not isinstance(msg_type, str) or msg_type not in SIGNED_KEYS:
        raise SNSMalformed(f"unknown or missing Type {msg_type!r}")
    for key in (*SIGNED_KEYS[msg_type], "SignatureVersion", "Signature", "SigningCertURL"):
        if key in OPTIONAL_SIGNED_KEYS and key not in doc:
            continue
        if key in ("Signature", "SignatureVersion", "SigningCertURL") and key not in doc:
            continue  # an unsigned message is well-formed but untrusted: 403, not 400
        value = doc.get(key)
        if not isinstance(value, str):
            raise SNSMalformed(f"{key} is missing or not a string")
        try:
            value.encode("utf-8")  # JSON may carry "\ud800"; the string to sign is UTF-8
        except UnicodeEncodeError:
            raise SNSMalformed(f"{key} is not Unicode text (a lone surrogate)") from None
    return doc


def string_to_sign(doc: Mapping[str, Any]) -> bytes:
    """The exact bytes SNS signed: `Name\\nValue\\n` for each signed key, in order."""
    out: list[str] = []
    for key in SIGNED_KEYS[str(doc["Type"])]:
        if key in OPTIONAL_SIGNED_KEYS and doc.get(key) is None:
            continue
        out.append(f"{key}\n{doc[key]}\n")
    return "".join(out).encode("utf-8")


def topic_region(topic_arn: str) -> str:
    """The region part of a topic ARN, or raise SNSRejected if it is not an SNS topic ARN."""
    m = _TOPIC_ARN.fullmatch(topic_arn)
    if not m:
        raise SNSRejected(f"TopicArn {topic_arn!r} is not an SNS topic ARN")
    return m.group(1)


def check_sns_url(url: str, *, region: str | None, what: str, pem: bool) -> None:
    """Refuse any URL the relay should not fetch on a message's say-so.

    Allowed: `https://sns.<region>.amazonaws.com[.cn]/...` with no user info, no explicit
    port, and (for certificates) a path ending in `.pem` with no query. When `region` is
    given, the host's region must be it: SNS signs with its own region's certificate.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SNSRejected(f"{what} {url!r} is not a valid URL") from None
    if parts.scheme != "https":
        raise SNSRejected(f"{what} must be https, got {url!r}")
    if parts.username is not None or parts.password is not None or port is not None:
        raise SNSRejected(f"{what} must not carry user info or a port: {url!r}")
    host = (parts.hostname or "").lower()
    m = _SNS_HOST.fullmatch(host)
    if not m or parts.netloc.lower() != host:
        raise SNSRejected(f"{what} host {host!r} is not sns.<region>.amazonaws.com")
    if region is not None and m.group(1) != region:
        raise SNSRejected(f"{what} region {m.group(1)!r} differs from the topic's {region!r}")
    if pem and (not parts.path.endswith(".pem") or parts.query or parts.fragment):
        raise SNSRejected(f"{what} must be a .pem path without a query: {url!r}")


def parse_timestamp(value: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise SNSMalformed(f"Timestamp {value!r} is not ISO 8601") from None
    if ts.tzinfo is None:
        raise SNSMalformed(f"Timestamp {value!r} has no time zone")
    return ts


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """The RSA public key of a PEM certificate; SNS signs with RSA only."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SNSRejected("the signing certificate is not a PEM X.509 certificate") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SNSRejected("the signing certificate does not hold an RSA key")
    return key


# -- fetching ------------------------------------------------------------------------------


class HTTPSFetcher:
    """GET over https with a timeout and a size cap: the default `Fetcher`.

    `ssl` and `resolver` exist for tests: a private CA, and a resolver that answers the
    allowed AWS host name with a loopback address and port. Production passes neither, so
    system CAs and real DNS are used.
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        resolver: AbstractResolver | None = None,
        max_bytes: int = MAX_CERT_BYTES,
    ) -> None:
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.resolver = resolver
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self.ssl_context if self.ssl_context is not None else True,
                resolver=self.resolver,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def __call__(self, url: str) -> bytes:
        if urlsplit(url).scheme != "https":  # defence in depth: callers check too
            raise FetchFailed(f"refusing non-https URL {url!r}")
        try:
            async with self._get_session().get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise FetchFailed(f"GET {url} answered {resp.status}")
                body = await resp.content.read(self.max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchFailed(f"GET {url} failed: {exc!r}") from exc
        if len(body) > self.max_bytes:
            raise FetchFailed(f"GET {url}: response larger than {self.max_bytes} bytes")
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- the verifier --------------------------------------------------------------------------


class SNSVerifier:
    """Verifies SNS POST bodies for a set of allowed topics; caches signing certificates.

    One instance lives for the web server's lifetime (create it in a cleanup_ctx and call
    `close()` there). `clock` returns Unix seconds; tests inject it instead of sleeping.
    """

    def __init__(
        self,
        *,
        topics: Iterable[str],
        fetcher: Fetcher | None = None,
        max_age: float = 3600.0,
        max_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
        cache_size: int = 32,
    ) -> None:
        self.topics = frozenset(topics)
        self._own_fetcher = fetcher is None
        self.fetcher: Fetcher = fetcher if fetcher is not None else HTTPSFetcher()
        self.max_age = max_age
        self.max_skew = max_skew
        self.clock = clock
        self.cache_size = cache_size
        self._keys: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()

    async def close(self) -> None:
        if self._own_fetcher and isinstance(self.fetcher, HTTPSFetcher):
            await self.fetcher.close()

    async def verify(self, body: bytes | str) -> SNSMessage:
        """Check everything in the module docstring, cheapest first, fetching last."""
        doc = parse_body(body)
        topic = doc["TopicArn"]
        if topic not in self.topics:
            raise SNSRejected(f"topic {topic} is not allowed")
        region = topic_region(topic)
        if not isinstance(doc.get("Signature"), str) or not doc["Signature"]:
            raise SNSRejected("message is not signed")
        version = doc.get("SignatureVersion")
        if not isinstance(version, str) or version not in _HASHES:
            raise SNSRejected(f"unsupported SignatureVersion {version!r}")
        cert_url = doc.get("SigningCertURL")
        if not isinstance(cert_url, str):
            raise SNSRejected("SigningCertURL is missing")
        check_sns_url(cert_url, region=region, what="SigningCertURL", pem=True)
        timestamp = parse_timestamp(doc["Timestamp"])
        age = self.clock() - timestamp.timestamp()
        if age > self.max_age:
            raise SNSRejected(f"message is stale: sent {age:.0f}s ago")
        if age < -self.max_skew:
            raise SNSRejected(f"message is dated {-age:.0f}s in the future")
        try:
            signature = base64.b64decode(doc["Signature"], validate=True)
        except (binascii.Error, ValueError):
            raise SNSRejected("Signature is not base64") from None

        key = await self._public_key(cert_url)
        try:
            key.verify(signature, string_to_sign(doc), padding.PKCS1v15(), _HASHES[version]())
        except InvalidSignature:
            raise SNSRejected("signature does not verify") from None

        msg = SNSMessage(
            type=doc["Type"],
            message_id=doc["MessageId"],
            topic_arn=topic,
            message=doc["Message"],
            timestamp=timestamp,
            signature_version=version,
            signing_cert_url=cert_url,
            subject=_opt_str(doc, "Subject"),
            subscribe_url=_opt_str(doc, "SubscribeURL"),
            token=_opt_str(doc, "Token"),
            unsubscribe_url=_opt_str(doc, "UnsubscribeURL"),
        )
        log.debug("sns %s %s from %s verified", msg.type, msg.message_id, topic)
        return msg

    async def _public_key(self, url: str) -> rsa.RSAPublicKey:
        key = self._keys.get(url)
        if key is not None:
            self._keys.move_to_end(url)
            return key
        try:
            pem = await self.fetcher(url)
        except FetchFailed as exc:
            log.warning("sns signing certificate %s unavailable: %s", url, exc)
            raise SNSUnavailable(f"signing certificate unavailable: {exc}") from exc
        key = load_public_key(pem)
        self._keys[url] = key
        while len(self._keys) > self.cache_size:
            self._keys.popitem(last=False)
        return key

    async def confirm_subscription(self, msg: SNSMessage) -> str:
        """Visit a verified SubscriptionConfirmation's SubscribeURL; returns the answer text.

        The URL is held to the same rules as the certificate URL (https, the topic's
        `sns.<region>` host, no port), so even a verified message can't point the relay
        elsewhere.
        """
        if msg.type != "SubscriptionConfirmation" or not msg.subscribe_url:
            raise SNSMalformed("not a SubscriptionConfirmation with a SubscribeURL")
        if msg.topic_arn not in self.topics:
            raise SNSRejected(f"topic {msg.topic_arn} is not allowed")
        check_sns_url(
            msg.subscribe_url, region=topic_region(msg.topic_arn), what="SubscribeURL", pem=False
        )
        try:
            answer = await self.fetcher(msg.subscribe_url)
        except FetchFailed as exc:
            raise SNSUnavailable(f"subscription confirmation failed: {exc}") from exc
        log.info("sns subscription to %s confirmed", msg.topic_arn)
        return answer.decode("utf-8", "replace")


def _opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None
