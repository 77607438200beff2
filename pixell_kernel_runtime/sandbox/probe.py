"""Start-up probe: which sandbox layers work on this host (run once, a few hundred ms, cached).

Phase 1 runs the cheap trials side by side, each in a throw-away child process:
* can an unprivileged uid exec the interpreter without any bind tricks (only matters as root);
* ``bwrap`` present and a trial with every namespace unshared (network included) succeeds;
* ``unshare`` present and a trial with mount/pid/net namespaces succeeds;
* the seccomp filter installs (and denies ``ptrace``) and the Landlock ABI;
and, in this process, the cgroup controllers this process can create and limit.

Phase 2 runs the chosen stack end to end (launcher -> bwrap/unshare -> inner stage -> a tiny
Python check: uid, seccomp mode, loopback TCP unreachable, /etc read-only). If that fails, the
isolation tool is marked broken with the reason and the next one is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import cgroups, confine, layout, plan

AUTO: Any = object()  # "look it up on PATH"
_CACHE: dict[tuple, dict] = {}
_LOCK = threading.Lock()

_SECCOMP_CHECK = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
import seccomp
n = seccomp.install()
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.ptrace(0, 0, 0, 0)
err = ctypes.get_errno()
# An allow-list refuses what it does not list: a number no kernel has yet.
unlisted = libc.syscall(999) == -1 and ctypes.get_errno() == 1
print(json.dumps({"rules": n, "mode": seccomp.current_mode(), "ptrace_rc": rc,
                  "errno": err, "unlisted_refused": unlisted}))
"""

_E2E_CHECK = r"""
import json, os, socket, sys
r = {"uid": os.getuid(), "euid": os.geteuid()}
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith(("Seccomp:", "CapEff:", "NoNewPrivs:")):
            k, v = line.split(":", 1); r[k] = v.strip()
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
    r["net"] = "reachable"
except OSError as e:
    r["net"] = type(e).__name__
try:
    open("/etc/.pixell-sandbox-probe", "w").close(); os.unlink("/etc/.pixell-sandbox-probe")
    r["etc_writable"] = True
except OSError:
    r["etc_writable"] = False
r["kernel_dir_writable"] = os.access(os.getcwd(), os.W_OK)
print("PROBE-RESULT " + json.dumps(r))
"""


def _opt(settings_like: Any, name: str, default: Any = None) -> Any:
    if settings_like is None:
        return default
    if isinstance(settings_like, dict):
        return settings_like.get(name, default)
    return getattr(settings_like, name, default)


def _which(name: str, override: Any, path_env: str | None) -> str | None:
    if override is None:
        return None
    if override is not AUTO:
        return str(override) if os.access(str(override), os.X_OK) else None
    return shutil.which(name, path=path_env if path_env is not None else os.environ.get("PATH"))


def _spawn(cmd: list[str], *, uid: int | None = None, **kw: Any) -> subprocess.Popen:
    extra: dict[str, Any] = {}
    if uid is not None:
        extra = {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        **extra,
        **kw,
    )


def _finish(proc: subprocess.Popen | None, timeout: float = 10.0) -> tuple[int, str, str]:
    if proc is None:
        return -1, "", ""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out.decode(errors="replace"), "timed out"
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace").strip()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text[-300:] if len(text) > 300 else text


