"""Fetch + decrypt against a moto server, with objects built the way SES builds them.

moto's KMS binds the encryption context to the data key (as KMS does), so "wrong context"
is refused by KMS itself, not by a check in the relay.
"""

from __future__ import annotations

import base64
import json

import pytest

from relay.inbound.decrypt import DecryptError, Decryptor, read_envelope
from relay.inbound.fetch import FetchError, S3Fetcher
from tests.fakes.moto_server import MotoEndpoint
from tests.fakes.ses_inbound import SIMPLE_MESSAGE, SESStore, ses_encryption_context


@pytest.fixture
def store(moto: MotoEndpoint) -> SESStore:
    return SESStore.create(moto)


@pytest.fixture
def fetcher(moto: MotoEndpoint) -> S3Fetcher:
    return S3Fetcher(region=moto.region, endpoint_url=moto.url)


@pytest.fixture
def decryptor(moto: MotoEndpoint) -> Decryptor:
    return Decryptor(region=moto.region, endpoint_url=moto.url)


async def fetch_and_decrypt(
    store: SESStore, key: str, fetcher: S3Fetcher, decryptor: Decryptor
) -> bytes:
    obj = await fetcher.get(store.bucket, key)
    return await decryptor.decrypt_object(obj)


@pytest.mark.parametrize("wrap", ["kms", "kms+context"])
async def test_v2_gcm_object_decrypts(
    wrap: str, store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2, wrap=wrap)
    obj = await fetcher.get(store.bucket, key)
    assert obj.body != SIMPLE_MESSAGE  # really ciphertext at rest
    assert obj.metadata["x-amz-cek-alg"] == "AES/GCM/NoPadding"
    assert await decryptor.decrypt_object(obj) == SIMPLE_MESSAGE


async def test_v1_cbc_object_decrypts(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=1)
    assert await fetch_and_decrypt(store, key, fetcher, decryptor) == SIMPLE_MESSAGE


async def test_plain_object_passes_through(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=0)
    assert await fetch_and_decrypt(store, key, fetcher, decryptor) == SIMPLE_MESSAGE


@pytest.fixture
def strict(moto: MotoEndpoint) -> Decryptor:
    return Decryptor(region=moto.region, endpoint_url=moto.url, allow_plaintext=False)


async def test_plain_object_refused_when_encryption_is_required(
    store: SESStore, fetcher: S3Fetcher, strict: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=0)
    with pytest.raises(DecryptError, match="not encrypted"):
        await fetch_and_decrypt(store, key, fetcher, strict)


