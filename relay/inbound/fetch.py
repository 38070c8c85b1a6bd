"""Download the stored message from S3, with the metadata decryption needs.

boto3 is synchronous, so each call runs in a worker thread; the event loop keeps serving
SMTP and HTTP meanwhile. Failures become a typed `FetchError` whose `permanent` flag tells
the queue worker whether retrying can help: a missing object or bucket will not come back
by itself (the reason goes on the timeline and the work is dead-lettered for an operator to
replay), while throttling, network errors and permission problems (an operator fixes the
IAM policy, then the retry succeeds) are worth retrying.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from relay.aws import aws_client

log = logging.getLogger("relay.inbound")

#: SES stores messages of up to 40 MB; a little headroom for the encryption overhead.
DEFAULT_MAX_SIZE = 50 * 1000**2

_PERMANENT_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound", "InvalidObjectState"})


class FetchError(Exception):
    """The object could not be downloaded. `reason` is what the timeline shows."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Object:
    """A downloaded object: the stored bytes (maybe ciphertext) and its user metadata.

    `metadata` keys are lower case without the `x-amz-meta-` prefix, as boto3 returns them
    (so the encryption client's `x-amz-meta-x-amz-key-v2` is `metadata["x-amz-key-v2"]`).
    """

    bucket: str
    key: str
    body: bytes
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str | None = None


class S3Fetcher:
    """Gets objects from one S3 endpoint. Pass `client` to share a boto3 client (tests)."""

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.max_size = max_size
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            # Cap boto3's own retries: the queue retries with backoff, and a long internal
            # retry loop would hold a worker slot (DESIGN.md: boto3 retries by itself).
            self._client = aws_client(
                "s3",
                region=self.region,
                endpoint_url=self.endpoint_url,
                connect_timeout=min(self.timeout, 10.0),
                read_timeout=self.timeout,
                total_attempts=self.max_attempts + 1,  # max_attempts counts retries
            )
        return self._client

    async def get(self, bucket: str, key: str) -> S3Object:
        """Download `bucket/key`, or raise FetchError."""
        return await asyncio.to_thread(self._get, bucket, key)

    def _get(self, bucket: str, key: str) -> S3Object:
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{bucket}/{key}"
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            length = int(resp.get("ContentLength") or 0)
            if length > self.max_size:
                resp["Body"].close()
                raise FetchError(
                    f"{where} is {length} bytes, over the {self.max_size} limit", permanent=True
                )
            body = resp["Body"].read()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            message = exc.response.get("Error", {}).get("Message", "")
            permanent = code in _PERMANENT_CODES
            log.warning("fetch %s failed: %s %s", where, code, message)
            raise FetchError(f"{where}: {code} {message}".rstrip(), permanent=permanent) from exc
        except (BotoCoreError, OSError) as exc:
            log.warning("fetch %s failed: %s", where, exc)
            raise FetchError(f"{where}: {exc}", permanent=False) from exc
        metadata = {str(k).lower(): str(v) for k, v in (resp.get("Metadata") or {}).items()}
        etag = resp.get("ETag")
        log.debug("fetched %s (%d bytes)", where, len(body))
        return S3Object(
            bucket=bucket,
            key=key,
            body=body,
            metadata=metadata,
            etag=etag.strip('"') if isinstance(etag, str) else None,
        )
