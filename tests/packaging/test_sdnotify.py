"""relay.sdnotify speaks systemd's notify protocol to whatever $NOTIFY_SOCKET names."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay import sdnotify
from tests.packaging.notify_socket import NotifySocket


@pytest.fixture
async def path_socket(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NotifySocket]:
    # A short directory: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="notify-") as directory:
        listener = NotifySocket(str(Path(directory) / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        yield listener
        listener.close()


async def test_ready_sends_ready_and_one_status_line(path_socket: NotifySocket) -> None:
    assert sdnotify.ready("serving SMTP\non 2525")
    notification = await path_socket.next()
    assert notification.lines == ("READY=1", "STATUS=serving SMTP on 2525")
    assert notification.pid == os.getpid()


async def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NotifySocket(f"@relay-test-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    try:
        assert sdnotify.stopping()
        assert (await listener.next()).lines == ("STOPPING=1",)
    finally:
        listener.close()


async def test_reloading_carries_the_monotonic_time(path_socket: NotifySocket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading("reloading config.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notification = await path_socket.next()
    assert notification.lines[0] == "RELOADING=1"
    usec = notification.get("MONOTONIC_USEC")
    assert usec is not None and before <= int(usec) <= after
    assert notification.get("STATUS") == "reloading config.toml"
    assert sdnotify.ready()
    assert (await path_socket.next()).lines == ("READY=1",)


async def test_status_alone(path_socket: NotifySocket) -> None:
    assert sdnotify.status("draining 3 sessions")
    assert (await path_socket.next()).lines == ("STATUS=draining 3 sessions",)


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.stopping() is False


def test_a_socket_that_is_gone_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    with caplog.at_level(logging.WARNING, logger="relay.app"):
        assert sdnotify.ready() is False
    assert "cannot notify systemd through" in caplog.text


async def test_forget_silences_this_process(path_socket: NotifySocket) -> None:
    sdnotify.forget()
    assert "NOTIFY_SOCKET" not in os.environ
    assert sdnotify.ready() is False
    assert path_socket.received.empty()
