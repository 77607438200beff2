"""The sandbox launcher: sits in front of ipykernel (STDLIB ONLY).

    python -I /abs/path/launcher.py [--stage outer|inner] -- <kernel argv...>

The provisioner starts it with cwd ``/`` and a fixed environment of four variables (PATH, LANG,
the policy's path and its SHA-256). ``-I`` keeps every ``PYTHON*`` variable, the user site and the
script's and working directory out of the privileged interpreter: nothing a package or a kernel
can write is imported, opened or executed while the process is privileged. The kernel's own
environment (package ``PYTHONPATH``, manifest variables, ``.env``) travels inside the pinned
policy and is applied only at the very last step, after the ids drop and every layer.

Without ``PIXELL_SANDBOX_POLICY`` it only runs the argv (replacing a leading ``python`` with this
interpreter): the ``off`` mode. "Runs": ``python -m <module> ...`` runs in this very interpreter
through runpy, as ``-m`` would with the kernel's environment (it saves a whole interpreter
start-up, ~100 ms); anything else is exec'd.

outer stage (normally as root, host namespaces)
    reads ``sandbox.json`` (root-owned, outside the kernel's tree, checked against its digest),
    joins the kernel's cgroups, sets rlimits, then execs bwrap / unshare whose command is this
    launcher again with ``--stage inner``; with no namespace tool it goes straight on.
inner stage (inside the namespaces)
    for ``unshare`` builds the mount view; clears the capability bounding set and drops to the
    session's ids (uid, or gid alone with every capability dropped); creates home/tmp/work in
    the kernel's tree as the kernel; sets no_new_privs; applies Landlock (only without
    namespaces); installs the seccomp allow-list; replaces the environment with the kernel's;
    then runs the kernel argv.

Every failure is fatal (exit 70 with one line on stderr): a kernel never starts less confined
than its policy says.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import sys

if __package__:
    from . import confine, seccomp
else:  # run by path under -I: the launcher's own (root-owned) directory, nothing else
    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import confine  # type: ignore[no-redef]
    import seccomp  # type: ignore[no-redef]

POLICY_ENV = "PIXELL_SANDBOX_POLICY"
POLICY_SHA_ENV = "PIXELL_SANDBOX_POLICY_SHA256"
INNER_ENV = "PIXELL_SANDBOX_INNER"
POLICY_VERSION = 2
EXIT_SANDBOX_FAILURE = 70

_RLIMITS = {
    "DATA": "RLIMIT_DATA",
    "AS": "RLIMIT_AS",
    "NOFILE": "RLIMIT_NOFILE",
    "FSIZE": "RLIMIT_FSIZE",
    "CORE": "RLIMIT_CORE",
    "CPU": "RLIMIT_CPU",
    "NPROC": "RLIMIT_NPROC",
}


class LaunchError(Exception):
    pass


def _fail(msg: str) -> None:
    sys.stderr.write(f"pixell sandbox launcher: {msg}\n")
    sys.stderr.flush()
    os._exit(EXIT_SANDBOX_FAILURE)


def _parse(argv: list[str]) -> tuple[str, list[str]]:
    stage = "outer"
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
            i += 2
        elif argv[i].startswith("--stage="):
            stage = argv[i].split("=", 1)[1]
            i += 1
        else:
            raise LaunchError(f"unknown argument {argv[i]!r}")
    rest = argv[i + 1 :] if i < len(argv) else []
    if stage not in ("outer", "inner"):
        raise LaunchError(f"unknown stage {stage!r}")
    if not rest:
        raise LaunchError("no kernel command after --")
    return stage, rest


def _resolve_argv(argv: list[str]) -> list[str]:
    argv = list(argv)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _load_policy(path: str, expected_sha: str | None) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LaunchError(f"policy {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise LaunchError(f"policy {path} is not owned by us or is group/world writable")
        data = fh.read(4 << 20)
    if expected_sha is None or hashlib.sha256(data).hexdigest() != expected_sha:
        raise LaunchError(f"policy {path} does not match its digest (tampered?)")
    policy = json.loads(data)
    if policy.get("version") != POLICY_VERSION:
        raise LaunchError("unsupported policy version")
    return policy


# --------------------------------------------------------------------------- outer stage


def _join_cgroups(procs_files: list[str]) -> None:
    pid = str(os.getpid()).encode()
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def _set_rlimits(limits: dict) -> None:
    import resource

    for key, value in limits.items():
        if value is None or key not in _RLIMITS:
            continue
        res = getattr(resource, _RLIMITS[key])
        if isinstance(value, list | tuple):
            soft, hard = int(value[0]), int(value[1])
        else:
            soft = hard = int(value)
        cur_soft, cur_hard = resource.getrlimit(res)
        if os.geteuid() != 0 and cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(res, (soft, hard))


def _bwrap_cmd(policy: dict, inner_cmd: list[str]) -> list[str]:
    root = os.geteuid() == 0
    cmd = [policy["bwrap"]]
    if root:
        # No user namespace: it would map only uid 0 and the inner stage could not setuid.
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if not policy.get("network"):
            cmd.append("--unshare-net")
        # SETPCAP only so that the inner stage can empty the bounding set before the drop.
        cmd += ["--cap-drop", "ALL"]
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
            cmd += ["--cap-add", cap]
    else:
        cmd += ["--unshare-all", "--unshare-user", "--disable-userns"]
        if policy.get("network"):
            cmd.append("--share-net")
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    cmd += ["--dev", "/dev", "--perms", "1777"]
    if policy.get("shm_bytes"):
        cmd += ["--size", str(int(policy["shm_bytes"]))]
    cmd += ["--tmpfs", "/dev/shm", "--proc", "/proc"]
    masked = policy.get("masked", [])
    for path in masked:
        cmd += ["--tmpfs", path]
    binds = [(p, "--ro-bind") for p in policy.get("ro_binds", []) + policy.get("ro_files", [])]
    binds += [(p, "--bind") for p in policy.get("rw_binds", [])]
    for path, flag in sorted(binds, key=lambda b: b[0].count("/")):
        parent = os.path.dirname(path)
        if any(parent.startswith(m.rstrip("/") + "/") for m in masked):
            # bwrap makes the missing parents of a bind 0700: a dropped uid could not pass.
            cmd += ["--perms", "0755", "--dir", parent]
        cmd += [flag, path, path]
    # Not --chdir WORK_DIR: the work dir is created by the kernel itself, after the drop.
    cmd += ["--chdir", "/", "--setenv", "JPY_PARENT_PID", "1"]
    return cmd + ["--"] + inner_cmd


def _unshare_cmd(policy: dict, inner_cmd: list[str]) -> list[str]:
    cmd = [policy["unshare"]]
    if os.geteuid() != 0:
        cmd += ["--user", "--map-root-user"]
    cmd += ["--mount", "--ipc", "--uts", "--cgroup", "--pid", "--fork", "--kill-child"]
    cmd += ["--mount-proc", "--propagation", "private"]
    if not policy.get("network"):
        cmd.append("--net")
    return cmd + ["--"] + inner_cmd


_INNER_KEYS = (
    "isolation",
    "uid",
    "gid",
    "work_dir",
    "make_dirs",
    "masked",
    "ro_binds",
    "ro_files",
    "rw_binds",
    "shm_bytes",
    "seccomp",
    "deny_inet_dgram",
    "deny_fastopen",
    "landlock",
    "network",
    "kernel_env",
)


def outer(policy: dict, argv: list[str]) -> list[str]:
    """Apply the outer layers; exec the namespace tool, or return the argv to run (no tool)."""
    if policy.get("cgroup_procs"):
        _join_cgroups(policy["cgroup_procs"])
    _set_rlimits(policy.get("rlimits", {}))
    isolation = policy.get("isolation", "none")
    inner_policy = {k: policy.get(k) for k in _INNER_KEYS}
    if isolation == "none":
        return inner(inner_policy, argv)
    # The same fixed minimum the provisioner gave us, plus the inner stage's policy.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env[INNER_ENV] = json.dumps(inner_policy, separators=(",", ":"))
    inner_cmd = [sys.executable, "-I", os.path.realpath(__file__), "--stage", "inner", "--"]
    inner_cmd += argv
    if isolation == "bwrap":
        cmd = _bwrap_cmd(policy, inner_cmd)
    elif isolation == "unshare":
        cmd = _unshare_cmd(policy, inner_cmd)
        # bwrap's --die-with-parent, for unshare: when the server dies unshare dies, and
        # --kill-child takes the namespace down with it.
        confine.set_pdeathsig(signal.SIGKILL)
    else:
        raise LaunchError(f"unknown isolation {isolation!r}")
    os.execve(cmd[0], cmd, env)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- inner stage


def _drop_ids(uid: int | None, gid: int | None) -> None:
    """To the session's ids, with an empty capability bounding set. ``uid`` 0 with a ``gid``:
    the interpreter is unreachable for other uids, so the kernel keeps uid 0, but without any
    capability that is only an owner like any other, and the gid keeps kernels apart."""
    if gid is None:
        if os.geteuid() == 0 or confine.capabilities().get("CapEff"):
            confine.drop_capabilities()
        return
    confine.drop_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    if uid:
        os.setresuid(uid, uid, uid)  # clears the permitted and effective sets too
        if os.getuid() != uid or os.geteuid() != uid:
            raise LaunchError("setuid did not take")
    confine.drop_capabilities()
    caps = confine.capabilities()
    if any(caps.get(k) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")):
        raise LaunchError(f"capabilities left after the drop: {caps}")


def _reaper(child: int) -> None:
    """PID 1 of an ``unshare`` pid namespace: forward signals, reap orphans, mirror the exit."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def inner(policy: dict, argv: list[str]) -> list[str]:
    """Apply the innermost layers to this process; return the kernel argv to run."""
    isolation = policy.get("isolation", "none")
    if isolation == "unshare":
        confine.build_mount_view(
            masked=policy.get("masked") or [],
            ro_binds=(policy.get("ro_binds") or []) + (policy.get("ro_files") or []),
            rw_binds=policy.get("rw_binds") or [],
            shm_bytes=policy.get("shm_bytes"),
        )
    _drop_ids(policy.get("uid"), policy.get("gid"))
    os.umask(0o077)
    for d in policy.get("make_dirs") or []:
        os.makedirs(d, mode=0o700, exist_ok=True)
    if policy.get("work_dir"):
        os.chdir(policy["work_dir"])
    seccomp.set_no_new_privs()
    landlock = policy.get("landlock")
    if landlock:
        confine.landlock_restrict(
            read_only=landlock.get("read_only", []),
            read_write=landlock.get("read_write", []),
            devices=landlock.get("devices", []),
            deny_tcp=not policy.get("network"),
        )
    if policy.get("seccomp"):
        seccomp.install(
            deny_inet_dgram=bool(policy.get("deny_inet_dgram")),
            deny_fastopen=bool(policy.get("deny_fastopen")),
        )
    if isolation == "unshare" and os.getpid() == 1:
        child = os.fork()
        if child:
            _reaper(child)
    _apply_kernel_env(policy.get("kernel_env"))
    return argv


