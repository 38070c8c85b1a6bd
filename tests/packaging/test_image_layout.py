"""The runtime layout the Dockerfile builds, built here without Docker and started.

Docker is not available on the development machines, so this test does what the image's
two stages do, with the same scripts: docker/build-wheels.sh (wheels of relay and its
pyproject.toml pins, uvloop included), docker/install-venv.sh (a fresh virtual environment
from those wheels only), the image's /etc/relay layout (docker/config.toml, var ->
/var/lib/relay), and docker/entrypoint.sh as the entrypoint: `serve` with no arguments and
`healthcheck` as the HEALTHCHECK runs it. Then a mail goes through it to the Maildir.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.fakes.relay_process import free_port
from tests.packaging.pins import DOCKER, ROOT, normalise, runtime_pins

TOKEN = "layout-test-token-0123456789abcdef"


def run(*command: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def image_layout(root: Path, *, smtp_port: int, web_port: int) -> Path:
    """/etc/relay and /var/lib/relay under `root`, as the runtime stage lays them out."""
    state = root / "var/lib/relay"
    state.mkdir(parents=True)
    etc = root / "etc/relay"
    (etc / "tls").mkdir(parents=True)
    (etc / "var").symlink_to(state)
    text = (DOCKER / "config.toml").read_text()
    for inside, here in (("0.0.0.0:2525", smtp_port), ("0.0.0.0:8025", web_port)):
        assert text.count(f'"{inside}"') == 1, f"docker/config.toml no longer listens on {inside}"
        text = text.replace(f'"{inside}"', f'"127.0.0.1:{here}"')
    (etc / "config.toml").write_text(text)
    return etc / "config.toml"


def send(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "app@example.com"
    message["To"] = "someone@example.org"
    message["Subject"] = subject
    message.set_content("Through the image's layout.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.send_message(message)


async def wait_for_file_with(directory: Path, needle: bytes, timeout: float = 30) -> Path:
    """The relay is another process: its outbox is looked at until the message is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if directory.is_dir():
            for path in directory.iterdir():
                if needle in path.read_bytes():
                    return path
        await asyncio.sleep(0.1)
    raise AssertionError(f"no file in {directory} holds {needle!r}")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_relay_built_like_the_image_serves_mail_through_its_entrypoint(
    tmp_path: Path,
) -> None:
    wheels, venv = tmp_path / "wheels", tmp_path / "opt/relay"
    build_env = {"PYTHON": sys.executable}
    await asyncio.to_thread(run, DOCKER / "build-wheels.sh", ROOT, wheels, env=build_env)
    await asyncio.to_thread(run, DOCKER / "install-venv.sh", venv, wheels, env=build_env)

    # Exactly pyproject.toml's pins are installed, uvloop included, and relay itself comes
    # from the environment, not from this checkout.
    probe = (
        "import importlib.metadata as m, json, relay, relay.wire, uvloop;"
        "print(json.dumps({'relay': relay.__file__, 'scanner': relay.wire.SCANNER,"
        " 'versions': {d.metadata['Name']: d.version for d in m.distributions()}}))"
    )
    found = json.loads(run(venv / "bin/python", "-I", "-c", probe))
    assert Path(found["relay"]).is_relative_to(venv)
    # hatch_build.py compiled the DATA scanner into the wheel (the image's build stage has
    # a C compiler, as this machine does).
    assert found["scanner"] == ("c" if shutil.which("cc") else "python")
    installed = {normalise(name): version for name, version in found["versions"].items()}
    for name, version in runtime_pins().items():
        assert installed.get(name) == version, f"{name}: pyproject pins {version}"

    smtp_port, web_port = free_port(), free_port()
    config = image_layout(tmp_path, smtp_port=smtp_port, web_port=web_port)
    entrypoint = tmp_path / "usr/local/bin/relay-entrypoint"
    entrypoint.parent.mkdir(parents=True)
    shutil.copy2(DOCKER / "entrypoint.sh", entrypoint)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "var/lib/relay"),
        "RELAY_CONFIG": str(config),
        "RELAY_TOKEN_OPS": TOKEN,
        "RELAY_HEALTH_URL": f"http://127.0.0.1:{web_port}/readyz",
    }

    async def healthcheck() -> tuple[int, bytes]:
        check = await asyncio.create_subprocess_exec(
            entrypoint, "healthcheck", env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await check.communicate()
        assert check.returncode is not None
        return check.returncode, err

    code, err = await healthcheck()
    assert (code, err.split(b":")[0]) == (1, b"not ready"), err

    relay = await asyncio.create_subprocess_exec(
        entrypoint,  # no arguments: the image's CMD, serve
        env=env,
        cwd=tmp_path / "var/lib/relay",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    log: list[str] = []
    try:
        assert relay.stderr is not None
        async with asyncio.timeout(60):
            async for raw in relay.stderr:
                log.append(raw.decode(errors="replace").rstrip())
                if "relay ready" in log[-1]:
                    break
            else:
                raise AssertionError("the relay exited:\n" + "\n".join(log))
        drain = asyncio.create_task(relay.stderr.read())

        # exec all the way down: the entrypoint's pid is the relay, which gets the SIGTERM.
        command_line = Path(f"/proc/{relay.pid}/cmdline").read_bytes().split(b"\0")
        assert command_line[1:3] == [str(venv / "bin/relay").encode(), b"serve"]

        assert await healthcheck() == (0, b"")
        subject = f"image layout {os.getpid()}"
        await asyncio.to_thread(send, smtp_port, subject)
        outbox = tmp_path / "var/lib/relay/outbox/new"
        await wait_for_file_with(outbox, f"Subject: {subject}".encode())
        assert (tmp_path / "var/lib/relay/queue").is_dir()
        assert (tmp_path / "var/lib/relay/tls").is_dir()  # the self-signed pair, in the volume

        relay.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(relay.wait(), 60) == 0
        await drain
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_is_pure_python_only_when_asked_or_without_a_compiler(tmp_path: Path) -> None:
    """RELAY_PURE_PYTHON=1 (or no C compiler) gives a py3-none-any wheel without the module;
    otherwise the wheel is tagged for this interpreter and platform and carries it."""
    if not shutil.which("cc"):
        pytest.skip("no C compiler here")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w"]
    run(*build, tmp_path / "pure", ROOT, env={"RELAY_PURE_PYTHON": "1"})
    run(*build, tmp_path / "native", ROOT, env={"RELAY_PURE_PYTHON": "0"})
    [pure] = (tmp_path / "pure").glob("*.whl")
    [native] = (tmp_path / "native").glob("*.whl")
    assert pure.name.endswith("-py3-none-any.whl")
    assert not native.name.endswith("-py3-none-any.whl"), native.name
    with zipfile.ZipFile(native) as archive:
        modules = [
            n for n in archive.namelist() if n.startswith("relay/_wirescan.") and n.endswith(".so")
        ]
    with zipfile.ZipFile(pure) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".so")]
    assert len(modules) == 1
