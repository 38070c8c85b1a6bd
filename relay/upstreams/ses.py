"""Amazon SES (API v2) upstream: the raw MIME bytes plus an explicit envelope.

SESv2 `SendEmail` with `Content.Raw` sends the bytes as given. When `Destination` is set,
SES delivers to those addresses and not to what the To/Cc headers say, which is exactly the
SMTP envelope semantics we need: Bcc recipients (in the envelope, absent from the headers)
are kept, and header recipients that were never RCPT TO are not mailed. `FromEmailAddress`
carries the envelope sender; it must be a verified identity (address or domain).

Facts this module is built on (SES developer guide and API reference):
- At most 50 recipients per call, so larger envelopes are sent in batches.
- SES replaces Date and Message-ID, and rejects a message with a second DKIM-Signature;
  see `should_dkim_sign` and `dkim_skip_headers` for what the dispatcher does about it.
- SES does not support SMTPUTF8: local parts must be ASCII; domains go in as Punycode.
- boto3 retries throttling and timeouts by itself (up to 5 attempts in standard mode). A
  retried timeout can send twice and the retries delay failover, so `max_attempts`
  defaults to 1: the dispatcher owns retry and failover.

boto3 is blocking, so each call runs in this upstream's own thread pool (sized by
`max_concurrency`), not in the loop's shared default executor, which a slow SES would
otherwise starve for the spool's fsyncs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from relay.aws import aws_client
from relay.message import Envelope
from relay.outcomes import Accepted, PermanentError, RecipientRefusal, TransientError, UpstreamError
from relay.upstreams.base import Upstream

if TYPE_CHECKING:
    from relay.config import Config, UpstreamConfig

log = logging.getLogger("relay.upstreams")

#: SES refuses a message with more recipients than this in one call.
MAX_RECIPIENTS_PER_CALL = 50

_TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
#: The message tag carrying our queue id: SES copies a message's tags into every event it
#: publishes (mail.tags), which is how relay.events.ses finds the message again.
RELAY_ID_TAG = "relay_id"

# Error codes (the `Error.Code` of a ClientError), grouped by what they mean for routing.
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
# The account or its configuration is unusable: open the breaker, not the message's fault.
_ACCOUNT_CODES = frozenset(
    {
        "AccountSendingPausedException",
        "SendingPausedException",
        "AccountSuspendedException",
        "MailFromDomainNotVerifiedException",
        "MailFromDomainNotVerified",
        "ConfigurationSetDoesNotExist",
        "ConfigurationSetDoesNotExistException",
        "ConfigurationSetSendingPausedException",
        "NotFoundException",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "InvalidSignatureException",
        "NotAuthorized",
    }
)
_EXPIRED_CREDENTIAL_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired"})

_RATE_RE = re.compile(r"maximum send(?:ing)? rate exceeded", re.IGNORECASE)
_DAILY_QUOTA_RE = re.compile(r"daily message quota exceeded|sending quota", re.IGNORECASE)
_UNVERIFIED_RE = re.compile(
    r"not verified|did not have authority to send|not authorized to send", re.IGNORECASE
)
_TOO_LARGE_RE = re.compile(r"message length is more than|too large|exceeds.*size", re.IGNORECASE)

#: Seconds to wait after "maximum sending rate exceeded": the rate is per second.
RATE_RETRY_AFTER = 1.0
#: The daily quota is a rolling 24-hour window; an hour is a useful first probe.
DAILY_QUOTA_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class SESSettings:
    """Keys of an `[[upstream]]` table with `type = "ses"`."""

    region: str
    # A VPC endpoint, or a local emulator in tests; empty: the public regional endpoint.
    endpoint_url: str = ""
    configuration_set: str = ""
    # Message tags for SES event publishing (name → value; ASCII letters, digits, _ and -).
    tags: dict[str, str] = field(default_factory=dict)
    # Attempts boto3 makes per send, including the first. More than 1 also retries read
    # timeouts, which may duplicate a message SES already took.
    max_attempts: int = 1

    def validate(self) -> None:
        if not self.region:
            raise ValueError("region must name an AWS region such as eu-west-1")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError("max_attempts must be between 1 and 10")
        if self.endpoint_url and not self.endpoint_url.startswith(("https://", "http://")):
            raise ValueError(f"endpoint_url must be an http(s) URL, got {self.endpoint_url!r}")
        for name, value in self.tags.items():
            if name == RELAY_ID_TAG:
                raise ValueError(
                    f"tags.{name}: the relay sets this tag itself (its message id, which"
                    " SES events carry back); choose another name"
                )
            if not _TAG_RE.match(name) or not _TAG_RE.match(value):
                raise ValueError(
                    f"tags.{name}: tag names and values may contain only ASCII "
                    "letters, digits, '_' and '-' (1 to 256 characters)"
                )


class SESUpstream(Upstream):
    """Hands each message to SESv2 SendEmail as raw MIME, with the envelope as Destination."""

    type_name = "ses"
    Settings = SESSettings
    wants_dkim = True
    #: Headers our DKIM signature must not cover: SES overwrites Date and Message-ID (and
    #: owns Return-Path and Bounces-To), which would break the signature in transit.
    dkim_skip_headers: ClassVar[frozenset[str]] = frozenset(
        {"message-id", "date", "return-path", "bounces-to"}
    )

    def __init__(
        self,
        name: str,
        region: str,
        *,
        endpoint_url: str = "",
        configuration_set: str = "",
        tags: Mapping[str, str] | None = None,
        max_attempts: int = 1,
        timeout: float = 30.0,
        max_concurrency: int = 16,
    ) -> None:
        super().__init__(name)
        self.region = region
        self.endpoint_url = endpoint_url
        self.configuration_set = configuration_set
        self.tags = dict(tags or {})
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self._client: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(
        cls, common: UpstreamConfig, settings: SESSettings, relay_config: Config
    ) -> SESUpstream:
        return cls(
            common.name,
            settings.region,
            endpoint_url=settings.endpoint_url,
            configuration_set=settings.configuration_set,
            tags=settings.tags,
            max_attempts=settings.max_attempts,
            timeout=float(common.timeout),
            max_concurrency=common.max_concurrency,
        )

    # -- DKIM policy, read by the dispatcher ------------------------------------------------

    def should_dkim_sign(self, data: bytes) -> bool:
        """False when the message already carries a DKIM-Signature.

        SES refuses a message whose header has DKIM-Signature more than once, so adding ours
        to an already signed message would turn a deliverable message into a rejected one.
        """
        return self.wants_dkim and not has_header(data, b"dkim-signature")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, self.max_concurrency), thread_name_prefix=f"ses-{self.name}"
        )
        # Creating the client resolves credentials (env, files, SSO, instance metadata), which
        # may block on the network: do it in the pool too.
        self._client = await self._run(self._make_client)
        log.info(
            "upstream %s: SES v2 client ready (region %s%s)",
            self.name,
            self.region,
            f", endpoint {self.endpoint_url}" if self.endpoint_url else "",
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _make_client(self) -> Any:
        import boto3

        return aws_client(
            "sesv2",
            region=self.region,
            endpoint_url=self.endpoint_url,
            connect_timeout=min(self.timeout, 10.0),
            read_timeout=self.timeout,
            total_attempts=self.max_attempts,  # SES's max_attempts counts the first try
            session=boto3.session.Session(),  # one per upstream: sessions aren't thread-safe
            max_pool_connections=max(1, self.max_concurrency),
            tcp_keepalive=True,
        )

    async def _run(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    # -- sending --------------------------------------------------------------------------------

    async def send(self, envelope: Envelope, data: bytes) -> Accepted:
        if self._client is None:
            raise TransientError(f"{self.name}: upstream not started", upstream_wide=True)
        sender = _ses_address(envelope.mail_from) if envelope.mail_from else ""
        rcpts: list[tuple[str, str]] = []  # (as in the envelope, as given to SES)
        refused: dict[str, RecipientRefusal] = {}
        for rcpt in envelope.rcpt_tos:
            converted = _ses_address(rcpt)
            if converted is None:
                refused[rcpt] = RecipientRefusal(
                    permanent=False,
                    reason="SES does not support SMTPUTF8 (non-ASCII local "
                    "part); another upstream may deliver it",
                )
            else:
                rcpts.append((rcpt, converted))
        if sender is None:
            # Not this message's fault everywhere: an SMTPUTF8-capable upstream can take it.
            raise TransientError(
                f"{self.name}: SES does not support SMTPUTF8 senders ({envelope.mail_from!r})"
            )
        if not rcpts:
            raise TransientError(
                f"{self.name}: no recipient SES can address (SMTPUTF8 not supported)"
            )

        batches = [
            rcpts[i : i + MAX_RECIPIENTS_PER_CALL]
            for i in range(0, len(rcpts), MAX_RECIPIENTS_PER_CALL)
        ]
        ids: list[str] = []
        for index, batch in enumerate(batches):
            request = self._request(sender, [ses for _, ses in batch], data, envelope.queue_id)
            started = time.monotonic()
            try:
                response = await self._run(self._send_one, request)
            except Exception as exc:
                error = classify(exc, upstream=self.name)
                log.info(
                    "upstream %s: send failed after %.0f ms: %s",
                    self.name,
                    (time.monotonic() - started) * 1000,
                    error.reason,
                )
                if index == 0:
                    raise error from exc
                # Earlier batches went out: raising now would make the dispatcher resend
                # them. Report this batch's recipients as refused instead.
                permanent = isinstance(error, PermanentError) and not error.upstream_wide
                for original, _ in batch:
                    refused[original] = RecipientRefusal(permanent=permanent, reason=error.reason)
                continue
            ids.append(str(response.get("MessageId", "")))
        return Accepted(
            provider_id=",".join(i for i in ids if i) or None,
            refused=refused,
            detail=f"{len(ids)} SES call(s)" if len(batches) > 1 else "",
        )

    def _request(
        self, sender: str, destinations: list[str], data: bytes, relay_id: str
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "Destination": {"ToAddresses": destinations},
            "Content": {"Raw": {"Data": data}},
        }
        if sender:
            request["FromEmailAddress"] = sender
        # A null sender (a bounce we generate) has no FromEmailAddress: SES then takes the
        # identity from the From header, and uses its own bounce address as MAIL FROM.
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        tags = [{"Name": k, "Value": v} for k, v in self.tags.items()]
        if relay_id and _TAG_RE.match(relay_id):
            tags.append({"Name": RELAY_ID_TAG, "Value": relay_id})
        if tags:
            request["EmailTags"] = tags
        return request

    def _send_one(self, request: dict[str, Any]) -> dict[str, Any]:
        response: dict[str, Any] = self._client.send_email(**request)
        return response


# -- helpers -------------------------------------------------------------------------------------


def _ses_address(address: str) -> str | None:
    """The address as SES takes it (Punycode domain), or None if SES cannot take it at all."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if not local.isascii():
        return None
    if domain and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return f"{local}@{domain}" if at else local


