"""Per-kernel cgroups (server side): discovery, limits, kill-everything, removal.

Kernel cgroups are created *under the server's own cgroup* in each hierarchy (never at the
root: the host's own accounting of the server stays whole), named ``pkr-<server pid>-<key>``.

* cgroup v1 ``memory``, ``cpu``, ``pids`` (limits) and ``freezer`` (a clean kill) when writable;
* cgroup v2: ``cgroup.kill`` (kills every member, setsid escapees included) and, when the
  server's cgroup delegates them, ``memory.max``, ``pids.max``, ``cpu.max``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")


@dataclass
class CgroupHost:
    """Where this process's cgroups are, per hierarchy (absolute directories)."""

    v1: dict[str, str] = field(default_factory=dict)
    v2: str | None = None


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def discover() -> CgroupHost:
    host = CgroupHost()
    mounts_v1: dict[str, str] = {}
    mount_v2: str | None = None
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt, fstype, opts = _unescape(parts[1]), parts[2], parts[3].split(",")
                if fstype == "cgroup2" and mount_v2 is None:
                    mount_v2 = mnt
                elif fstype == "cgroup":
                    for ctrl in V1_CONTROLLERS:
                        if ctrl in opts and ctrl not in mounts_v1:
                            mounts_v1[ctrl] = mnt
        with open("/proc/self/cgroup") as fh:
            own = [line.rstrip("\n").split(":", 2) for line in fh if line.strip()]
    except OSError:
        return host
    for hid, ctrls, path in own:
        if hid == "0" and ctrls == "" and mount_v2:
            host.v2 = os.path.normpath(mount_v2 + "/" + path)
            continue
        for ctrl in ctrls.split(","):
            if ctrl in mounts_v1:
                host.v1[ctrl] = os.path.normpath(mounts_v1[ctrl] + "/" + path)
    return host


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def probe(host: CgroupHost | None = None) -> dict:
    """Which controllers can this process create and limit? (mkdir + write + rmdir)."""
    host = host or discover()
    name = f"pkr-probe-{os.getpid()}"
    result: dict = {"v1": {}, "v2": {"kill": False, "controllers": []}, "errors": {}}
    tests = {
        "memory": ("memory.limit_in_bytes", str(1 << 30)),
        "cpu": ("cpu.cfs_quota_us", "100000"),
        "pids": ("pids.max", "100"),
        "freezer": ("freezer.state", "THAWED"),
    }
    for ctrl, base in host.v1.items():
        d = os.path.join(base, name)
        try:
            os.mkdir(d)
            try:
                fname, value = tests[ctrl]
                _write(os.path.join(d, fname), value)
                result["v1"][ctrl] = base
            finally:
                os.rmdir(d)
        except OSError as exc:
            result["errors"][f"v1:{ctrl}"] = str(exc)
    if host.v2:
        d = os.path.join(host.v2, name)
        try:
            os.mkdir(d)
            try:
                result["v2"]["kill"] = os.path.exists(os.path.join(d, "cgroup.kill"))
                ctrls = set(_read(os.path.join(d, "cgroup.controllers")).split())
                result["v2"]["controllers"] = sorted(ctrls & {"memory", "pids", "cpu"})
                result["v2"]["path"] = host.v2
            finally:
                os.rmdir(d)
        except OSError as exc:
            result["errors"]["v2"] = str(exc)
    return result


@dataclass
class KernelCgroups:
    dirs: list[str] = field(default_factory=list)  # every created directory
    procs: list[str] = field(default_factory=list)  # cgroup.procs files the launcher joins
    v2_dir: str | None = None
    freezer_dir: str | None = None
    limits: dict = field(default_factory=dict)