async def test_key_with_spaces_and_unicode(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    store.prefix = "in box/é/"
    key = store.put(SIMPLE_MESSAGE, message_id="a b+c")
    assert await fetch_and_decrypt(store, key, fetcher, decryptor) == SIMPLE_MESSAGE


async def test_corrupted_gcm_ciphertext_is_never_returned(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2)
    obj = await fetcher.get(store.bucket, key)
    body = bytearray(obj.body)
    body[10] ^= 0x01
    with pytest.raises(DecryptError, match="authentication failed") as info:
        await decryptor.decrypt(bytes(body), obj.metadata)
    assert info.value.permanent


async def test_truncated_tag_fails(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2)
    obj = await fetcher.get(store.bucket, key)
    with pytest.raises(DecryptError):
        await decryptor.decrypt(obj.body[:-1], obj.metadata)


async def test_corrupted_cbc_ciphertext_fails(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=1)
    obj = await fetcher.get(store.bucket, key)
    body = bytearray(obj.body)
    body[-1] ^= 0xFF  # the last block carries the padding
    with pytest.raises(DecryptError):
        await decryptor.decrypt(bytes(body), obj.metadata)
    # A corruption that keeps valid padding is caught by the plaintext length check.
    body = bytearray(obj.body)
    with pytest.raises(DecryptError):
        await decryptor.decrypt(bytes(body[16:]), obj.metadata)


async def test_wrong_encryption_context_is_refused_by_kms(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2)
    obj = await fetcher.get(store.bucket, key)
    meta = dict(obj.metadata)
    meta["x-amz-matdesc"] = json.dumps(ses_encryption_context("someone-elses-message"))
    with pytest.raises(DecryptError, match="InvalidCiphertext") as info:
        await decryptor.decrypt(obj.body, meta)
    assert info.value.permanent


async def test_kms_context_must_name_the_content_algorithm(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2, wrap="kms+context")
    obj = await fetcher.get(store.bucket, key)
    meta = dict(obj.metadata)
    meta["x-amz-cek-alg"] = "AES/CBC/PKCS5Padding"  # a downgrade attempt
    meta["x-amz-iv"] = base64.b64encode(b"\0" * 16).decode()
    with pytest.raises(DecryptError, match="does not match"):
        await decryptor.decrypt(obj.body, meta)


async def test_corrupted_wrapped_key_fails(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2)
    obj = await fetcher.get(store.bucket, key)
    meta = dict(obj.metadata)
    blob = bytearray(base64.b64decode(meta["x-amz-key-v2"]))
    blob[-5] ^= 0x01
    meta["x-amz-key-v2"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(DecryptError, match="KMS"):
        await decryptor.decrypt(obj.body, meta)


async def test_wrong_plaintext_length_fails(
    store: SESStore, fetcher: S3Fetcher, decryptor: Decryptor
) -> None:
    key = store.put(SIMPLE_MESSAGE, version=2)
    obj = await fetcher.get(store.bucket, key)
    meta = {**obj.metadata, "x-amz-unencrypted-content-length": str(len(SIMPLE_MESSAGE) + 1)}
    with pytest.raises(DecryptError, match="metadata says"):
        await decryptor.decrypt(obj.body, meta)


async def test_missing_object_is_a_permanent_fetch_error(
    store: SESStore, fetcher: S3Fetcher
) -> None:
    with pytest.raises(FetchError, match="NoSuchKey") as info:
        await fetcher.get(store.bucket, "inbound/never-stored")
    assert info.value.permanent


async def test_missing_bucket_is_a_permanent_fetch_error(fetcher: S3Fetcher) -> None:
    with pytest.raises(FetchError) as info:
        await fetcher.get("no-such-bucket", "k")
    assert info.value.permanent


async def test_unreachable_kms_is_transient() -> None:
    offline = Decryptor(
        region="eu-west-1", endpoint_url="http://127.0.0.1:9", timeout=2, max_attempts=1
    )
    meta = {
        "x-amz-key-v2": base64.b64encode(b"blob").decode(),
        "x-amz-iv": base64.b64encode(b"\0" * 12).decode(),
        "x-amz-cek-alg": "AES/GCM/NoPadding",
        "x-amz-wrap-alg": "kms",
        "x-amz-tag-len": "128",
        "x-amz-matdesc": "{}",
    }
    with pytest.raises(DecryptError) as info:
        await offline.decrypt(b"\0" * 32, meta)
    assert not info.value.permanent


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"x-amz-iv": "AAAA"}, "incomplete"),
        (
            {
                "x-amz-key-v2": "AAAA",
                "x-amz-iv": base64.b64encode(b"1" * 12).decode(),
                "x-amz-cek-alg": "AES/GCM/NoPadding",
                "x-amz-wrap-alg": "AESWrap",
            },
            "wrapping",
        ),
        (
            {
                "x-amz-key-v2": "AAAA",
                "x-amz-iv": base64.b64encode(b"1" * 16).decode(),
                "x-amz-cek-alg": "AES/GCM/NoPadding",
                "x-amz-wrap-alg": "kms",
            },
            "x-amz-iv is 16",
        ),
        (
            {
                "x-amz-key-v2": "AAAA",
                "x-amz-iv": base64.b64encode(b"1" * 12).decode(),
                "x-amz-cek-alg": "AES/CTR/NoPadding",
                "x-amz-wrap-alg": "kms",
            },
            "content algorithm",
        ),
        (
            {
                "x-amz-key-v2": "AAAA",
                "x-amz-iv": base64.b64encode(b"1" * 12).decode(),
                "x-amz-cek-alg": "AES/GCM/NoPadding",
                "x-amz-wrap-alg": "kms",
                "x-amz-tag-len": "96",
            },
            "tag length",
        ),
        (
            {
                "x-amz-key-v2": "AAAA",
                "x-amz-iv": base64.b64encode(b"1" * 12).decode(),
                "x-amz-cek-alg": "AES/GCM/NoPadding",
                "x-amz-wrap-alg": "kms",
                "x-amz-matdesc": "[1]",
            },
            "matdesc",
        ),
        (
            {
                "x-amz-key-v2": "not base64!",
                "x-amz-iv": base64.b64encode(b"1" * 12).decode(),
                "x-amz-cek-alg": "AES/GCM/NoPadding",
                "x-amz-wrap-alg": "kms",
            },
            "base64",
        ),
        ({"x-amz-crypto-instr-file": ""}, "instruction file"),
    ],
)
def test_bad_envelopes_are_refused(meta: dict[str, str], match: str) -> None:
    with pytest.raises(DecryptError, match=match):
        read_envelope(meta)


def test_no_metadata_means_not_encrypted() -> None:
    assert read_envelope({"content-type": "message/rfc822"}) is None


@pytest.mark.parametrize(
    ("matdesc", "reason"),
    [("[" * 5_000, "nested more than 1 levels"), ('{"a": {"b": "c"}}', "nested more than 1")],
)
def test_nested_matdesc_is_refused_before_decoding(matdesc: str, reason: str) -> None:
    meta = {
        "x-amz-key-v2": base64.b64encode(b"k" * 32).decode(),
        "x-amz-iv": base64.b64encode(b"i" * 12).decode(),
        "x-amz-cek-alg": "AES/GCM/NoPadding",
        "x-amz-wrap-alg": "kms+context",
        "x-amz-matdesc": matdesc,
    }
    with pytest.raises(DecryptError, match=f"x-amz-matdesc refused: JSON {reason}"):
        read_envelope(meta)
