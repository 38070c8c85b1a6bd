"""Password hashes for SMTP users, and checking credentials without stalling the loop.

Hashes are scrypt (memory-hard, in the standard library): `scrypt$N$r$p$salt$hash` with
base64 fields, printed by `relay user add`. Verification costs tens of milliseconds by
design, so it runs in a thread; a successful check is remembered (keyed by a keyed hash of
the credentials, never the password itself) so a scanner that logs in for every page does
not pay it each time.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import os
import secrets
from typing import Protocol

from relay.config import UserConfig

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password,
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class SenderRules(Protocol):
    """Whoever sends with a list of allowed senders: an SMTP user, an API token."""

    @property
    def allowed_senders(self) -> tuple[str, ...]: ...


def sender_allowed(user: SenderRules, mail_from: str) -> bool:
    """Patterns such as `*@example.com` or `scanner@example.com`, case-insensitive."""
    address = mail_from.lower()
    return any(fnmatch.fnmatchcase(address, pattern.lower()) for pattern in user.allowed_senders)


class Authenticator:
    def __init__(self, users: tuple[UserConfig, ...]) -> None:
        self.users = {u.name: u for u in users}
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        # A dummy hash so unknown users cost as much as known ones (no user enumeration).
        self._dummy = hash_password(secrets.token_hex(8))

    def replace(self, users: tuple[UserConfig, ...]) -> None:
        """A reload's users: in force for the next AUTH (sessions already authenticated
        keep their login; a removed user's next MAIL finds no user and is refused)."""
        self.users = {u.name: u for u in users}
        self._verified.clear()

    async def check(self, login: bytes, password: bytes) -> UserConfig | None:
        name = login.decode("utf-8", "replace")
        user = self.users.get(name)
        stored = user.password_hash if user else self._dummy
        token = hmac.digest(self._key, login + b"\0" + password + b"\0" + stored.encode(), "sha256")
        if user is not None and token in self._verified:
            return user
        ok = await asyncio.to_thread(verify_password, password, stored)
        if ok and user is not None:
            self._verified.add(token)
            return user
        return None
