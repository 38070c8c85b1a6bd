"""What AWS would send the relay for inbound mail, built by the tests themselves.

moto never receives mail, so this module plays SES and SNS:

- `encrypt_v2` / `encrypt_v1` encrypt a message the way SES's S3 action does with a KMS
  key (a data key from KMS `generate_data_key` under an SES-like encryption context, then
  AES-GCM with the S3 encryption client v2 metadata; or the legacy v1 AES-CBC form), and
  `put_ses_message` stores it in (moto's) S3;
- `ses_received`, `s3_event`, `S3_TEST_EVENT` and `sns_envelope` build the notifications;
- `SNSSigner` signs SNS messages with its own RSA key and certificate, and `SNSCertServer`
  serves that certificate over https (a trustme CA) at the real-looking
  `https://sns.<region>.amazonaws.com/...pem` URL: its `resolver` maps that host name to
  the loopback server, so the relay's production host checks run unchanged.

The SNS string to sign is rebuilt here independently of relay/inbound/sns.py, from the AWS
developer guide, so a mistake there can't hide behind the same mistake here.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib
import json
import os
import socket
import ssl
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import quote_plus

import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from relay.inbound.sns import HTTPSFetcher

REGION = "eu-west-1"
ACCOUNT = "123456789012"
TOPIC_ARN = f"arn:aws:sns:{REGION}:{ACCOUNT}:relay-inbound"
SNS_HOST = f"sns.{REGION}.amazonaws.com"
CERT_PATH = "/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"
CERT_URL = f"https://{SNS_HOST}{CERT_PATH}"

SIMPLE_MESSAGE = (
    b"From: Scanner <scanner@partner.example>\r\n"
    b"To: docs@example.com\r\n"
    b"Subject: Scan 42\r\n"
    b"Message-ID: <scan-42@partner.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XYZ\r\n"
    b"\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Please find the scan attached.\r\n"
    b"--XYZ\r\n"
    b"Content-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="scan 42.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(b"%PDF-1.4 fake scan\n").replace(b"\n", b"\r\n") + b"--XYZ--\r\n"
)


# -- SES-style encrypted objects ---------------------------------------------------------


def ses_encryption_context(
    message_id: str, *, rule_name: str = "relay-inbound", account: str = ACCOUNT
) -> dict[str, str]:
    """The keys SES puts in the KMS encryption context (its KMS key policy conditions)."""
    return {
        "aws:ses:message-id": message_id,
        "aws:ses:rule-name": rule_name,
        "aws:ses:source-account": account,
    }


def encrypt_v2(
    plaintext: bytes, *, kms: Any, key_id: str, context: Mapping[str, str], wrap: str = "kms"
) -> tuple[bytes, dict[str, str]]:
    """AES-256-GCM under a fresh KMS data key; returns (body, user metadata).

    With wrap "kms+context" the context also carries aws:x-amz-cek-alg, as the encryption
    client adds it; the stored x-amz-matdesc is exactly the context given to KMS.
    """
    ctx = dict(context)
    if wrap == "kms+context":
        ctx["aws:x-amz-cek-alg"] = "AES/GCM/NoPadding"
    key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx)
    iv = os.urandom(12)
    body = AESGCM(key["Plaintext"]).encrypt(iv, plaintext, None)  # ciphertext || 16-byte tag
    return body, {
        "x-amz-key-v2": base64.b64encode(key["CiphertextBlob"]).decode(),
        "x-amz-iv": base64.b64encode(iv).decode(),
        "x-amz-cek-alg": "AES/GCM/NoPadding",
        "x-amz-wrap-alg": wrap,
        "x-amz-tag-len": "128",
        "x-amz-matdesc": json.dumps(ctx),
        "x-amz-unencrypted-content-length": str(len(plaintext)),
    }


def encrypt_v1(
    plaintext: bytes, *, kms: Any, key_id: str, context: Mapping[str, str]
) -> tuple[bytes, dict[str, str]]:
    """Legacy AES-256-CBC/PKCS#7 with `x-amz-key` (no x-amz-cek-alg: CBC is v1's default)."""
    ctx = dict(context)
    key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx)
    iv = os.urandom(16)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key["Plaintext"]), modes.CBC(iv)).encryptor()
    body = encryptor.update(padded) + encryptor.finalize()
    return body, {
        "x-amz-key": base64.b64encode(key["CiphertextBlob"]).decode(),
        "x-amz-iv": base64.b64encode(iv).decode(),
        "x-amz-wrap-alg": "kms",
        "x-amz-matdesc": json.dumps(ctx),
        "x-amz-unencrypted-content-length": str(len(plaintext)),
    }


