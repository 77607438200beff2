"""What a session's kernel has consumed so far: CPU seconds and memory, read on the host.

Runs in the metering thread, never on the event loop. Every read is of a file the kernel cannot
write: its cgroup's files (cgroupfs, created by the server) or ``/proc`` (procfs). What they
hold is still parsed as untrusted text (a process name in ``/proc/<pid>/stat`` is the kernel's
to choose), and every read is bounded.

CPU, best first:

* ``cgroup``: the kernel's own cgroup (``cpu.stat`` ``usage_usec`` on cgroup v2, or
  ``cpuacct.usage`` where a v1 cpu hierarchy carries it). It counts every process the kernel
  ever ran there, the dead ones included.
* ``proc``: ``utime + stime + cutime + cstime`` of every live process of the kernel's tree
  (the launcher, bubblewrap, the kernel, its children); a reaped child's time is in its
  parent's ``cutime``, so nothing is counted twice.

Memory: the cgroup's peak (``memory.peak`` on v2, ``memory.max_usage_in_bytes`` on v1), reset at
the start of each call where the host allows it (so the figure is the call's own peak); else the
largest RSS of the tree sampled while the call ran.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from pixell_kernel_runtime.sessions import procinfo

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A kernel may fork many processes (up to its pids limit): the /proc walk stops here.
MAX_TREE = 1024
_READ_CAP = 4096  # bytes of any one cgroup or /proc file

CGROUP, PROC, NONE = "cgroup", "proc", "none"
# Peak sources: the cgroup's peak during the call; since the kernel started (the host cannot
# reset it); the largest RSS of the kernel's tree sampled while the call ran.
PEAK_CALL, PEAK_KERNEL, SAMPLED = "cgroup_peak", "cgroup_peak_since_kernel_start", "sampled"


@dataclass(frozen=True)
class Target:
    """One kernel process of a session, as the session's objects name it."""

    key: str  # identity: its cgroup dir, else "pid:<pid>"
    pid: int | None
    cgroup_dirs: tuple[str, ...]


@dataclass(frozen=True)
class Reading:
    target: Target
    cpu_seconds: float | None
    cpu_source: str
    rss_bytes: int | None  # the tree's RSS now (read only when there is no peak_bytes)
    peak_bytes: int | None  # the cgroup's peak (see PeakWatch), when it has one


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, _READ_CAP).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the process name (which may hold spaces and parentheses)."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields if len(fields) > 14 else None


def target_of(session: Any) -> Target | None:
    """The session's current kernel process, or None (not started, or seen dead).

    Attribute reads only (no I/O): the ``started`` hook calls it on the loop, so that the
    kernel a call starts on is the one named then. The metering thread calls it too while the
    loop replaces these objects as kernels start and end: each reference is read once, and a
    stale one names a kernel that is gone, which then reads as gone."""
    kernel = getattr(session, "kernel", None)
    if kernel is None or getattr(kernel, "died", False):
        return None
    try:
        pid = kernel.pid
    except AttributeError:  # the kernel manager is being torn down
        pid = None
    sandbox = getattr(session, "sandbox", None)
    groups = getattr(sandbox, "cgroups", None)
    dirs = tuple(getattr(groups, "dirs", ()) or ())
    if dirs:
        # A kernel's cgroups are made for its launch (their names carry a random part).
        return Target(key=getattr(groups, "v2_dir", None) or dirs[0], pid=pid, cgroup_dirs=dirs)
    if pid is None:
        return None
    return Target(key=f"pid:{pid}", pid=pid, cgroup_dirs=())


def _cgroup_cpu(dirs: tuple[str, ...]) -> float | None:
    for d in dirs:
        text = _read(os.path.join(d, "cpu.stat"))
        for line in (text or "").splitlines():
            name, _, value = line.partition(" ")
            if name == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        text = _read(os.path.join(d, "cpuacct.usage"))
        if text and text.strip().isdigit():
            return int(text) / 1e9
    return None


def _proc_cpu(pid: int) -> float | None:
    ticks, seen = 0, False
    for p in procinfo.tree_pids(pid, limit=MAX_TREE):
        fields = _stat_fields(p)
        if fields is None:
            continue
        with contextlib.suppress(ValueError):
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
            seen = True
    return ticks / CLK_TCK if seen else None


def _peak_file(dirs: tuple[str, ...]) -> str | None:
    for d in dirs:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def read(target: Target, peak: PeakWatch | None = None) -> Reading:
    cpu, source = None, NONE
    if target.cgroup_dirs:
        cpu = _cgroup_cpu(target.cgroup_dirs)
        source = CGROUP if cpu is not None else NONE
    if cpu is None and target.pid is not None:
        cpu = _proc_cpu(target.pid)
        source = PROC if cpu is not None else NONE
    peak_bytes = peak.read() if peak else None
    # The tree's RSS is the fallback for a kernel without a cgroup peak: not walked otherwise.
    rss = procinfo.tree_rss(target.pid) if peak_bytes is None and target.pid else None
    return Reading(target, cpu, source, rss or None, peak_bytes)


class PeakWatch:
    """The peak memory of one kernel cgroup from now on, where the host can reset it.

    cgroup v2 ``memory.peak`` (Linux 6.12+) resets per open file: the file stays open from the
    call's start to its end. cgroup v1 ``memory.max_usage_in_bytes`` resets for everyone (one
    call runs in a session at a time, so that is this call's)."""

    def __init__(self, path: str, fd: int | None, reset: bool) -> None:
        self.path = path
        self._fd = fd
        self.reset = reset  # False: the peak is the kernel's since it started

    @classmethod
    def start(cls, target: Target, *, reset: bool = True) -> PeakWatch | None:
        path = _peak_file(target.cgroup_dirs)
        if path is None:
            return None
        v2 = path.endswith("memory.peak")
        if not reset:
            return cls(path, None, False)
        try:
            fd = os.open(path, (os.O_RDWR if v2 else os.O_WRONLY) | os.O_NOFOLLOW)
        except OSError:
            return cls(path, None, False)
        try:
            os.write(fd, b"reset\n" if v2 else b"0\n")
            ok = True
        except OSError:  # cgroup v2 before Linux 6.12: memory.peak cannot be reset
            ok = False
        if v2:
            return cls(path, fd, ok)  # the reset holds for reads through this file only
        os.close(fd)
        return cls(path, None, ok)

    def read(self) -> int | None:
        try:
            text = os.pread(self._fd, 64, 0).decode() if self._fd is not None else _read(self.path)
        except OSError:
            return None
        text = (text or "").strip()
        return int(text) if text.isdigit() else None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
