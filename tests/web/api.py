"""Calling the relay's /api/v1 over real HTTP, for the API tests."""

from __future__ import annotations

from typing import Any

import aiohttp

from relay.app import Relay
from tests.web.conftest import base_url, bearer


async def call(
    relay: Relay,
    method: str,
    path: str,
    *,
    token: str | None = "ops",
    json: Any = None,
    data: bytes | str | None = None,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, parsed JSON body, or the bytes when the answer is not JSON)."""
    sent = {**(bearer(token) if token else {}), **(headers or {})}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"{base_url(relay)}/api/v1{path}",
            json=json,
            data=data,
            params=params,
            headers=sent,
        ) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.read()


def simple_message(**fields: Any) -> dict[str, Any]:
    """A valid JSON submission; `fields` replace or add fields."""
    message: dict[str, Any] = {
        "from": "app@example.com",
        "to": ["rcpt@example.org"],
        "subject": "hello",
        "text": "Hello there.\n",
    }
    message.update(fields)
    return message
