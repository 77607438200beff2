"""The server-side face of the sandbox: probe once, prepare and release each kernel."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cgroups, plan, policy, probe
from .launcher import POLICY_ENV, POLICY_SHA_ENV, PYTHONPATH_ENV

log = logging.getLogger("pixell_kernel_runtime.sandbox")

MODES = ("strict", "best_effort", "off")
POLICY_FILE = "sandbox.json"
AUTO = probe.AUTO


class SandboxUnavailable(RuntimeError):
    """strict mode and the host cannot give what strict requires."""


@dataclass
class _Kernel:
    key: str
    kernel_dir: str
    uid: int | None
    cgroups: cgroups.KernelCgroups | None
    resolved: policy.Resolved


def _key(kernel_dir: Path | str) -> str:
    path = os.path.abspath(os.fspath(kernel_dir))
    return hashlib.sha256(path.encode()).hexdigest()[:12]


class Sandbox:
    """Confines every session kernel as far as the host allows.

    ``bwrap_path`` / ``unshare_path``: ``AUTO`` (look up on ``path_env`` or PATH), ``None``
    (pretend absent: tests of the degraded paths) or an explicit path. ``hidden_dirs``: more
    directories to hide behind a tmpfs inside the kernel's view (e.g. the package store; the
    kernel's own package root is re-bound read-only).
    """

    def __init__(
        self,
        mode: str = "best_effort",
        config_path: Path | None = None,
        run_dir: Path | None = None,
        *,
        bwrap_path: Any = AUTO,
        unshare_path: Any = AUTO,
        path_env: str | None = None,
        hidden_dirs: tuple[Path | str, ...] | list[Path | str] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.config = policy.load_config(config_path)
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.gettempdir())
        self._bwrap_path = bwrap_path
        self._unshare_path = unshare_path
        self._path_env = path_env
        self._hidden = [os.path.abspath(os.fspath(p)) for p in hidden_dirs]
        # The last uid of the range is the probe's; sessions get the others.
        self._uids = policy.UidPool(self.config.uid_start, max(1, self.config.uid_count - 1))
        self._probe_uid = self.config.uid_start + self.config.uid_count - 1
        self._kernels: dict[str, _Kernel] = {}
        self._lock = threading.Lock()
        self._probe: dict | None = None
        self._plan: plan.Plan | None = None
        self._started = False
        self._missing: list[tuple[str, str]] = []
        self._undumpable = False
        self._cgroup_failed: str | None = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        if self._started:
            return
        if self.mode == "off":
            log.warning(
                "SANDBOX OFF (explicit): session kernels run UNCONFINED as uid %d with the "
                "server's privileges: they can read and write what the server can, reach the "
                "network, signal or trace the server. Never use this with untrusted code.",
                os.geteuid(),
            )
            self._started = True
            return
        opts = {
            "bwrap_path": self._bwrap_path,
            "unshare_path": self._unshare_path,
            "path_env": self._path_env,
            "probe_uid": self._probe_uid,
            "run_dir": str(self.run_dir),
        }
        self._probe = await asyncio.to_thread(probe.probe, opts)
        if self._probe.get("cgroups", {}).get("ok"):
            removed = await asyncio.to_thread(cgroups.sweep_stale, self._probe["cgroups"])
            if removed:
                log.info("sandbox: removed %d stale kernel cgroups of dead servers", len(removed))
        self._plan = plan.decide(self._probe, self.mode)
        self._missing = self._what_is_missing()
        p = self._plan
        separated = p.uid or (not p.root and p.uses_namespaces)
        if self.mode == "strict" and (p.network_isolation is None or not separated):
            lacks = []
            if p.network_isolation is None:
                lacks.append("network isolation (no network namespace, no Landlock TCP rules)")
            if not separated:
                lacks.append("uid or user-namespace separation")
            raise SandboxUnavailable(
                "sandbox mode strict: this host cannot provide "
                + " and ".join(lacks)
                + ". Details: "
                + "; ".join(f"{name}: {meaning}" for name, meaning in self._missing)
            )
        if not p.uses_namespaces:
            # Without a pid namespace a kernel sees the server's pid: make the server
            # undumpable so that same-uid code cannot read its /proc/<pid>/environ or mem.
            self._undumpable = _set_undumpable()
        if self._missing:
            log.warning(
                "sandbox (%s) degraded on this host: %s",
                self.mode,
                "; ".join(f"{name} missing - {meaning}" for name, meaning in self._missing),
            )
        else:
            log.info(
                "sandbox (%s): every layer in force (isolation=%s, probe %.0f ms)",
                self.mode,
                p.isolation,
                self._probe.get("elapsed_ms", 0),
            )
        self._started = True

    def _what_is_missing(self) -> list[tuple[str, str]]:
        assert self._probe is not None and self._plan is not None
        pr, p = self._probe, self._plan
        out: list[tuple[str, str]] = []
        e2e = pr.get("e2e", {})
        if not e2e.get("ok"):
            out.append(
                (
                    "end-to-end trial",
                    f"even the weakest stack failed its trial ({e2e.get('error')}): kernels "
                    "may fail to start",
                )
            )
        if p.isolation == "unshare":
            out.append(
                (
                    "bwrap",
                    f"{pr['bwrap'].get('reason')}; using the unshare fallback (same view, "
                    "mounts done by the launcher)",
                )
            )
        elif p.isolation == "none":
            what = (
                f"Landlock ABI {p.landlock_abi} confines files and TCP only"
                if p.landlock_abi
                else "nothing confines the filesystem beyond file permissions"
            )
            out.append(
                (
                    "namespaces (bwrap and unshare)",
                    f"bwrap: {pr['bwrap'].get('reason')}; unshare: "
                    f"{pr['unshare'].get('reason')}. Kernels see host processes and paths; " + what,
                )
            )
            if not p.landlock_abi:
                out.append(("landlock", pr["landlock"].get("reason") or "unavailable"))
        if p.root and not p.uid:
            out.append(
                (
                    "uid",
                    f"{pr.get('uid', {}).get('reason')}; kernels run as root without "
                    "capabilities (root-owned files stay readable)",
                )
            )
        if not p.root and not p.uses_namespaces:
            out.append(("uid", "kernels run as the server's own uid"))
        if not p.seccomp:
            out.append(
                (
                    "seccomp",
                    f"{pr['seccomp'].get('reason')}; ptrace, mount, bpf, keyctl, ... are "
                    "not filtered",
                )
            )
        cg = pr.get("cgroups", {})
        if not cg.get("limits"):
            out.append(
                (
                    "cgroup limits",
                    "no memory/CPU/pids cap beyond per-process rlimits (a fork bomb is "
                    "bounded only by RLIMIT_NPROC)",
                )
            )
        if not cg.get("ok"):
            out.append(("cgroup kill", "leftover processes are found by uid, not by cgroup"))
        if p.network_isolation is None:
            out.append(("network isolation", "kernels can reach the network"))
        elif p.network_isolation != "namespace":
            out.append(
                (
                    "network namespace",
                    "egress blocked by Landlock (TCP) + seccomp (UDP/raw) instead",
                )
            )
        return out

    # ------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        if self.mode == "off" or self._plan is None or self._probe is None:
            reason = "sandbox mode is off" if self.mode == "off" else "not started"
            names = ("clean_env", "rlimits", "uid", "bwrap", "unshare", "landlock")
            names += ("cgroups", "seccomp", "network_isolation")
            return {
                "mode": self.mode,
                "isolation": None,
                "layers": {n: {"enabled": False, "reason": reason} for n in names},
            }
        pr, p = self._probe, self._plan
        cg = pr.get("cgroups", {})
        kill = (
            "cgroup.kill"
            if cg.get("v2", {}).get("kill")
            else "freezer+SIGKILL"
            if "freezer" in cg.get("v1", {})
            else "SIGKILL by cgroup membership"
            if cg.get("ok")
            else "SIGKILL by uid"
        )
        uid_reason = None
        if not p.uid:
            uid_reason = pr.get("uid", {}).get("reason") or "server is not root"
        layers: dict[str, dict[str, Any]] = {
            "clean_env": {
                "enabled": True,
                "reason": None,
                "detail": "the launcher drops its own variables and the server passes env=",
            },
            "rlimits": {
                "enabled": p.rlimits,
                "reason": None,
                "limits": ["DATA", "NOFILE", "FSIZE", "CORE", "CPU"] + (["NPROC"] * p.uid),
            },
            "uid": {
                "enabled": p.uid,
                "reason": uid_reason,
                "range": [self._uids.start, self._uids.start + self._uids.count],
                "in_use": len(self._uids.in_use()),
                "drop": "inside bwrap/unshare (they run as root to bind root-only paths)"
                if p.uid and p.uses_namespaces
                else "in the launcher"
                if p.uid
                else None,
            },
            "bwrap": {
                "enabled": p.isolation == "bwrap",
                "available": bool(pr["bwrap"].get("ok")),
                "path": pr["bwrap"].get("path"),
                "reason": None if p.isolation == "bwrap" else pr["bwrap"].get("reason"),
            },
            "unshare": {
                "enabled": p.isolation == "unshare",
                "available": bool(pr["unshare"].get("ok")),
                "path": pr["unshare"].get("path"),
                "reason": None
                if p.isolation == "unshare"
                else "bwrap preferred"
                if p.isolation == "bwrap" and pr["unshare"].get("ok")
                else pr["unshare"].get("reason"),
            },
            "landlock": {
                "enabled": bool(p.landlock_abi),
                "abi": pr["landlock"].get("abi"),
                "reason": None
                if p.landlock_abi
                else "namespaces in use (Landlock only without them)"
                if p.uses_namespaces and pr["landlock"].get("ok")
                else pr["landlock"].get("reason"),
            },
            "cgroups": {
                "enabled": bool(cg.get("ok")) and self._cgroup_failed is None,
                "reason": self._cgroup_failed or cg.get("reason"),
                "limits": cg.get("limits", []),
                "v1": sorted(cg.get("v1", {})),
                "v2_kill": bool(cg.get("v2", {}).get("kill")),
                "kill": kill,
            },
            "seccomp": {
                "enabled": p.seccomp,
                "reason": None if p.seccomp else pr["seccomp"].get("reason"),
                "rules": pr["seccomp"].get("rules"),
                "action": "EPERM",
            },
            "network_isolation": {
                "enabled": p.network_isolation is not None,
                "method": p.network_isolation,
                "reason": None if p.network_isolation else "no namespace, no Landlock TCP rules",
                "per_package_exceptions": sorted(
                    k for k, r in self.config.packages.items() if r.network
                ),
            },
            "server_undumpable": {
                "enabled": self._undumpable,
                "reason": None if self._undumpable else "not needed (pid namespace)",
            },
        }
        return {
            "mode": self.mode,
            "isolation": p.isolation,
            "probe_ms": pr.get("elapsed_ms"),
            "verified": {
                "ok": bool(pr.get("e2e", {}).get("ok")),
                "error": pr.get("e2e", {}).get("error"),
                "checked": pr.get("e2e", {}).get("result"),
            },
            "missing": [name for name, _ in self._missing],
            "layers": layers,
        }

    # ------------------------------------------------------------------ kernels

    def prepare_kernel(
        self,
        *,
        kernel_dir: Path,
        work_dir: Path,
        package_root: Path,
        package_name: str,
        package_id: str,
        resource_tier: int | None = None,
    ) -> dict[str, str]:
        kdir = os.path.abspath(os.fspath(kernel_dir))
        wdir = os.path.abspath(os.fspath(work_dir))
        home = os.path.join(kdir, "home")
        tmp = os.path.join(kdir, "tmp")
        for d in (home, tmp, wdir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        env = {
            "HOME": home,
            "TMPDIR": tmp,
            "IPYTHONDIR": os.path.join(home, ".ipython"),
            "MPLCONFIGDIR": os.path.join(home, ".config", "matplotlib"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        }
        pythonpath = plan.needs_pythonpath(self._probe)
        if pythonpath:
            # The launcher must be importable; it removes this entry before the kernel runs.
            env["PYTHONPATH"] = plan.PACKAGE_PARENT
            env[PYTHONPATH_ENV] = plan.PACKAGE_PARENT
        if self.mode == "off":
            return env
        if not self._started or self._plan is None:
            raise RuntimeError("Sandbox.start() must complete before prepare_kernel()")
        p = self._plan
        key = _key(kdir)
        resolved = policy.resolve(
            self.config,
            package_name=package_name,
            package_id=package_id,
            resource_tier=resource_tier,
        )
        data_dirs = []
        for d in resolved.data_dirs:
            if os.path.isdir(d):
                data_dirs.append(d)
            else:
                log.warning("sandbox: data dir %s for package %s does not exist", d, package_name)
        with self._lock:
            old = self._kernels.get(key)
        if old is not None:  # prepared again without a release: start from scratch
            self.release_kernel(Path(kdir))
        uid = self._uids.allocate(key) if p.uid else None
        kc = None
        if self._probe and self._probe.get("cgroups", {}).get("ok"):
            try:
                kc = cgroups.create(
                    key,
                    probed=self._probe["cgroups"],
                    memory_bytes=resolved.memory_bytes,
                    cpus=resolved.cpus,
                    pids=resolved.pids,
                )
            except OSError as exc:
                if self._cgroup_failed is None:
                    log.warning("sandbox: cannot create kernel cgroups (%s); going on without", exc)
                self._cgroup_failed = f"creating kernel cgroups failed: {exc}"
        cpu = resolved.cpu_seconds
        rlimits = {
            "DATA": resolved.data_bytes,
            "NOFILE": resolved.nofile,
            "FSIZE": resolved.fsize,
            "CORE": 0,
            "CPU": [cpu, cpu + 5] if cpu else None,
            # Counts per uid system-wide: only meaningful with a dedicated uid.
            "NPROC": resolved.pids if uid is not None else None,
        }
        masked = list(plan.DEFAULT_MASKED) + [str(self.run_dir)] + self._hidden
        doc = plan.document(
            p,
            kernel_dir=kdir,
            work_dir=wdir,
            uid=uid,
            rlimits=rlimits,
            cgroup_procs=kc.procs if kc else [],
            network=resolved.network,
            package_root=os.path.abspath(os.fspath(package_root)) if package_root else None,
            data_dirs=data_dirs,
            masked=masked,
            pythonpath=pythonpath,
            extra={
                "package": {"name": package_name, "id": package_id},
                "resources": resolved.as_dict(),
            },
        )
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        path = os.path.join(kdir, POLICY_FILE)
        tmp_path = path + f".{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp_path, path)
        with self._lock:
            self._kernels[key] = _Kernel(key, kdir, uid, kc, resolved)
        env[POLICY_ENV] = path
        env[POLICY_SHA_ENV] = hashlib.sha256(data).hexdigest()
        return env

    def release_kernel(self, kernel_dir: Path) -> None:
        key = _key(kernel_dir)
        with self._lock:
            k = self._kernels.pop(key, None)
        if k is None:
            return
        if k.cgroups is not None:
            cgroups.kill_all(k.cgroups)
        if k.uid is not None:
            _kill_uid(k.uid)
        if k.cgroups is not None:
            left = cgroups.destroy(k.cgroups)
            if left:
                log.warning("sandbox: could not remove cgroups %s", left)
        if k.uid is not None:
            self._uids.release(key)

    def close(self) -> None:
        """Release every kernel still prepared (server shutdown)."""
        with self._lock:
            dirs = [k.kernel_dir for k in self._kernels.values()]
        for d in dirs:
            self.release_kernel(Path(d))

    def kernel_info(self, kernel_dir: Path) -> dict[str, Any] | None:
        """What one prepared kernel got (uid, limits), for status pages."""
        with self._lock:
            k = self._kernels.get(_key(kernel_dir))
        if k is None:
            return None
        return {
            "uid": k.uid,
            "cgroups": k.cgroups.dirs if k.cgroups else [],
            **k.resolved.as_dict(),
        }


def _kill_uid(uid: int, timeout: float = 3.0) -> int:
    """SIGKILL every process whose real or effective uid is ``uid``; repeat until none."""
    killed = 0
    deadline = time.monotonic() + timeout
    while True:
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                if fields.get("State", "").split()[:1] in (["Z"], ["X"]):
                    continue  # a zombie: already dead, its parent reaps it
                if str(uid) in fields.get("Uid", "").split()[:2]:
                    found = True
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
            except (OSError, ValueError):
                continue
        if not found or time.monotonic() > deadline:
            return killed
        time.sleep(0.01)


def _set_undumpable() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE
    except OSError:
        return False
