"""The `[inbound]` section: where notifications come from, and where each recipient's mail goes.

`relay.config.parse()` keeps `[inbound]` as a raw table and `relay.checks.check()` calls
`parse_inbound()` on it, so `relay check-config` reports inbound mistakes with their key
(`inbound.route[0].destination.type: ...`) exactly like the rest of the file, while the
inbound package (and boto3) is only imported by configs that use it.

    [inbound.aws]        region, endpoint_url (VPC endpoint or a local emulator)
    [inbound.sns]        the POST /inbound/sns endpoint: topics allowlist, max_age
    [inbound.sqs]        an SQS queue to long-poll instead of (or besides) SNS
    [[inbound.route]]    recipients patterns -> destination, spam/virus actions

A section that is absent is off: an SQS-only setup need not mention SNS, and vice versa.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from relay.config import ConfigError, Duration, Size, build
from relay.inbound.destinations.registry import DestinationConfig, build_destination_config

if TYPE_CHECKING:
    from relay.config import Config

#: What to do with a message SES judged to be spam (or to carry a virus):
#: deliver it unchanged, tag it (headers and a Subject prefix), or put it in quarantine.
VerdictAction = Literal["deliver", "tag", "quarantine"]

#: Severity order, so a message that is both spam and infected gets the stricter action.
ACTION_SEVERITY: dict[str, int] = {"deliver": 0, "tag": 1, "quarantine": 2}


@dataclass(frozen=True)
class AWSSettings:
    region: str = ""
    # One endpoint for S3, KMS and SQS: a VPC endpoint, or a local emulator in tests.
    endpoint_url: str = ""


@dataclass(frozen=True)
class SNSSettings:
    enabled: bool = True
    # TopicArns whose notifications are accepted. A valid signature only proves that some
    # AWS account's topic sent the message, so this allowlist is what makes it ours.
    topics: tuple[str, ...] = ()
    # Refuse notifications signed longer ago than this (replays of captured posts).
    max_age: Duration = Duration(3600.0)
    # Largest POST body accepted; SNS messages are at most 256 KB plus the envelope.
    max_body: Size = Size(512 * 1024)

    def validate(self) -> None:
        if self.enabled and not self.topics:
            raise ValueError(
                "topics: required when the SNS endpoint is enabled (list the TopicArns, "
                "or set enabled = false)"
            )
        for topic in self.topics:
            if not topic.startswith("arn:") or ":sns:" not in topic:
                raise ValueError(f"topics: {topic!r} is not an SNS topic ARN")
        if self.max_age <= 0:
            raise ValueError("max_age must be positive")


@dataclass(frozen=True)
class SQSSettings:
    queue_url: str
    # Long polling: how long one ReceiveMessage call waits for messages (SQS allows 0-20s).
    wait_time: Duration = Duration(20.0)
    # How long a received message stays invisible to other consumers; extended while the
    # relay is still recording it, so it is never handed to a second consumer meanwhile.
    visibility_timeout: Duration = Duration(120.0)
    max_messages: int = 10

    def validate(self) -> None:
        if not self.queue_url.startswith(("https://", "http://")):
            raise ValueError(f"queue_url must be the queue's https URL, got {self.queue_url!r}")
        if not 0 <= self.wait_time <= 20:
            raise ValueError("wait_time must be between 0s and 20s (the SQS limit)")
        if not 1 <= self.visibility_timeout <= 43200:
            raise ValueError("visibility_timeout must be between 1s and 12h (the SQS limits)")
        if not 1 <= self.max_messages <= 10:
            raise ValueError("max_messages must be between 1 and 10 (the SQS limit)")


@dataclass(frozen=True)
class _RawRoute:
    """A route as written; `destination` is validated by its type's own settings class."""

    recipients: tuple[str, ...]
    destination: dict[str, Any]
    name: str = ""
    spam: VerdictAction = "tag"
    virus: VerdictAction = "quarantine"
    # Maildir for quarantined messages; empty: the [inbound] quarantine.
    quarantine: str = ""

    def validate(self) -> None:
        if not self.recipients:
            raise ValueError('recipients: list at least one pattern (or "*" for everyone)')
        for pattern in self.recipients:
            if not pattern.strip():
                raise ValueError("recipients: empty pattern")