def probe(settings_like: Any = None) -> dict:
    """Probe the host once per distinct set of options; returns a JSON-able dict.

    ``settings_like`` (object or dict, all optional): ``bwrap_path`` / ``unshare_path``
    (``AUTO`` = look up on ``path_env``/PATH, ``None`` = pretend absent, or a path),
    ``path_env``, ``probe_uid`` (the uid used for the trials, as root), ``run_dir`` (where the
    end-to-end trial makes its scratch dir), ``mode``.
    """
    bwrap_opt = _opt(settings_like, "bwrap_path", AUTO)
    unshare_opt = _opt(settings_like, "unshare_path", AUTO)
    path_env = _opt(settings_like, "path_env")
    probe_uid = _opt(settings_like, "probe_uid", 265535)
    run_dir = _opt(settings_like, "run_dir")
    key = (
        "bwrap" if bwrap_opt is AUTO else repr(bwrap_opt),
        "unshare" if unshare_opt is AUTO else repr(unshare_opt),
        path_env,
        probe_uid,
        sys.executable,
    )
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        result = _probe(bwrap_opt, unshare_opt, path_env, probe_uid, run_dir)
        _CACHE[key] = result
        return result


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _probe(bwrap_opt, unshare_opt, path_env, probe_uid, run_dir) -> dict:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    res: dict[str, Any] = {
        "root": root,
        "euid": os.geteuid(),
        "python": sys.executable,
        "arch": os.uname().machine,
        "rlimits": {"ok": True, "reason": None},
    }
    bwrap = _which("bwrap", bwrap_opt, path_env)
    unshare = _which("unshare", unshare_opt, path_env)
    procs: dict[str, subprocess.Popen | None] = {}

    # Phase 1 -- all children at once.
    try:
        if root:
            procs["uid"] = _spawn([sys.executable, "-S", "-c", ""], uid=probe_uid)
    except OSError as exc:
        res["uid"] = {
            "exec_ok": False,
            "probe_uid": probe_uid,
            "reason": f"uid {probe_uid} cannot exec the interpreter on its own ({exc}): it "
            "sits under a directory the uid cannot search; bwrap/unshare re-bind it",
        }
    if bwrap:
        cmd = [bwrap]
        if root:
            cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-net"]
            cmd += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        else:
            cmd += ["--unshare-all", "--unshare-user", "--disable-userns"]
        cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev"]
        cmd += ["--perms", "1777", "--tmpfs", "/dev/shm", "--proc", "/proc"]
        cmd += ["--tmpfs", "/tmp", "--", "/bin/sh", "-c", "exit 0"]
        try:
            procs["bwrap"] = _spawn(cmd)
        except OSError as exc:
            res["bwrap"] = {"ok": False, "path": bwrap, "reason": str(exc)}
    if unshare:
        cmd = [unshare] + ([] if root else ["--user", "--map-root-user"])
        cmd += ["--mount", "--ipc", "--uts", "--pid", "--fork", "--kill-child", "--net"]
        cmd += ["--mount-proc", "--propagation", "private", "/bin/sh", "-c", "exit 0"]
        try:
            procs["unshare"] = _spawn(cmd)
        except OSError as exc:
            res["unshare"] = {"ok": False, "path": unshare, "reason": str(exc)}
    try:
        procs["seccomp"] = _spawn(
            [sys.executable, "-S", "-c", _SECCOMP_CHECK, str(Path(__file__).parent)]
        )
    except OSError as exc:
        res["seccomp"] = {"ok": False, "reason": str(exc)}

    abi = 0
    try:
        abi = confine.landlock_abi()
    except Exception:  # noqa: BLE001
        abi = 0
    res["landlock"] = {
        "ok": abi >= 1,
        "abi": abi,
        "reason": None if abi >= 1 else "Landlock not supported or disabled by the kernel",
    }
    try:
        cg = cgroups.probe()
    except Exception as exc:  # noqa: BLE001
        cg = {"v1": {}, "v2": {"kill": False, "controllers": []}, "errors": {"probe": str(exc)}}
    limits = set(cg["v1"]) & {"memory", "cpu", "pids"} | set(cg["v2"].get("controllers", []))
    cg["ok"] = bool(limits) or bool(cg["v2"].get("kill"))
    cg["limits"] = sorted(limits)
    cg["kill"] = bool(cg["v2"].get("kill")) or "freezer" in cg["v1"] or bool(cg["v1"])
    cg["reason"] = None if cg["ok"] else "no writable cgroup controller for this process"
    res["cgroups"] = cg

    if procs.get("uid") is not None:
        rc, _out, err = _finish(procs["uid"])
        res["uid"] = {
            "exec_ok": rc == 0,
            "probe_uid": probe_uid,
            "reason": None
            if rc == 0
            else f"uid {probe_uid} cannot exec {sys.executable} on its own"
            f" ({_short(err) or 'exit ' + str(rc)}): the interpreter sits under a directory "
            "it cannot search; bwrap/unshare re-bind it",
        }
    elif not root:
        res["uid"] = {"exec_ok": False, "reason": "the server does not run as root"}
    res.setdefault("uid", {"exec_ok": False, "reason": "not probed"})
    if "bwrap" in procs:
        rc, _out, err = _finish(procs["bwrap"])
        res["bwrap"] = {
            "ok": rc == 0,
            "path": bwrap,
            "reason": None if rc == 0 else f"trial failed: {_short(err) or 'exit ' + str(rc)}",
        }
    elif "bwrap" not in res:
        res["bwrap"] = {"ok": False, "path": None, "reason": "bwrap not found"}
    if "unshare" in procs:
        rc, _out, err = _finish(procs["unshare"])
        res["unshare"] = {
            "ok": rc == 0,
            "path": unshare,
            "reason": None if rc == 0 else f"trial failed: {_short(err) or 'exit ' + str(rc)}",
        }
    elif "unshare" not in res:
        res["unshare"] = {"ok": False, "path": None, "reason": "unshare not found"}
    if "seccomp" in procs:
        rc, out, err = _finish(procs["seccomp"])
        ok = False
        detail: dict[str, Any] = {}
        try:
            detail = json.loads(out.strip().splitlines()[-1])
            ok = rc == 0 and detail.get("mode") == 2 and detail.get("ptrace_rc") == -1
            ok = ok and bool(detail.get("unlisted_refused"))
        except (ValueError, IndexError):
            pass
        res["seccomp"] = {
            "ok": ok,
            "rules": detail.get("rules"),
            "reason": None if ok else f"filter did not install: {_short(err) or out}",
        }

    # Phase 2 -- the chosen stack end to end; degrade on failure.
    exclude: list[str] = []
    for _ in range(5):
        p = plan.decide(res, "best_effort", exclude=tuple(exclude))
        ok, detail = _end_to_end(p, probe_uid, run_dir, res)
        res["e2e"] = {"ok": ok, "isolation": p.isolation, "uid": p.uid, **detail}
        if ok:
            break
        why = f"end-to-end trial failed: {detail.get('error')}"
        if p.isolation != "none":
            res[p.isolation]["ok"] = False
            res[p.isolation]["reason"] = why
            exclude.append(p.isolation)
        elif p.uid:
            # e.g. the kernel dir's parents are not searchable by an unprivileged uid
            res["uid"]["exec_ok"] = False
            res["uid"]["reason"] = why
        elif p.seccomp:
            res["seccomp"]["ok"] = False
            res["seccomp"]["reason"] = why
        else:
            break
    res["elapsed_ms"] = round((time.monotonic() - t0) * 1000, 1)
    return res


