"""A private, throwaway PostgreSQL cluster for the tests (Debian's `postgresql` package).

`initdb` + `pg_ctl` in a temporary directory on a free loopback port, trust
authentication, torn down at the end. PostgreSQL refuses to run as root, and CI runs as
root: then the cluster runs as the `postgres` system user (which the Debian package
creates) in a directory it owns. `RELAY_TEST_POSTGRES_DSN` names an existing server
instead (each test still gets a database of its own there).

Fixtures: `postgres` (the server, one per session), `pg_dsn` (a fresh database per test),
`private_postgres` (a cluster of the test's own, which the test may stop and start).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.fakes.relay_process import free_port


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3])
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql")


class PostgresCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.bindir = _bindir()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = (
                (self.root / "server.log").read_text()
                if (self.root / "server.log").exists()
                else ""
            )
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}\n{log[-2000:]}")

    def init(self) -> None:
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def dsn_for(server_dsn: str, database: str) -> str:
    base, _, _ = server_dsn.rpartition("/")
    return f"{base}/{database}"


async def create_database(server_dsn: str) -> str:
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(server_dsn, name)


def _cluster() -> Iterator[PostgresCluster]:
    root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A server DSN for the whole session."""
    given = os.environ.get("RELAY_TEST_POSTGRES_DSN")
    if given:
        yield given
        return
    yield from (c.dsn for c in _cluster())


@pytest.fixture
async def pg_dsn(postgres: str) -> AsyncIterator[str]:
    """A database of this test's own on the session's server."""
    yield await create_database(postgres)


@pytest.fixture
def private_postgres() -> Iterator[PostgresCluster]:
    """A cluster the test may stop and start (never the shared one)."""
    yield from _cluster()
