"""A provider that takes SendGrid v3 Mail Send requests for almost no CPU: the benchmark's
HTTP end of the line, as smtp-sink is the SMTP one.

bench/provider.py runs the tests' FakeSendGrid, which parses and checks every JSON body in
aiohttp; on two shared cores that fake costs about what the relay does, so the relay's
HTTP end-to-end rate measured the fake as much as the relay. This one is a bare asyncio
protocol (on uvloop when it is installed) that reads just enough HTTP/1.1 to find where
each request ends: the request line, the headers, and Content-Length bytes of body, which
it counts and throws away. Keep-alive and pipelined requests are served in order on one
connection. It answers as SendGrid's POST /v3/mail/send does on success (202, an empty
body, the message id in `X-Message-Id`, which the relay's sendgrid upstream records) and
401 for a wrong API key; nothing else about the request is checked. A chunked body is
refused with 411 (the relay always sends a Content-Length) and the connection closed.

    python -m bench.sink_provider PORT    (the API key comes from BENCH_PROVIDER_KEY)

`GET /count` answers how many messages were accepted, `GET /stats` a line of counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import cast

KEY_VARIABLE = "BENCH_PROVIDER_KEY"
SEND_PATH = b"/v3/mail/send"
MAX_HEAD = 64 * 1024  # request line and headers; more is refused with 431
MAX_BODY = 30 * 1000**2  # SendGrid's limit for a whole Mail Send request
UNAUTHORIZED_BODY = (
    b'{"errors":[{"field":null,"message":"The provided authorization grant is invalid,'
    b' expired, or revoked","help":null}]}'
)
REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
}


@dataclass
class Counters:
    """What the provider saw; shared by all its connections."""

    accepted: int = 0
    requests: int = 0
    body_bytes: int = 0
    connections: int = 0


def response(status: int, body: bytes = b"", *, extra: bytes = b"", close: bool = False) -> bytes:
    connection = b"close" if close else b"keep-alive"
    return (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode()
        + b"Server: bench-sink-provider\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Connection: "
        + connection
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


@dataclass
class _Pending:
    """A request whose head has been read and whose body is still arriving."""

    method: bytes
    target: bytes
    authorized: bool
    close: bool
    length: int


class SinkProviderProtocol(asyncio.Protocol):
    """One client connection: heads are parsed, bodies counted and dropped, answers
    written in request order."""

    def __init__(self, counters: Counters, authorization: bytes) -> None:
        self.counters = counters
        self.authorization = authorization
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.pending: _Pending | None = None
        self.remaining = 0  # body bytes of `pending` still to come
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.counters.connections += 1

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.closing:
            if self.pending is not None:
                taken = min(self.remaining, len(view))
                self.remaining -= taken
                self.counters.body_bytes += taken
                view = view[taken:]
                if self.remaining == 0:
                    self._answer(self.pending)
                continue
            searched = max(0, len(self.head) - 3)  # a terminator may straddle two reads
            self.head += view
            end = self.head.find(b"\r\n\r\n", searched)
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._fail(431)
                return
            head = bytes(self.head[:end])
            view = memoryview(bytes(self.head[end + 4 :]))  # body, or the next request
            self.head.clear()
            self._start_request(head)

    def _start_request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._fail(400)
            return
        method, target, version = parts
        length = 0
        authorized = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    self._fail(400)
                    return
                length = int(value)
            elif name == b"transfer-encoding":
                self._fail(411)  # no way to tell where a body we don't decode ends
                return
            elif name == b"authorization":
                authorized = value == self.authorization
            elif name == b"connection":
                lowered = value.lower()
                close = b"close" in lowered or (close and b"keep-alive" not in lowered)
            elif name == b"expect" and value.lower() == b"100-continue":
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.counters.requests += 1
        request = _Pending(method, target, authorized, close, length)
        if length == 0:
            self._answer(request)
        else:
            self.pending, self.remaining = request, length

    def _answer(self, request: _Pending) -> None:
        self.pending = None
        assert self.transport is not None
        path = request.target.split(b"?", 1)[0]
        if request.method == b"POST" and path == SEND_PATH:
            if not request.authorized:
                reply = response(401, UNAUTHORIZED_BODY, close=request.close)
            elif request.length > MAX_BODY:
                reply = response(413, close=request.close)
            else:
                self.counters.accepted += 1
                message_id = f"X-Message-Id: bench{self.counters.accepted:012d}.sink\r\n"
                reply = response(202, extra=message_id.encode(), close=request.close)
        elif request.method == b"GET" and path == b"/count":
            reply = response(200, str(self.counters.accepted).encode(), close=request.close)
        elif request.method == b"GET" and path == b"/stats":
            c = self.counters
            text = (
                f'{{"accepted":{c.accepted},"requests":{c.requests},'
                f'"body_bytes":{c.body_bytes},"connections":{c.connections}}}'
            )
            reply = response(200, text.encode(), close=request.close)
        else:
            reply = response(404, close=request.close)
        self.transport.write(reply)
        if request.close:
            self.closing = True
            self.transport.close()

    def _fail(self, status: int) -> None:
        """Answer and close: after a head we cannot read, where the next request starts
        is unknown."""
        assert self.transport is not None
        self.closing = True
        self.transport.write(response(status, close=True))
        self.transport.close()


async def start(host: str, port: int, api_key: str) -> tuple[asyncio.Server, Counters]:
    """Listen on host:port (0 picks a free port); the counters fill as requests come."""
    counters = Counters()
    authorization = b"Bearer " + api_key.encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProviderProtocol(counters, authorization), host, port, backlog=1024
    )
    return server, counters


async def serve(port: int, api_key: str) -> None:
    server, _ = await start("127.0.0.1", port, api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        sys.exit("usage: python -m bench.sink_provider PORT (API key in BENCH_PROVIDER_KEY)")
    api_key = os.environ.get(KEY_VARIABLE)
    if not api_key:
        sys.exit(f"bench.sink_provider: set {KEY_VARIABLE} to the API key the relay will send")
    runner: asyncio.Runner
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # plain asyncio works too, for a little more CPU
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(int(argv[0]), api_key))


if __name__ == "__main__":
    main(sys.argv[1:])
