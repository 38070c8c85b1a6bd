"""A stand-in for systemd's notify socket: a unix datagram socket that records who sent
what (the sender's pid comes from the kernel, SCM_CREDENTIALS, as systemd reads it to
apply NotifyAccess=main)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass

UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Notification:
    pid: int
    lines: tuple[str, ...]

    def get(self, key: str) -> str | None:
        for line in self.lines:
            name, _, value = line.partition("=")
            if name == key:
                return value
        return None


class NotifySocket:
    """Bound to `address` ("@name" for the abstract namespace, or a path)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.received: asyncio.Queue[Notification] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.read_pending)

    def read_pending(self) -> None:
        """Move every datagram waiting in the socket into `received`."""
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = UCRED.unpack(payload[: UCRED.size])[0]
            self.received.put_nowait(Notification(pid, tuple(data.decode().split("\n"))))

    async def next(self, timeout: float = 30) -> Notification:
        return await asyncio.wait_for(self.received.get(), timeout)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)