def _end_to_end(p: plan.Plan, probe_uid: int, run_dir: Any, res: dict) -> tuple[bool, dict]:
    """Launch the trial exactly as a kernel starts: the same layout, policy and launcher."""
    base = str(run_dir) if run_dir else tempfile.mkdtemp(prefix="pkr-probe-")
    layout.prepare_run_dir(base)
    if p.uid:
        owners = layout.Owners(kernel_uid=probe_uid, gid=probe_uid)
    elif p.gid_only:
        owners = layout.Owners(kernel_uid=0, gid=probe_uid, guard_uid=probe_uid)
    else:
        owners = layout.Owners(kernel_uid=None, gid=None)
    dirs = None
    listener = socket.socket()
    try:
        dirs = layout.create(
            base, "probe" + os.urandom(3).hex(), owners, disk_bytes=None, inodes=None, quota=False
        )
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        # The connection file's place must exist (it is bound into the kernel's view).
        with open(dirs.connection_file, "w") as fh:
            fh.write("{}")
        layout.secure_connection_file(dirs.connection_file, owners)
        doc = plan.document(
            p,
            dirs=dirs,
            uid=owners.kernel_uid,
            gid=owners.gid,
            rlimits={"CORE": 0},
            cgroup_procs=[],
            network=False,
            package_root=None,
            data_dirs=[],
            masked=list(plan.DEFAULT_MASKED),
            guarded=[base],
            kernel_env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            shm_bytes=16 << 20,
        )
        data = json.dumps(doc).encode()
        fd = os.open(dirs.policy_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        env = {
            "PATH": plan.LAUNCHER_PATH_ENV,
            "LANG": "C.UTF-8",
            "PIXELL_SANDBOX_POLICY": dirs.policy_file,
            "PIXELL_SANDBOX_POLICY_SHA256": hashlib.sha256(data).hexdigest(),
        }
        cmd = plan.launcher_argv() + ["--", "python", "-S", "-c", _E2E_CHECK, str(port)]
        proc = subprocess.run(
            cmd, cwd="/", env=env, capture_output=True, timeout=20, stdin=subprocess.DEVNULL
        )
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        line = next((x for x in out.splitlines() if x.startswith("PROBE-RESULT ")), None)
        if proc.returncode != 0 or line is None:
            return False, {"error": _short(err) or f"exit {proc.returncode}"}
        r = json.loads(line.split(" ", 1)[1])
        problems = []
        if owners.kernel_uid is not None and r.get("uid") != owners.kernel_uid:
            problems.append(f"runs as uid {r.get('uid')}, expected {owners.kernel_uid}")
        if p.seccomp and r.get("Seccomp") != "2":
            problems.append("seccomp filter not active")
        if p.network_isolation and r.get("net") == "reachable":
            problems.append("loopback TCP still reachable")
        if r.get("etc_writable"):
            problems.append("/etc writable")
        if not r.get("kernel_dir_writable"):
            problems.append("kernel dir not writable")
        return not problems, {"result": r, "error": "; ".join(problems) or None}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return False, {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        listener.close()
        if dirs is not None:
            layout.remove(dirs)
        if not run_dir:
            shutil.rmtree(base, ignore_errors=True)
