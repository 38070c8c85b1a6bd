"""boto3 clients configured the one way the relay wants them.

Timeouts always set (boto3's default read timeout is a minute and its connect retries
stack on top), retries in botocore's "standard" mode and counted as total attempts:
botocore's `max_attempts` counts retries only, so `max_attempts=1` still sends twice
(DESIGN.md: boto3 retries by itself, and the queue already retries with backoff).
boto3 is imported on first use: a relay without AWS upstreams never loads it.
"""

from __future__ import annotations

from typing import Any


def aws_client(
    service: str,
    *,
    region: str | None,
    endpoint_url: str | None,
    read_timeout: float,
    total_attempts: int,
    connect_timeout: float = 10.0,
    session: Any = None,
    **config: Any,
) -> Any:
    """A client for `service`; `session` for a boto3 Session of its own (they are not
    thread-safe, clients are); `config` adds botocore Config options."""
    import boto3
    from botocore.config import Config as BotoConfig

    boto_config = BotoConfig(
        region_name=region or None,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": total_attempts, "mode": "standard"},
        **config,
    )
    return (session or boto3).client(service, endpoint_url=endpoint_url or None, config=boto_config)
