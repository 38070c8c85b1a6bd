"""An independent check of `relay/inbound/decrypt.py`: objects written by AWS's own
`amazon-s3-encryption-client-python` against the moto server, read by the relay.

The rest of the suite builds SES-style objects with our own encoder (`tests/fakes`), which
could share a misreading of the format with the decoder. Here the writer is AWS's code:

- v2 objects it writes (AES-GCM, `kms+context`, the SES encryption context) decrypt;
- tampered ones (GCM tag flipped, wrong encryption context, truncated body, a downgraded
  `x-amz-cek-alg`) are refused as permanent failures with a reason naming the cause;
- v3 objects (its default, key commitment) are refused as unsupported, not mistaken for mail;
- it cannot write v1 (CBC: legacy modes are decrypt-only in 4.0.0), so for v1, and for the
  SES-style `kms` wrapping it does not write either, the check runs the other way: AWS's
  client reads what our encoder wrote, proving the fixtures the other tests rely on.

The library is not in the test extra (see `AWS_CLIENT_MISSING`): without it, these skip.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.inbound.decrypt import DecryptError, Decryptor
from relay.inbound.fetch import S3Fetcher
from tests.fakes.moto_server import MotoEndpoint
from tests.fakes.ses_inbound import (
    AWS_CLIENT_MISSING,
    SIMPLE_MESSAGE,
    SESStore,
    aws_encryption_client,
    new_ses_message_id,
    ses_encryption_context,
)

pytest.importorskip("s3_encryption", reason=AWS_CLIENT_MISSING)


@pytest.fixture
def store(moto: MotoEndpoint) -> SESStore:
    return SESStore.create(moto)


@pytest.fixture
def decryptor(moto: MotoEndpoint) -> Decryptor:
    return Decryptor(region=moto.region, endpoint_url=moto.url)


async def relay_decrypts(store: SESStore, decryptor: Decryptor, key: str, **changes: Any) -> bytes:
    """Fetch `key` with the relay's fetcher, apply `changes` (body=, metadata=) as an
    attacker or a corrupting disk would, and decrypt with the relay's decryptor."""
    obj = await S3Fetcher(
        region=store.s3.meta.region_name, endpoint_url=store.s3.meta.endpoint_url
    ).get(store.bucket, key)
    body = changes.get("body", lambda b: b)(obj.body)
    metadata = changes.get("metadata", lambda m: m)(dict(obj.metadata))
    return await decryptor.decrypt(body, metadata)


async def test_v2_object_written_by_aws_client_decrypts(
    store: SESStore, decryptor: Decryptor
) -> None:
    key = store.put_with_aws_client(SIMPLE_MESSAGE)
    stored = store.s3.get_object(Bucket=store.bucket, Key=key)
    assert stored["Body"].read() != SIMPLE_MESSAGE  # really ciphertext at rest
    meta = stored["Metadata"]
    assert (meta["x-amz-cek-alg"], meta["x-amz-wrap-alg"]) == ("AES/GCM/NoPadding", "kms+context")
    assert await relay_decrypts(store, decryptor, key) == SIMPLE_MESSAGE


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1_000_003])
async def test_sizes_around_the_block_and_tag_length_decrypt(
    store: SESStore, decryptor: Decryptor, size: int
) -> None:
    raw = bytes(i % 251 for i in range(size))
    key = store.put_with_aws_client(raw)
    assert await relay_decrypts(store, decryptor, key) == raw


def flip_last_byte(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 0x01])


def other_message_context(meta: dict[str, str]) -> dict[str, str]:
    context = json.loads(meta["x-amz-matdesc"])
    context["aws:ses:message-id"] = "some-other-message"
    return {**meta, "x-amz-matdesc": json.dumps(context)}


def downgrade_to_cbc(meta: dict[str, str]) -> dict[str, str]:
    return {**meta, "x-amz-cek-alg": "AES/CBC/PKCS5Padding", "x-amz-iv": "A" * 22 + "=="}


TAMPERING: dict[str, tuple[dict[str, Any], str]] = {
    "gcm-tag-flipped": ({"body": flip_last_byte}, "AES-GCM authentication failed"),
    "wrong-encryption-context": (
        {"metadata": other_message_context},
        "KMS InvalidCiphertextException",
    ),
    "truncated-body": ({"body": lambda b: b[: len(b) // 2]}, "AES-GCM authentication failed"),
    "truncated-below-the-tag": ({"body": lambda b: b[:10]}, "shorter than its GCM tag"),
    "cek-alg-downgraded": ({"metadata": downgrade_to_cbc}, "does not match x-amz-cek-alg"),
}


@pytest.mark.parametrize(("changes", "reason"), TAMPERING.values(), ids=TAMPERING.keys())
async def test_tampered_objects_are_refused_for_good_with_the_reason(
    store: SESStore, decryptor: Decryptor, changes: dict[str, Any], reason: str
) -> None:
    key = store.put_with_aws_client(SIMPLE_MESSAGE)
    with pytest.raises(DecryptError) as refused:
        await relay_decrypts(store, decryptor, key, **changes)
    assert refused.value.permanent
    assert reason in refused.value.reason


async def test_v3_key_commitment_objects_are_refused_as_unsupported(
    store: SESStore, decryptor: Decryptor
) -> None:
    key = store.put_with_aws_client(SIMPLE_MESSAGE, v3=True)
    with pytest.raises(DecryptError, match="v3 \\(key commitment\\)") as refused:
        await relay_decrypts(store, decryptor, key)
    assert refused.value.permanent


@pytest.mark.parametrize(
    ("version", "wrap"),
    [(1, "kms"), (2, "kms"), (2, "kms+context")],
    ids=["v1-cbc", "v2-ses", "v2-kms+context"],
)
def test_aws_client_reads_what_our_ses_style_encoder_writes(
    store: SESStore, version: int, wrap: str
) -> None:
    message_id = new_ses_message_id()
    key = store.put(SIMPLE_MESSAGE, message_id=message_id, version=version, wrap=wrap)
    # With `kms` wrapping (SES's) the client takes the context from x-amz-matdesc alone;
    # with `kms+context` the reader states the context it expects, and it must match.
    expected = {"EncryptionContext": ses_encryption_context(message_id)}
    got = aws_encryption_client(store, legacy=True).get_object(
        Bucket=store.bucket, Key=key, **(expected if wrap == "kms+context" else {})
    )
    assert got["Body"].read() == SIMPLE_MESSAGE