def _apply_kernel_env(kernel_env: dict | None) -> None:
    """The last step: the kernel's own environment replaces the launcher's fixed one."""
    jpy_parent = os.environ.get("JPY_PARENT_PID")
    os.environ.clear()
    os.environ.update(kernel_env or {})
    if jpy_parent is not None:
        # bwrap's --setenv: ipykernel must not watch a parent it cannot see.
        os.environ["JPY_PARENT_PID"] = jpy_parent


def run_kernel(argv: list[str]) -> None:
    argv = _resolve_argv(argv)
    # ``python -m module args`` runs here (the interpreter is already up: saves ~100 ms), with
    # the sys.path that ``python -m`` would build from the kernel's environment.
    if (
        len(argv) >= 3
        and argv[1] == "-m"
        and os.path.realpath(argv[0]) == os.path.realpath(sys.executable)
        and not argv[2].startswith("-")
    ):
        import runpy

        module = argv[2]
        sys.argv = [argv[0]] + argv[3:]
        here = os.path.dirname(os.path.realpath(__file__))
        base = [p for p in sys.path if p and p != here]
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *base]
        for name in [n for n in sys.modules if n.startswith("pixell_kernel_runtime")]:
            sys.modules.pop(name, None)
        for name in ("confine", "seccomp", "seccomp_tables", "launcher"):
            sys.modules.pop(name, None)
        sys.stdout.flush()
        runpy._run_module_as_main(module, alter_argv=True)  # type: ignore[attr-defined]
        return
    os.execve(argv[0], argv, dict(os.environ))


def confine_self(argv: list[str]) -> list[str]:
    """Parse the launcher argv, apply the policy's layers, return the kernel argv to run."""
    stage, cmd = _parse(argv)
    if stage == "inner":
        raw = os.environ.get(INNER_ENV)
        if raw is None:
            raise LaunchError("inner stage without its policy")
        return inner(json.loads(raw), cmd)
    path = os.environ.get(POLICY_ENV)
    if not path:
        for key in (POLICY_SHA_ENV, INNER_ENV):
            os.environ.pop(key, None)
        return cmd
    policy = _load_policy(path, os.environ.get(POLICY_SHA_ENV))
    return outer(policy, cmd)


def main(argv: list[str] | None = None) -> None:
    try:
        cmd = confine_self(list(sys.argv[1:] if argv is None else argv))
    except BaseException as exc:  # noqa: BLE001 - anything here must stop the kernel
        _fail(f"{type(exc).__name__}: {exc}")
        return
    # Outside the try: the kernel's own exceptions and exit codes are its own.
    run_kernel(cmd)


if __name__ == "__main__":
    main()