@dataclass
class SESStore:
    """An S3 bucket and KMS key in moto, set up like an SES receipt rule's S3 action."""

    s3: Any
    kms: Any
    bucket: str = "relay-inbound-mail"
    prefix: str = "inbound/"
    key_id: str = ""

    @classmethod
    def create(cls, endpoint: Any, *, bucket: str = "relay-inbound-mail") -> SESStore:
        s3 = endpoint.client("s3")
        kms = endpoint.client("kms")
        s3.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": endpoint.region}
        )
        key_id = kms.create_key(Description="ses inbound")["KeyMetadata"]["KeyId"]
        return cls(s3=s3, kms=kms, bucket=bucket, key_id=key_id)

    def put(
        self,
        raw: bytes,
        *,
        message_id: str | None = None,
        version: int = 2,
        wrap: str = "kms",
        context: Mapping[str, str] | None = None,
    ) -> str:
        """Store `raw` as SES would; returns the object key (prefix + SES message id).

        version 0 stores it unencrypted (a receipt rule without a KMS key).
        """
        message_id = message_id or new_ses_message_id()
        key = self.prefix + message_id
        ctx = dict(context) if context is not None else ses_encryption_context(message_id)
        meta: dict[str, str] = {}
        if version == 0:
            body = raw
        elif version == 1:
            body, meta = encrypt_v1(raw, kms=self.kms, key_id=self.key_id, context=ctx)
        else:
            body, meta = encrypt_v2(raw, kms=self.kms, key_id=self.key_id, context=ctx, wrap=wrap)
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=meta)
        return key

    def put_with_aws_client(
        self, raw: bytes, *, message_id: str | None = None, v3: bool = False
    ) -> str:
        """Like `put`, but encrypted by AWS's own client (`aws_encryption_client`) with
        SES's encryption context; returns the object key."""
        message_id = message_id or new_ses_message_id()
        key = self.prefix + message_id
        aws_encryption_client(self, v3=v3).put_object(
            Bucket=self.bucket,
            Key=key,
            Body=raw,
            EncryptionContext=ses_encryption_context(message_id),
        )
        return key


#: Why the AWS library can't be a pinned test dependency (see `aws_encryption_client`).
AWS_CLIENT_MISSING = (
    "amazon-s3-encryption-client-python==4.0.0 is not installed: it requires "
    "cryptography<49 and the relay pins 50.0.2, so pip can't resolve it in the test extra; "
    "it works with 50.0.2: `.venv/bin/pip install --no-deps "
    "amazon-s3-encryption-client-python==4.0.0` (its attrs and boto3 are there already)"
)


