"""A real moto server on loopback for AWS tests (S3, SQS, SNS, KMS, SES).

Tests point boto3 (and the relay) at `endpoint_url`; nothing is patched in-process, so the
relay's own AWS code paths run exactly as in production, over HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"


@dataclass(frozen=True)
class MotoEndpoint:
    url: str
    region: str = REGION

    def client(self, service: str):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            service,
            region_name=self.region,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        """Forget every resource, so tests sharing the server don't see each other's."""
        import urllib.request

        urllib.request.urlopen(
            urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        ).read()


def _aws_test_env() -> None:
    # The relay reads credentials from the standard chain; these keep it off ~/.aws.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)


@pytest.fixture(scope="session")
def moto_session() -> Iterator[MotoEndpoint]:
    _aws_test_env()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoEndpoint(url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def moto(moto_session: MotoEndpoint) -> MotoEndpoint:
    """A moto server with no resources left over from earlier tests."""
    moto_session.reset()
    return moto_session
