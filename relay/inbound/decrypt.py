"""Decrypt objects written by the Amazon S3 encryption client, as SES does with a KMS key.

SES encrypts each received message client-side before storing it (not S3 server-side
encryption, so a plain GetObject returns ciphertext). The envelope lives in the object's
user metadata (DESIGN.md anchors; S3 encryption client metadata appendix):

- `x-amz-key-v2` (v2) or `x-amz-key` (v1): the content key, base64, wrapped by KMS;
- `x-amz-wrap-alg`: `kms` (the matdesc is the KMS encryption context) or `kms+context`
  (the same, and the context also carries `aws:x-amz-cek-alg` = the content algorithm,
  which must match `x-amz-cek-alg` so an attacker can't downgrade GCM to CBC);
- `x-amz-matdesc`: JSON; passed to `kms.decrypt` unchanged as the EncryptionContext. KMS
  authenticates it, so a wrong context is refused by KMS (InvalidCiphertextException);
- `x-amz-cek-alg`: `AES/GCM/NoPadding` (v2: 12-byte `x-amz-iv`, `x-amz-tag-len` 128, the
  tag is the body's last 16 bytes) or `AES/CBC/PKCS5Padding` (v1 default, 16-byte IV);
- `x-amz-unencrypted-content-length`: when present, the plaintext must be exactly this long.

Every failure is a `DecryptError` with a reason for the timeline: a failed GCM tag or bad
CBC padding means corrupted or tampered bytes, which are never handed on. Note that CBC has
no authentication: a corruption that leaves valid padding is only caught by the length
check, which is why v1 objects are legacy. Objects without encryption metadata pass through
unchanged unless `allow_plaintext=False`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.aws import aws_client
from relay.inbound import jsonlimits
from relay.inbound.fetch import S3Object
from relay.inbound.jsonlimits import JSONLimitError

log = logging.getLogger("relay.inbound")

GCM: Final = "AES/GCM/NoPadding"
CBC: Final = "AES/CBC/PKCS5Padding"
WRAP_KMS: Final = "kms"
WRAP_KMS_CONTEXT: Final = "kms+context"
#: The encryption-context key `kms+context` adds, holding the content algorithm.
CEK_ALG_CONTEXT_KEY: Final = "aws:x-amz-cek-alg"

_ENVELOPE_KEYS: Final = (
    "x-amz-key",
    "x-amz-key-v2",
    "x-amz-iv",
    "x-amz-cek-alg",
    "x-amz-wrap-alg",
    "x-amz-matdesc",
    "x-amz-tag-len",
)
# Formats we recognise but do not read: say so instead of passing ciphertext through.
_UNSUPPORTED_KEYS: Final = {
    "x-amz-crypto-instr-file": "the envelope is in an instruction file",
    "x-amz-3": "S3 encryption client v3 (key commitment) format",
    "x-amz-c": "S3 encryption client v3 (key commitment) format",
}
# KMS errors that retrying can't fix: the data key or its context is wrong for good.
_KMS_PERMANENT: Final = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "InvalidKeyUsageException"}
)


class DecryptError(Exception):
    """The object can't be turned into the message. `permanent=False`: retry may help."""

    def __init__(self, reason: str, *, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True, slots=True, kw_only=True)
class CryptoEnvelope:
    """The encryption client's metadata, validated."""

    version: Literal[1, 2]
    wrapped_key: bytes
    iv: bytes
    cek_alg: str
    wrap_alg: str
    context: dict[str, str] = field(default_factory=dict)
    plaintext_length: int | None = None


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptError(f"{what} is not base64") from None


def read_envelope(metadata: Mapping[str, str]) -> CryptoEnvelope | None:
    """The envelope in `metadata` (lower-case keys, no x-amz-meta- prefix); None if the
    object is not client-side encrypted. Raises DecryptError for a partial or unsupported
    envelope rather than mistaking ciphertext for a message."""
    meta = {k.lower(): v for k, v in metadata.items()}
    for key, why in _UNSUPPORTED_KEYS.items():
        if key in meta:
            raise DecryptError(f"unsupported encrypted object: {why}")
    if "x-amz-key-v2" in meta:
        version: Literal[1, 2] = 2
        wrapped = meta["x-amz-key-v2"]
    elif "x-amz-key" in meta:
        version, wrapped = 1, meta["x-amz-key"]
    else:
        present = [k for k in _ENVELOPE_KEYS if k in meta]
        if present:
            raise DecryptError(
                f"incomplete encryption metadata: {', '.join(present)} "
                "without x-amz-key-v2 or x-amz-key"
            )
        return None

    wrap_alg = meta.get("x-amz-wrap-alg", "")
    if wrap_alg not in (WRAP_KMS, WRAP_KMS_CONTEXT):
        raise DecryptError(
            f"unsupported key wrapping {wrap_alg!r}: only KMS-wrapped keys "
            "(kms, kms+context) can be decrypted"
        )
    cek_alg = meta.get("x-amz-cek-alg", CBC)
    if cek_alg not in (GCM, CBC):
        raise DecryptError(f"unsupported content algorithm {cek_alg!r}")
    if "x-amz-iv" not in meta:
        raise DecryptError("encryption metadata has no x-amz-iv")
    iv = _b64(meta["x-amz-iv"], "x-amz-iv")
    if len(iv) != (12 if cek_alg == GCM else 16):
        raise DecryptError(f"x-amz-iv is {len(iv)} bytes, wrong for {cek_alg}")
    if cek_alg == GCM and meta.get("x-amz-tag-len", "128") != "128":
        raise DecryptError(f"unsupported GCM tag length {meta['x-amz-tag-len']!r}")

    try:
        # A flat object of strings: one level, and S3 keeps at most 2 KiB of metadata.
        context = jsonlimits.loads(meta.get("x-amz-matdesc") or "{}", max_depth=1)
    except JSONLimitError as exc:
        raise DecryptError(f"x-amz-matdesc refused: {exc}") from None
    except ValueError:
        raise DecryptError("x-amz-matdesc is not JSON") from None
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise DecryptError("x-amz-matdesc is not a JSON object of strings")
    if wrap_alg == WRAP_KMS_CONTEXT and context.get(CEK_ALG_CONTEXT_KEY) != cek_alg:
        raise DecryptError(
            f"encryption context {CEK_ALG_CONTEXT_KEY}="
            f"{context.get(CEK_ALG_CONTEXT_KEY)!r} does not match "
            f"x-amz-cek-alg {cek_alg!r}"
        )

    length: int | None = None
    if "x-amz-unencrypted-content-length" in meta:
        raw_length = meta["x-amz-unencrypted-content-length"]
        if not raw_length.isdigit():
            raise DecryptError(f"x-amz-unencrypted-content-length {raw_length!r} is not a number")
        length = int(raw_length)
    return CryptoEnvelope(
        version=version,
        wrapped_key=_b64(wrapped, "the wrapped key"),
        iv=iv,
        cek_alg=cek_alg,
        wrap_alg=wrap_alg,
        context=context,
        plaintext_length=length,
    )