def aws_encryption_client(store: SESStore, *, legacy: bool = False, v3: bool = False) -> Any:
    """AWS's own S3 encryption client (`s3_encryption`) on the store's moto endpoint and
    KMS key: an encoder and decoder of the format that is not ours.

    It writes v2 objects (AES-GCM, `kms+context` wrapping) with the settings below, or v3
    (key commitment, its default) with `v3=True`; it cannot write v1 (CBC), only read it
    with `legacy=True`. It wraps a boto3 client of its own: its GetObject hook decrypts,
    so `store.s3` stays a plain client that sees the ciphertext.
    """
    import boto3

    # Imported by name: it has no type information, and it may be absent (pytest skips).
    s3ec = importlib.import_module("s3_encryption")
    keyrings = importlib.import_module("s3_encryption.materials.kms_keyring")
    materials = importlib.import_module("s3_encryption.materials.materials")

    keyring = keyrings.KmsKeyring(store.kms, store.key_id, enable_legacy_wrapping_algorithms=legacy)
    if v3:
        config = s3ec.S3EncryptionClientConfig(keyring=keyring)
    else:
        config = s3ec.S3EncryptionClientConfig(
            keyring=keyring,
            encryption_algorithm=materials.AlgorithmSuite.ALG_AES_256_GCM_IV12_TAG16_NO_KDF,
            commitment_policy=materials.CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT,
            enable_legacy_unauthenticated_modes=legacy,
        )
    s3 = boto3.client(
        "s3", region_name=store.s3.meta.region_name, endpoint_url=store.s3.meta.endpoint_url
    )
    return s3ec.S3EncryptionClient(s3, config)


def new_ses_message_id() -> str:
    return uuid.uuid4().hex[:20] + "sesmsg"


# -- notifications --------------------------------------------------------------------------


