"""How many CPUs this process may really use: what `server.workers = 0` starts.

`os.cpu_count()` is the host's count. In a container limited to one CPU on a 32-core host
it says 32, and the relay would fork 32 workers to share one CPU's time (each with its own
queue shard and connections). Two things narrow it: the affinity mask (`taskset`,
`docker run --cpuset-cpus`, systemd's `CPUAffinity=`), and the cgroup's CPU quota
(`docker run --cpus=1.5`, Kubernetes limits, systemd's `CPUQuota=`), which is a time
budget, not a set of CPUs: 1.5 CPUs of time rounds up to 2 workers.

Linux exposes the quota in one of two cgroup layouts:
- v2 (unified): `<mount>/<path>/cpu.max`, "max 100000" (no limit) or "150000 100000"
  (quota, then period, in microseconds);
- v1: `<mount>/cpu,cpuacct/<path>/cpu.cfs_quota_us` ("-1" for no limit) and
  `cpu.cfs_period_us`.
The process's own `<path>` is in /proc/self/cgroup. A limit set on a parent cgroup binds
its children too, so every level from the process's cgroup up to the mount is read and the
smallest quota wins. Inside a container with its own cgroup namespace the path is "/" and
the container's limit sits at the mount itself; without one, /proc/self/cgroup shows the
host's path, which may not exist in the container's view of /sys/fs/cgroup: then the mount
itself is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

CGROUP_MOUNT = PurePosixPath("sys/fs/cgroup")
# Where distributions mount the v1 cpu controller (a joint mount or either name alone).
V1_CPU_DIRS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")


def worker_count(workers: int) -> int:
    """`server.workers`, or for 0 the CPUs this process may use: a container given 2 of a
    host's 32 CPUs runs 2 workers, not 32."""
    return workers or available_cpus()


def available_cpus(*, root: Path = Path("/"), affinity: Callable[[], int] | None = None) -> int:
    """CPUs this process may use: the affinity mask bounded by the cgroup quota, at least 1.

    `root` is where /proc and /sys are found (tests point it at a tree of fake files);
    `affinity` counts the CPUs of the affinity mask (default: the real one).
    """
    cpus = (affinity or _affinity_count)()
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def cgroup_cpu_limit(root: Path = Path("/")) -> int | None:
    """The cgroup CPU quota in whole CPUs (rounded up), or None when there is none.

    Unreadable or malformed files count as "no limit": a guess of too many workers is
    better than a relay that does not start.
    """
    memberships = _memberships(root)
    limits = [*_v2_limits(root, memberships), *_v1_limits(root, memberships)]
    return min(limits) if limits else None


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _memberships(root: Path) -> dict[str, PurePosixPath]:
    """/proc/self/cgroup as {controller: path}; the v2 hierarchy under the key ""."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return {}
    found: dict[str, PurePosixPath] = {}
    for line in text.splitlines():
        # "hierarchy-ID:controller-list:path"; the path may itself hold colons.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = PurePosixPath(path or "/")
    return found


def _levels(mount: Path, path: PurePosixPath) -> Iterator[Path]:
    """The process's cgroup directory and each parent up to the mount (or the mount alone
    when the path is not visible from here)."""
    relative = PurePosixPath(*path.parts[1:]) if path.is_absolute() else path
    directory = mount / relative
    if not directory.is_dir():
        yield mount
        return
    while True:
        yield directory
        if directory == mount:
            return
        directory = directory.parent


def _v2_limits(root: Path, memberships: dict[str, PurePosixPath]) -> Iterator[int]:
    if "" not in memberships:
        return
    mount = root / CGROUP_MOUNT
    if not (mount / "cgroup.controllers").exists():
        # A hybrid host: v2 mounted elsewhere (/sys/fs/cgroup/unified) without controllers.
        return
    for directory in _levels(mount, memberships[""]):
        limit = _parse_cpu_max(directory / "cpu.max")
        if limit is not None:
            yield limit


def _v1_limits(root: Path, memberships: dict[str, PurePosixPath]) -> Iterator[int]:
    if "cpu" not in memberships:
        return
    for name in V1_CPU_DIRS:
        mount = root / CGROUP_MOUNT / name
        if mount.is_dir():
            break
    else:
        return
    for directory in _levels(mount, memberships["cpu"]):
        quota = _read_int(directory / "cpu.cfs_quota_us")
        period = _read_int(directory / "cpu.cfs_period_us")
        if quota is not None and period and quota > 0:
            yield max(1, math.ceil(quota / period))


def _parse_cpu_max(path: Path) -> int | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
