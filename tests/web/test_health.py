"""/healthz and /readyz: what a load balancer or an orchestrator asks the relay."""

from __future__ import annotations

from typing import Any

import aiohttp

from relay.app import Relay
from tests.conftest import RelayFactory, sqlite_spool


async def get(relay: Relay, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.web_port}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def test_healthz_and_readyz_answer_when_all_is_well(relay: Relay) -> None:
    assert await get(relay, "/healthz") == (200, {"status": "ok"})
    assert await get(relay, "/readyz") == (200, {"status": "ready"})


async def test_readyz_says_why_the_relay_cannot_take_mail(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    spool = sqlite_spool(relay)
    spool.min_free_disk = 1 << 62  # no disk is that big
    spool._free_checked_at = 0.0
    status, body = await get(relay, "/readyz")
    assert status == 503 and body["status"] == "not ready"
    assert "bytes free under" in body["problems"][0]
    assert await get(relay, "/healthz") == (200, {"status": "ok"})  # alive, just not ready