@dataclass(frozen=True)
class RouteSettings:
    """Recipients matching `recipients` (fnmatch, case-insensitive) go to `destination`."""

    name: str
    recipients: tuple[str, ...]
    destination: DestinationConfig
    spam: VerdictAction
    virus: VerdictAction
    quarantine: str

    def matches(self, address: str) -> bool:
        addr = address.strip().lower()
        return any(fnmatch.fnmatchcase(addr, p.strip().lower()) for p in self.recipients)

    @property
    def catch_all(self) -> bool:
        return "*" in (p.strip() for p in self.recipients)

    def action(self, *, spam: bool, virus: bool) -> VerdictAction:
        """The action for a message's verdicts: the stricter one when both apply."""
        chosen: VerdictAction = "deliver"
        for applies, action in ((spam, self.spam), (virus, self.virus)):
            if applies and ACTION_SEVERITY[action] > ACTION_SEVERITY[chosen]:
                chosen = action
        return chosen


@dataclass(frozen=True)
class _RawInbound:
    aws: AWSSettings = AWSSettings()
    sns: dict[str, Any] | None = None
    sqs: SQSSettings | None = None
    route: tuple[dict[str, Any], ...] = ()
    # Units of inbound work processed at once (fetch + decrypt + deliver).
    concurrency: int = 8
    # Largest stored object fetched from S3 (SES accepts messages up to 40 MB).
    max_message_size: Size = Size(50 * 1000**2)
    # Accept objects stored without client-side encryption (a rule without a KMS key).
    allow_plaintext: bool = True
    # Default Maildir for quarantined messages (relative to the config file).
    quarantine: str = "var/quarantine"

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be positive")


@dataclass(frozen=True)
class InboundSettings:
    aws: AWSSettings
    sns: SNSSettings | None
    sqs: SQSSettings | None
    routes: tuple[RouteSettings, ...]
    concurrency: int
    max_message_size: int
    allow_plaintext: bool
    quarantine: str

    def route_for(self, address: str) -> RouteSettings | None:
        """The first route whose patterns match `address`, in the order of the file."""
        for route in self.routes:
            if route.matches(address):
                return route
        return None

    @property
    def catch_all(self) -> RouteSettings | None:
        """The first route that takes every address: where mail with no recipients goes."""
        for route in self.routes:
            if route.catch_all:
                return route
        return None


def parse_inbound(raw: dict[str, Any], cfg: Config) -> InboundSettings:
    """Validate `[inbound]`; raises ConfigError naming the key that is wrong."""
    base = build(_RawInbound, raw, "inbound")
    sns: SNSSettings | None = None
    if base.sns is not None:
        sns = build(SNSSettings, base.sns, "inbound.sns")
        if not sns.enabled:
            sns = None
    if sns is None and base.sqs is None:
        raise ConfigError(
            "inbound: configure [inbound.sns] (topics) or [inbound.sqs] (queue_url): "
            "otherwise no notification can reach the relay"
        )
    if not base.route:
        raise ConfigError('inbound.route: at least one [[inbound.route]] is required (e.g. "*")')
    routes: list[RouteSettings] = []
    names: set[str] = set()
    for i, item in enumerate(base.route):
        key = f"inbound.route[{i}]"
        r = build(_RawRoute, item, key)
        destination = build_destination_config(r.destination, f"{key}.destination")
        name = r.name or f"route[{i}]"
        if name in names:
            raise ConfigError(f"{key}.name: the name {name!r} is used twice")
        names.add(name)
        quarantine = r.quarantine or base.quarantine
        if "quarantine" in (r.spam, r.virus) and not quarantine:
            raise ConfigError(f"{key}.quarantine: a quarantine Maildir path is required")
        routes.append(
            RouteSettings(
                name=name,
                recipients=r.recipients,
                destination=destination,
                spam=r.spam,
                virus=r.virus,
                quarantine=str(cfg.resolve(quarantine)) if quarantine else "",
            )
        )
    return InboundSettings(
        aws=base.aws,
        sns=sns,
        sqs=base.sqs,
        routes=tuple(routes),
        concurrency=base.concurrency,
        max_message_size=int(base.max_message_size),
        allow_plaintext=base.allow_plaintext,
        quarantine=str(cfg.resolve(base.quarantine)) if base.quarantine else "",
    )