def create(
    key: str,
    *,
    probed: dict,
    memory_bytes: int | None,
    cpus: float | None,
    pids: int | None,
) -> KernelCgroups:
    """Create the kernel's cgroups and set limits. Raises OSError on a failed write."""
    name = f"pkr-{os.getpid()}-{key}"
    kc = KernelCgroups()
    v1 = probed.get("v1", {})
    v2 = probed.get("v2", {})

    def mk(base: str) -> str:
        d = os.path.join(base, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        kc.dirs.append(d)
        kc.procs.append(os.path.join(d, "cgroup.procs"))
        return d

    try:
        if v2.get("path") and v2.get("kill"):
            d = mk(v2["path"])
            kc.v2_dir = d
            ctrls = set(v2.get("controllers", []))
            if memory_bytes and "memory" in ctrls:
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                with contextlib.suppress(OSError):
                    _write(os.path.join(d, "memory.swap.max"), "0")
                kc.limits["memory"] = memory_bytes
            if pids and "pids" in ctrls:
                _write(os.path.join(d, "pids.max"), str(pids))
                kc.limits["pids"] = pids
            if cpus and "cpu" in ctrls:
                _write(os.path.join(d, "cpu.max"), f"{int(cpus * 100000)} 100000")
                kc.limits["cpus"] = cpus
        if "memory" in v1 and memory_bytes and "memory" not in kc.limits:
            d = mk(v1["memory"])
            _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory_bytes))
            kc.limits["memory"] = memory_bytes
        if "pids" in v1 and pids and "pids" not in kc.limits:
            d = mk(v1["pids"])
            _write(os.path.join(d, "pids.max"), str(pids))
            kc.limits["pids"] = pids
        if "cpu" in v1 and cpus and "cpus" not in kc.limits:
            d = mk(v1["cpu"])
            _write(os.path.join(d, "cpu.cfs_period_us"), "100000")
            _write(os.path.join(d, "cpu.cfs_quota_us"), str(int(cpus * 100000)))
            kc.limits["cpus"] = cpus
        if "freezer" in v1 and not kc.v2_dir:
            kc.freezer_dir = mk(v1["freezer"])
    except OSError:
        destroy(kc)
        raise
    return kc


def members(kc: KernelCgroups) -> set[int]:
    pids: set[int] = set()
    for procs in kc.procs:
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in _read(procs).split())
    return pids


def kill_all(kc: KernelCgroups, timeout: float = 3.0) -> set[int]:
    """SIGKILL every process in the kernel's cgroups; wait until they are gone."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = members(kc)
        if not pids:
            return killed
        killed |= pids
        if kc.v2_dir:
            with contextlib.suppress(OSError):
                _write(os.path.join(kc.v2_dir, "cgroup.kill"), "1")
        else:
            frozen = False
            if kc.freezer_dir:
                with contextlib.suppress(OSError):
                    _write(os.path.join(kc.freezer_dir, "freezer.state"), "FROZEN")
                    frozen = True
            for pid in members(kc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if frozen:
                with contextlib.suppress(OSError):
                    _write(os.path.join(kc.freezer_dir, "freezer.state"), "THAWED")
        if time.monotonic() > deadline:
            return killed
        time.sleep(0.01)


def destroy(kc: KernelCgroups) -> list[str]:
    """Remove the directories (after kill_all). Returns those that could not be removed."""
    left: list[str] = []
    for d in reversed(kc.dirs):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            left.append(d)
    return left


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(probed: dict) -> list[str]:
    """Remove kernel cgroups left by runtime processes that died without releasing them
    (killing whatever still runs in them). Returns the directories removed."""
    bases = list(probed.get("v1", {}).values())
    if probed.get("v2", {}).get("path"):
        bases.append(probed["v2"]["path"])
    stale: dict[str, KernelCgroups] = {}
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            parts = name.split("-")
            if len(parts) < 3 or parts[0] != "pkr":
                continue
            pid_text = parts[2] if parts[1] == "probe" else parts[1]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            d = os.path.join(base, name)
            kc = stale.setdefault(name, KernelCgroups())
            kc.dirs.append(d)
            kc.procs.append(os.path.join(d, "cgroup.procs"))
            if base == probed.get("v2", {}).get("path") and os.path.exists(
                os.path.join(d, "cgroup.kill")
            ):
                kc.v2_dir = d
    removed: list[str] = []
    for kc in stale.values():
        kill_all(kc, timeout=1.0)
        left = destroy(kc)
        removed += [d for d in kc.dirs if d not in left]
    return removed