def has_header(data: bytes, name: bytes) -> bool:
    """Whether the header section of `data` has a field called `name` (case-insensitive)."""
    end = data.find(b"\r\n\r\n")
    end_lf = data.find(b"\n\n")
    ends = [e for e in (end, end_lf) if e >= 0]
    head = data[: min(ends)] if ends else data
    needle = name.lower() + b":"
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            continue
        if line.lower().replace(b" ", b"").replace(b"\t", b"").startswith(needle):
            return True
    return False


def classify(exc: BaseException, *, upstream: str) -> UpstreamError:
    """Turn a boto3/botocore exception into the typed outcome the dispatcher acts on."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.ClientError):
        return _classify_client_error(exc, upstream)
    if isinstance(exc, bce.ReadTimeoutError):
        # The request was sent; SES may have queued the message before the answer was lost.
        return TransientError(f"{upstream}: no answer from SES ({exc})", ambiguous=True)
    if isinstance(
        exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ProxyConnectionError)
    ):
        # The request never left: safe to try elsewhere, and SES as a whole is unreachable.
        return TransientError(f"{upstream}: cannot reach SES ({exc})", upstream_wide=True)
    if isinstance(exc, bce.ConnectionClosedError):
        return TransientError(
            f"{upstream}: SES closed the connection ({exc})", upstream_wide=True, ambiguous=True
        )
    if isinstance(exc, bce.HTTPClientError):
        return TransientError(
            f"{upstream}: HTTP error talking to SES ({exc})", upstream_wide=True, ambiguous=True
        )
    if isinstance(
        exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)
    ):
        return PermanentError(f"{upstream}: no usable AWS credentials ({exc})", upstream_wide=True)
    if isinstance(exc, bce.ParamValidationError):
        # Our request was malformed (e.g. an address SES's model rejects): per message.
        return PermanentError(f"{upstream}: SES refused the request parameters ({exc})")
    if isinstance(exc, bce.BotoCoreError):
        return TransientError(f"{upstream}: {type(exc).__name__}: {exc}", upstream_wide=True)
    return TransientError(f"{upstream}: unexpected {type(exc).__name__}: {exc}", upstream_wide=True)


def _classify_client_error(exc: Any, upstream: str) -> UpstreamError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")) or str(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    reason = f"{upstream}: SES {code or status}: {message}"

    # Quota before rate: v1-style APIs report both as code "Throttling".
    if code == "LimitExceededException" or _DAILY_QUOTA_RE.search(message):
        return TransientError(reason, retry_after=DAILY_QUOTA_RETRY_AFTER, upstream_wide=True)
    if code in _THROTTLE_CODES or _RATE_RE.search(message) or status == 429:
        return TransientError(reason, retry_after=RATE_RETRY_AFTER)
    if code in _ACCOUNT_CODES or code in _AUTH_CODES:
        return PermanentError(reason, upstream_wide=True)
    if code in _EXPIRED_CREDENTIAL_CODES:
        # Rotating credentials (instance role, SSO) come back by themselves.
        return TransientError(reason, upstream_wide=True)
    if code == "MessageRejected":
        if _UNVERIFIED_RE.search(message):
            # An identity (sender domain, or recipient in the sandbox) is not verified in
            # this account: this message's identities, not SES's health. Another upstream
            # may send it; verified senders keep using SES.
            return TransientError(reason, sender_scoped=True)
        if _TOO_LARGE_RE.search(message):
            # SES's size limit, not every provider's: let another upstream try.
            return TransientError(reason)
        return PermanentError(reason)
    if code == "BadRequestException":
        # Invalid input such as a malformed address: the message as given can't be sent.
        return PermanentError(reason)
    if status >= 500 or code in ("InternalFailure", "ServiceUnavailable", "InternalServerError"):
        # Counted towards failures_to_open: one stray 500 is not an outage.
        return TransientError(reason)
    if 400 <= status < 500:
        return PermanentError(reason)
    return TransientError(reason, upstream_wide=True)