def decrypt_content(envelope: CryptoEnvelope, data_key: bytes, body: bytes) -> bytes:
    """Decrypt `body` with the unwrapped content key. Pure: no I/O, easy to test."""
    if len(data_key) not in (16, 24, 32):
        raise DecryptError(f"the content key is {len(data_key)} bytes, not an AES key")
    if envelope.cek_alg == GCM:
        if len(body) < 16:
            raise DecryptError("ciphertext shorter than its GCM tag")
        try:
            plain = AESGCM(data_key).decrypt(envelope.iv, body, None)
        except InvalidTag:
            raise DecryptError(
                "AES-GCM authentication failed: the object is corrupted or was tampered with"
            ) from None
    else:
        if not body or len(body) % 16:
            raise DecryptError("CBC ciphertext is not a whole number of blocks")
        decryptor = Cipher(algorithms.AES(data_key), modes.CBC(envelope.iv)).decryptor()
        padded = decryptor.update(body) + decryptor.finalize()
        unpadder = sym_padding.PKCS7(128).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise DecryptError(
                "AES-CBC padding is invalid: the object is corrupted or the key is wrong"
            ) from None
    if envelope.plaintext_length is not None and len(plain) != envelope.plaintext_length:
        raise DecryptError(
            f"plaintext is {len(plain)} bytes, metadata says {envelope.plaintext_length}"
        )
    return plain


class Decryptor:
    """Unwraps content keys with KMS and decrypts objects. Pass `kms_client` in tests."""

    def __init__(
        self,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        kms_client: Any = None,
        allow_plaintext: bool = True,
        timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.allow_plaintext = allow_plaintext
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._kms = kms_client

    @property
    def kms(self) -> Any:
        if self._kms is None:
            self._kms = aws_client(
                "kms",
                region=self.region,
                endpoint_url=self.endpoint_url,
                connect_timeout=min(self.timeout, 10.0),
                read_timeout=self.timeout,
                total_attempts=self.max_attempts + 1,  # max_attempts counts retries
            )
        return self._kms

    async def decrypt_object(self, obj: S3Object) -> bytes:
        return await self.decrypt(obj.body, obj.metadata)

    async def decrypt(self, body: bytes, metadata: Mapping[str, str]) -> bytes:
        """The plaintext message, or DecryptError. Plain objects pass through if allowed."""
        envelope = read_envelope(metadata)
        if envelope is None:
            if not self.allow_plaintext:
                raise DecryptError("object is not encrypted and allow_plaintext is off")
            return body
        data_key = await asyncio.to_thread(self._unwrap, envelope)
        return await asyncio.to_thread(decrypt_content, envelope, data_key, body)

    def _unwrap(self, envelope: CryptoEnvelope) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.kms.decrypt(
                CiphertextBlob=envelope.wrapped_key, EncryptionContext=envelope.context
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            message = exc.response.get("Error", {}).get("Message", "")
            permanent = code in _KMS_PERMANENT
            if code == "InvalidCiphertextException":
                message = (
                    message + " (wrong encryption context, or the key blob is corrupted)"
                ).strip()
            log.warning("kms decrypt failed: %s %s", code, message)
            raise DecryptError(f"KMS {code}: {message}", permanent=permanent) from exc
        except (BotoCoreError, OSError) as exc:
            log.warning("kms decrypt failed: %s", exc)
            raise DecryptError(f"KMS unreachable: {exc}", permanent=False) from exc
        plaintext = resp.get("Plaintext")
        if not isinstance(plaintext, bytes):
            raise DecryptError("KMS returned no plaintext key", permanent=False)
        return plaintext
