"""A fake SendGrid for the benchmark's HTTP end-to-end figure, in a process of its own.

It is the tests' fake (tests/fakes/providers.py): every request is checked as the real
v3 Mail Send API would (Bearer key, JSON shape, addresses, size) and answered 202 with an
X-Message-Id, but not kept. `GET /count` says how many it accepted.

    python -m bench.provider PORT    (the API key comes from BENCH_PROVIDER_KEY)
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

from tests.fakes.providers import FakeSendGrid

KEY_VARIABLE = "BENCH_PROVIDER_KEY"


def main(argv: list[str]) -> None:
    port = int(argv[0])
    provider = FakeSendGrid(api_key=os.environ[KEY_VARIABLE])
    provider.keep_requests = False

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(provider.accepted_count))

    app = provider.app()
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
