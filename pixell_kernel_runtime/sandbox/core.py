"""The server-side face of the sandbox: probe once, prepare and release each kernel."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cgroups, layout, plan, policy, probe, report
from .launcher import POLICY_ENV, POLICY_SHA_ENV

log = logging.getLogger("pixell_kernel_runtime.sandbox")

MODES = ("strict", "best_effort", "off")
POLICY_FILE = "sandbox.json"
AUTO = probe.AUTO


class SandboxUnavailable(RuntimeError):
    """strict mode and the host cannot give what strict requires."""


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
        subid_files: tuple[str, ...] = policy.SUBID_FILES,
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
        self._subid_files = subid_files
        # What the session manager launches with (set by it): the kernel spec's source.
        self.kernel_spec: dict[str, Any] | None = None
        self._sessions: dict[str, SandboxSession] = {}
        self._quota_ok = False
        self._quota_reason: str | None = "not probed"
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
        await asyncio.to_thread(layout.prepare_run_dir, str(self.run_dir))
        stale = await asyncio.to_thread(layout.sweep, str(self.run_dir))
        if stale:
            log.info(
                "sandbox: detached %d session mounts a dead server left in %s", stale, self.run_dir
            )
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
        p = self._plan
        if p.separated:
            # A range that overlaps subordinate ids would hand another user's container uids
            # to kernels, and the kill-by-uid sweep would kill that user's processes.
            policy.check_uid_range(self.config.uid_start, self.config.uid_count, self._subid_files)
        await asyncio.to_thread(self._probe_quota)
        self._missing = report.what_is_missing(self)
        # Without namespaces only a uid of its own keeps one kernel from another's sockets,
        # connection file and process memory.
        separated = p.uid or (not p.root and p.uses_namespaces)
        bounded = bool(set(self._probe.get("cgroups", {}).get("limits", [])) & {"memory", "pids"})
        bounded = bounded or p.uid
        if self.mode == "strict" and (p.network_isolation is None or not separated or not bounded):
            lacks = []
            if p.network_isolation is None:
                lacks.append("network isolation (no network namespace, no Landlock TCP rules)")
            if not separated:
                lacks.append("a uid of its own for each kernel")
            if not bounded:
                lacks.append("a bound on pids or memory (no cgroup limits, no dedicated uid)")
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

    def report(self) -> dict[str, Any]:
        return report.report(self)

    def _probe_quota(self) -> None:
        """Can we give each session a tmpfs of its own (size and inode limits)?"""
        trial = os.path.join(str(self.run_dir), "w", "quota-probe-" + secrets.token_hex(3))
        owners = layout.Owners(kernel_uid=None, gid=None)
        try:
            dirs = layout.create(
                str(self.run_dir),
                os.path.basename(trial),
                owners,
                disk_bytes=1 << 20,
                inodes=64,
                quota=True,
            )
        except OSError as exc:
            self._quota_ok, self._quota_reason = False, f"cannot mount a tmpfs: {exc.strerror}"
            return
        self._quota_ok, self._quota_reason = dirs.quota, None
        layout.remove(dirs)

    # ------------------------------------------------------------------ sessions

    def open_session(
        self,
        *,
        package_root: Path | str | None,
        package_name: str,
        package_id: str,
        resource_tier: int | None = None,
    ) -> SandboxSession:
        """A session's ids and directories (blocking file work: call from a thread)."""
        # The session's dir names and its key in the uid pool.
        key = secrets.token_hex(4)
        resolved = policy.resolve(
            self.config,
            package_name=package_name,
            package_id=package_id,
            resource_tier=resource_tier,
        )
        pool_id: int | None = None
        owners = layout.Owners(kernel_uid=None, gid=None)
        if self.mode != "off" and self._plan is not None and self._plan.separated:
            pool_id = self._uids.allocate(key)
            if self._plan.uid:
                owners = layout.Owners(kernel_uid=pool_id, gid=pool_id, guard_uid=0)
            else:
                owners = layout.Owners(kernel_uid=0, gid=pool_id, guard_uid=pool_id)
        try:
            dirs = layout.create(
                str(self.run_dir),
                key,
                owners,
                disk_bytes=resolved.disk_bytes,
                inodes=resolved.inodes,
                quota=self._quota_ok,
            )
            if self.mode == "off":
                for d in (dirs.home, dirs.tmp, dirs.work):
                    os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            if pool_id is not None:
                self._uids.release(key)
            raise
        root = os.path.abspath(os.fspath(package_root)) if package_root else None
        session = SandboxSession(
            key, dirs, owners, pool_id, resolved, root, package_name, package_id
        )
        with self._lock:
            self._sessions[key] = session
        return session

    def close_session(self, session: SandboxSession) -> None:
        """Kill whatever is left of the session, give its ids back, remove its trees."""
        self.end_launch(session)  # the last launch's sweep, if its cleanup did not run
        layout.remove(session.dirs)
        with self._lock:
            self._sessions.pop(session.key, None)
        if session.pool_id is not None:
            self._uids.release(session.key)

    def prepare_launch(
        self, session: SandboxSession, kernel_env: dict[str, str]
    ) -> tuple[list[str], dict[str, str], str]:
        """Cgroups and the pinned policy for one kernel start (blocking: call from a thread).

        Returns the launcher argv to put in front of the kernel's, the launcher's whole
        environment and its working directory."""
        if self.mode == "off":
            return [], dict(kernel_env), session.dirs.work
        if not self._started or self._plan is None:
            raise RuntimeError("Sandbox.start() must complete before a kernel is launched")
        self.end_launch(session)  # a launch without its cleanup: start from scratch
        session.launched = True
        p, resolved = self._plan, session.resolved
        data_dirs = []
        for d in resolved.data_dirs:
            if os.path.isdir(d):
                data_dirs.append(d)
            else:
                log.warning(
                    "sandbox: data dir %s for package %s does not exist", d, session.package_name
                )
        if self._probe and self._probe.get("cgroups", {}).get("ok"):
            try:
                session.cgroups = cgroups.create(
                    session.key + "-" + secrets.token_hex(2),
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
        owners = session.owners
        rlimits = {
            "DATA": resolved.data_bytes,
            "NOFILE": resolved.nofile,
            "FSIZE": resolved.fsize,
            "CORE": 0,
            "CPU": [cpu, cpu + 5] if cpu else None,
            # Counts per uid system-wide: only meaningful with a dedicated uid.
            "NPROC": resolved.pids if owners.kernel_uid else None,
        }
        doc = plan.document(
            p,
            dirs=session.dirs,
            uid=owners.kernel_uid,
            gid=owners.gid,
            rlimits=rlimits,
            cgroup_procs=session.cgroups.procs if session.cgroups else [],
            network=resolved.network,
            package_root=session.package_root,
            data_dirs=data_dirs,
            masked=list(plan.DEFAULT_MASKED),
            guarded=[str(self.run_dir), *self._hidden],
            kernel_env=kernel_env,
            shm_bytes=resolved.shm_bytes,
            extra={
                "package": {"name": session.package_name, "id": session.package_id},
                "resources": resolved.as_dict(),
            },
        )
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        _write_private(session.dirs.policy_file, data)
        env = {
            "PATH": plan.LAUNCHER_PATH_ENV,
            "LANG": "C.UTF-8",
            POLICY_ENV: session.dirs.policy_file,
            POLICY_SHA_ENV: hashlib.sha256(data).hexdigest(),
        }
        return plan.launcher_argv() + ["--"], env, "/"

    def end_launch(self, session: SandboxSession) -> None:
        """After a kernel process ended (restart or shutdown): nothing it started survives."""
        if not session.launched:
            return  # nothing ran yet: no /proc sweep on the way to the first start
        session.launched = False
        kc, session.cgroups = session.cgroups, None
        if kc is not None:
            cgroups.kill_all(kc)
        if session.owners.separated and self.mode != "off":
            _kill_ids(session.owners)
        if kc is not None:
            left = cgroups.destroy(kc)
            if left:
                log.warning("sandbox: could not remove cgroups %s", left)

    def kill(self, session: SandboxSession) -> bool:
        """SIGKILL the kernel's whole tree at once through its cgroup, if it has one."""
        if session.cgroups is None:
            return False
        cgroups.kill_all(session.cgroups, timeout=0.5)
        return True

    def close(self) -> None:
        """Release every session still open (server shutdown)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self.close_session(session)

    def kernel_info(self, session: SandboxSession) -> dict[str, Any]:
        """What one session's kernel got (ids, limits), for status pages."""
        return {
            "uid": session.owners.kernel_uid,
            "gid": session.owners.gid,
            "disk_quota": session.dirs.quota,
            "cgroups": session.cgroups.dirs if session.cgroups else [],
            **session.resolved.as_dict(),
        }


@dataclass
class SandboxSession:
    key: str
    dirs: layout.SessionDirs
    owners: layout.Owners
    pool_id: int | None
    resolved: policy.Resolved
    package_root: str | None
    package_name: str
    package_id: str
    cgroups: cgroups.KernelCgroups | None = None
    launched: bool = False  # prepared for a launch since the last end_launch


def _write_private(path: str, data: bytes) -> None:
    """Write a root-only file in a server dir, atomically, never through a link."""
    tmp_path = path + f".{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_path)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp_path, path)


def _kill_ids(owners: layout.Owners, timeout: float = 3.0) -> int:
    """SIGKILL every process running with the session's own uid (or, gid-only, its gid)."""
    if owners.kernel_uid:
        return _kill_matching("Uid", owners.kernel_uid, timeout)
    if owners.gid is not None:
        return _kill_matching("Gid", owners.gid, timeout)
    return 0


def _kill_matching(field_name: str, ident: int, timeout: float = 3.0) -> int:
    """SIGKILL every process whose real or effective uid/gid is ``ident``; repeat until none."""
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
                if str(ident) in fields.get(field_name, "").split()[:2]:
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
