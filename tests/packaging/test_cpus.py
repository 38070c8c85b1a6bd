"""`workers = 0` counts the CPUs this process may use: affinity bounded by the cgroup quota.

Each test lays out a fake /proc and /sys tree the way a kernel (or a container runtime)
shows it, and points `root` at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cpus import available_cpus, cgroup_cpu_limit, worker_count


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_host(root: Path, cgroup: str = "/") -> Path:
    """A unified (v2) hierarchy with the process in `cgroup`; its directory returned."""
    write(root, "proc/self/cgroup", f"0::{cgroup}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root, "sys/fs/cgroup/cpu.max", "max 100000\n")
    directory = root / "sys/fs/cgroup" / cgroup.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def v1_host(root: Path, cgroup: str = "/", quota: int = -1, period: int = 100000) -> Path:
    """A v1 (or hybrid) host: cpu,cpuacct joined, the process in `cgroup` there."""
    write(
        root,
        "proc/self/cgroup",
        f"12:memory:{cgroup}\n3:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n0::{cgroup}\n",
    )
    directory = root / "sys/fs/cgroup/cpu,cpuacct" / cgroup.lstrip("/")
    write(root, f"{directory.relative_to(root)}/cpu.cfs_quota_us", f"{quota}\n")
    write(root, f"{directory.relative_to(root)}/cpu.cfs_period_us", f"{period}\n")
    return directory


def test_v2_container_with_cpus_1_5_runs_two_workers_on_a_big_host(tmp_path: Path) -> None:
    # `docker run --cpus=1.5` with a cgroup namespace: the path is "/", the limit at the mount.
    v2_host(tmp_path)
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    assert available_cpus(root=tmp_path, affinity=lambda: 32) == 2


def test_v2_without_a_quota_is_the_affinity_mask(tmp_path: Path) -> None:
    v2_host(tmp_path, "/system.slice/relay.service")
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(root=tmp_path, affinity=lambda: 6) == 6


def test_v2_quota_on_a_parent_slice_binds_the_service(tmp_path: Path) -> None:
    service = v2_host(tmp_path, "/relay.slice/relay.service")
    write(tmp_path, "sys/fs/cgroup/relay.slice/cpu.max", "300000 100000\n")
    (service / "cpu.max").write_text("max 100000\n")
    assert available_cpus(root=tmp_path, affinity=lambda: 8) == 3


def test_v2_the_smallest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    service = v2_host(tmp_path, "/relay.slice/relay.service")
    write(tmp_path, "sys/fs/cgroup/relay.slice/cpu.max", "400000 100000\n")
    (service / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one worker
    assert cgroup_cpu_limit(tmp_path) == 1


def test_the_affinity_mask_wins_when_it_is_smaller_than_the_quota(tmp_path: Path) -> None:
    # `--cpuset-cpus=0` with `--cpus=4`: one CPU to run on, whatever the time budget.
    v2_host(tmp_path)
    write(tmp_path, "sys/fs/cgroup/cpu.max", "400000 100000\n")
    assert available_cpus(root=tmp_path, affinity=lambda: 1) == 1


def test_v2_host_path_not_visible_in_the_container_reads_the_mount(tmp_path: Path) -> None:
    # No cgroup namespace: /proc/self/cgroup names the host's path, the container's
    # /sys/fs/cgroup is its own cgroup.
    v2_host(tmp_path)
    write(tmp_path, "proc/self/cgroup", "0::/docker/0123abcd\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2


def test_v1_quota_rounds_up(tmp_path: Path) -> None:
    v1_host(tmp_path, "/docker/0123abcd", quota=250000, period=100000)
    assert available_cpus(root=tmp_path, affinity=lambda: 16) == 3


def test_v1_without_a_quota(tmp_path: Path) -> None:
    v1_host(tmp_path, "/user.slice", quota=-1)
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(root=tmp_path, affinity=lambda: 4) == 4


def test_v1_cpu_mounted_alone(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "4:cpu:/\n2:cpuacct:/\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "100000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert available_cpus(root=tmp_path, affinity=lambda: 2) == 1


def test_hybrid_host_reads_the_v1_controller_not_the_empty_unified_tree(tmp_path: Path) -> None:
    # systemd's hybrid layout: "0::/" names a controller-less v2 tree under unified/.
    v1_host(tmp_path, "/", quota=100000, period=50000)
    (tmp_path / "sys/fs/cgroup/unified").mkdir()
    assert cgroup_cpu_limit(tmp_path) == 2


@pytest.mark.parametrize("cpu_max", ["", "garbage\n", "0 100000\n", "100000 0\n", "a b\n"])
def test_malformed_cpu_max_means_no_limit(tmp_path: Path, cpu_max: str) -> None:
    v2_host(tmp_path)
    write(tmp_path, "sys/fs/cgroup/cpu.max", cpu_max)
    assert available_cpus(root=tmp_path, affinity=lambda: 3) == 3


def test_no_proc_or_sys_at_all_is_the_affinity_mask(tmp_path: Path) -> None:
    assert available_cpus(root=tmp_path, affinity=lambda: 5) == 5


def test_never_less_than_one(tmp_path: Path) -> None:
    assert available_cpus(root=tmp_path, affinity=lambda: 0) == 1


def test_worker_count_zero_in_a_process_pinned_to_one_cpu_is_one() -> None:
    # What `taskset -c N relay serve` (or `docker run --cpuset-cpus=N`) gives the relay.
    one_cpu = min(os.sched_getaffinity(0))
    code = "from relay.cpus import worker_count; print(worker_count(0))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}),
    )
    assert result.stdout.strip() == "1"
    assert worker_count(3) == 3