def ses_received(
    bucket: str,
    key: str,
    *,
    message_id: str,
    recipients: Sequence[str] = ("docs@example.com",),
    source: str = "scanner@partner.example",
    spam: str = "PASS",
    virus: str = "PASS",
) -> dict[str, Any]:
    """An SES "Received" notification for an S3 action, shaped like the SES docs' example."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {
        "notificationType": "Received",
        "receipt": {
            "timestamp": now,
            "processingTimeMillis": 420,
            "recipients": list(recipients),
            "spamVerdict": {"status": spam},
            "virusVerdict": {"status": virus},
            "spfVerdict": {"status": "PASS"},
            "dkimVerdict": {"status": "PASS"},
            "dmarcVerdict": {"status": "PASS"},
            "action": {
                "type": "S3",
                "topicArn": TOPIC_ARN,
                "bucketName": bucket,
                "objectKeyPrefix": key.rpartition("/")[0],
                "objectKey": key,
            },
        },
        "mail": {
            "timestamp": now,
            "source": source,
            "messageId": message_id,
            "destination": list(recipients),
            "headersTruncated": False,
            "headers": [{"name": "Subject", "value": "Scan 42"}],
            "commonHeaders": {"from": [source], "to": list(recipients), "subject": "Scan 42"},
        },
    }


def s3_event(
    bucket: str,
    key: str,
    *,
    etag: str = "0123456789abcdef",
    size: int = 1234,
    event: str = "ObjectCreated:Put",
) -> dict[str, Any]:
    """An S3 event notification; the key is form-encoded as S3 does (`+` for a space)."""
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": REGION,
                "eventTime": "2024-05-01T10:00:00.000Z",
                "eventName": event,
                "userIdentity": {"principalId": "AWS:SES"},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "inbound",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {
                        "key": quote_plus(key),
                        "size": size,
                        "eTag": etag,
                        "sequencer": "0055AED6DCD90281E5",
                    },
                },
            }
        ]
    }


S3_TEST_EVENT: dict[str, Any] = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2024-05-01T10:00:00.000Z",
    "Bucket": "relay-inbound-mail",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


# -- SNS signing -----------------------------------------------------------------------------

_SIGNED = {
    "Notification": ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
    "SubscriptionConfirmation": [
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ],
}
_SIGNED["UnsubscribeConfirmation"] = _SIGNED["SubscriptionConfirmation"]


def sns_timestamp(when: dt.datetime | None = None) -> str:
    when = when or dt.datetime.now(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def sns_envelope(
    message: str,
    *,
    topic_arn: str = TOPIC_ARN,
    subject: str | None = None,
    message_id: str | None = None,
    timestamp: str | None = None,
    msg_type: str = "Notification",
) -> dict[str, Any]:
    """An unsigned SNS message of `msg_type` (sign it with SNSSigner.sign)."""
    doc: dict[str, Any] = {
        "Type": msg_type,
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": topic_arn,
        "Message": message,
        "Timestamp": timestamp or sns_timestamp(),
    }
    if subject is not None:
        doc["Subject"] = subject
    if msg_type != "Notification":
        doc["Token"] = "2336412f37fb687f5d51e6e2425c464de"
        doc["SubscribeURL"] = (
            f"https://{SNS_HOST}/?Action=ConfirmSubscription"
            f"&TopicArn={topic_arn}&Token={doc['Token']}"
        )
    else:
        doc["UnsubscribeURL"] = (
            f"https://{SNS_HOST}/?Action=Unsubscribe&SubscriptionArn={topic_arn}:abc"
        )
    return doc


@dataclass
class SNSSigner:
    """An RSA key and self-signed certificate standing in for SNS's signing certificate."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    @cached_property
    def cert_pem(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def string_to_sign(doc: Mapping[str, Any]) -> bytes:
        lines = []
        for key in _SIGNED[doc["Type"]]:
            if key in doc:
                lines.append(f"{key}\n{doc[key]}\n")
        return "".join(lines).encode()

    def sign(
        self, doc: Mapping[str, Any], *, version: str = "1", cert_url: str = CERT_URL
    ) -> dict[str, Any]:
        signed = dict(doc)
        signed["SignatureVersion"] = version
        signed["SigningCertURL"] = cert_url
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(self.string_to_sign(signed), padding.PKCS1v15(), digest)
        signed["Signature"] = base64.b64encode(signature).decode()
        return signed


class PinnedResolver(AbstractResolver):
    """Resolves the given host names to a loopback address and port, nothing else.

    Returning a port here is what lets a URL without a port (as SNS uses, and as the relay
    requires) reach a test server on an ephemeral port.
    """

    def __init__(self, pins: Mapping[str, tuple[str, int]]) -> None:
        self.pins = dict(pins)
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if host not in self.pins:
            raise OSError(f"PinnedResolver: {host} is not pinned")
        ip, pinned_port = self.pins[host]
        return [
            ResolveResult(
                hostname=host, host=ip, port=pinned_port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


class SNSCertServer:
    """https://sns.<region>.amazonaws.com on loopback: the signing certificate and the
    ConfirmSubscription endpoint, with a log of every request it served."""

    def __init__(self, signer: SNSSigner, *, host: str = SNS_HOST) -> None:
        self.signer = signer
        self.host = host
        self.ca = trustme.CA()
        self.requests: list[str] = []
        self.confirmations: list[str] = []
        self.fail_cert = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _cert(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if self.fail_cert:
            return web.Response(status=503)
        return web.Response(body=self.signer.cert_pem, content_type="application/x-pem-file")

    async def _root(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if request.query.get("Action") == "ConfirmSubscription":
            self.confirmations.append(request.query.get("Token", ""))
            arn = request.query.get("TopicArn", "") + ":sub-1"
            return web.Response(
                text=f"<ConfirmSubscriptionResponse><ConfirmSubscriptionResult>"
                f"<SubscriptionArn>{arn}</SubscriptionArn>"
                f"</ConfirmSubscriptionResult></ConfirmSubscriptionResponse>",
                content_type="text/xml",
            )
        return web.Response(status=400)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(CERT_PATH, self._cert)
        app.router.add_get("/{tail:.*}", self._root)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(self.host).configure_cert(server_ctx)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def resolver(self) -> PinnedResolver:
        return PinnedResolver({self.host: ("127.0.0.1", self.port)})

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def fetcher(self) -> HTTPSFetcher:
        """The relay's production fetcher, trusting the test CA and pinned to this server."""
        return HTTPSFetcher(ssl_context=self.client_ssl(), resolver=self.resolver, timeout=5)
