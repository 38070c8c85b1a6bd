"""Another revision of this repository, checked out beside the working tree for a
before/after run: `git worktree add --detach` into a temporary directory, removed again
afterwards. It runs with the same virtualenv (`python -m relay` with the checkout as its
working directory imports the checkout's `relay` package first)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class WorktreeError(RuntimeError):
    """The revision could not be checked out; the message says which and why."""


@contextlib.contextmanager
def worktree(revision: str, top: Path) -> Iterator[Path]:
    """The source tree of `revision` at top/src-<revision>, for as long as the block runs."""
    path = top / f"src-{revision.replace('/', '_')}"
    done = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(path), revision],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise WorktreeError(
            f"cannot check out {revision!r} for the before/after run: {done.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)],
            check=False,
            capture_output=True,
            timeout=120,
        )
