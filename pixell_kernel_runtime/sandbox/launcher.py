"""The sandbox launcher: sits in front of ipykernel in the kernel spec (STDLIB ONLY).

    python -m pixell_kernel_runtime.sandbox.launcher [--stage outer|inner] -- <kernel argv...>

Without ``PIXELL_SANDBOX_POLICY`` in the environment it only replaces a leading ``python`` with
``sys.executable`` and runs the argv (the ``off`` mode, and anything run outside the runtime).
"Runs": ``python -m <module> ...`` runs in this very interpreter through runpy, exactly as ``-m``
would (it saves a whole interpreter start-up, ~100 ms here); anything else, or any argv when
``PIXELL_SANDBOX_EXEC=1``, is exec'd.

With it (the path of the ``sandbox.json`` written by ``Sandbox.prepare_kernel``, checked against
``PIXELL_SANDBOX_POLICY_SHA256`` so that a kernel cannot rewrite the policy of its own restart):

outer stage (normally as root, started by jupyter_client)
    joins the kernel's cgroups, chowns the kernel dir to the session uid, sets rlimits, then
    execs bwrap / unshare whose command is this launcher again with ``--stage inner``; with no
    namespace tool it goes straight on to the inner steps in the same process.
inner stage (inside the namespaces)
    for ``unshare`` builds the mount view; drops to the session uid (bwrap and unshare run as
    root so that they can bind paths that only root can reach, e.g. a pyenv under a 0700
    /root) or drops every capability; sets no_new_privs; applies Landlock (only without
    namespaces); installs the seccomp deny-list; cleans the environment; then runs the kernel
    argv as above.

Every failure is fatal (exit 70 with one line on stderr): a kernel never starts less confined
than its policy says.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

if __package__:
    from . import confine, seccomp
else:  # run by path
    import confine  # type: ignore[no-redef]
    import seccomp  # type: ignore[no-redef]

POLICY_ENV = "PIXELL_SANDBOX_POLICY"
# The PYTHONPATH entry the runtime added only so that this launcher imports; removed before
# the kernel runs (in every mode, off included).
PYTHONPATH_ENV = "PIXELL_SANDBOX_PYTHONPATH"
POLICY_SHA_ENV = "PIXELL_SANDBOX_POLICY_SHA256"
INNER_ENV = "PIXELL_SANDBOX_INNER"
_OUR_ENV = (POLICY_ENV, POLICY_SHA_ENV, INNER_ENV, PYTHONPATH_ENV)
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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = fh.read(1 << 20)
    if expected_sha is not None:
        if hashlib.sha256(data).hexdigest() != expected_sha:
            raise LaunchError(f"policy {path} does not match its digest (tampered?)")
    elif st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise LaunchError(f"policy {path} is not owned by us or is group/world writable")
    policy = json.loads(data)
    if policy.get("version") != 1:
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


def _chown_tree(root: str, uid: int, gid: int, skip: set[str]) -> None:
    """lchown every entry of ``root`` not yet owned by uid; never follows a symlink."""
    st = os.lstat(root)
    if st.st_uid != uid or st.st_gid != gid:
        os.chown(root, uid, gid, follow_symlinks=False)
    os.chmod(root, 0o700)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in dirnames + filenames:
            if name in skip and _dirpath == root:
                continue
            try:
                est = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if est.st_uid == uid and est.st_gid == gid:
                    continue
                if not (est.st_mode & 0o170000 == 0o040000) and est.st_nlink > 1:
                    continue  # never hand over a hard-linked file
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue


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
        cmd += ["--cap-drop", "ALL"]
        if policy.get("uid") is not None:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-all", "--unshare-user", "--disable-userns"]
        if policy.get("network"):
            cmd.append("--share-net")
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    cmd += ["--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm", "--proc", "/proc"]
    for path in policy.get("masked", []):
        cmd += ["--tmpfs", path]
    binds = [(p, "--ro-bind") for p in policy.get("ro_binds", [])]
    binds += [(p, "--bind") for p in policy.get("rw_binds", [])]
    masked = policy.get("masked", [])
    for path, flag in sorted(binds, key=lambda b: b[0].count("/")):
        parent = os.path.dirname(path)
        if any(parent.startswith(m.rstrip("/") + "/") for m in masked):
            # bwrap makes the missing parents of a bind 0700: a dropped uid could not pass.
            cmd += ["--perms", "0755", "--dir", parent]
        cmd += [flag, path, path]
    # Not --chdir WORK_DIR: bwrap changes directory after dropping its capabilities, and the
    # work dir belongs to the session uid (0700). The inner stage enters it after setuid.
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


def outer(policy: dict, argv: list[str]) -> list[str]:
    """Apply the outer layers; exec the namespace tool, or return the argv to run (no tool)."""
    uid = policy.get("uid")
    gid = policy.get("gid", uid)
    if policy.get("cgroup_procs"):
        _join_cgroups(policy["cgroup_procs"])
    if uid is not None and os.geteuid() == 0:
        _chown_tree(policy["kernel_dir"], uid, gid, skip={"sandbox.json"})
    _set_rlimits(policy.get("rlimits", {}))
    isolation = policy.get("isolation", "none")
    inner_policy = {
        k: policy.get(k)
        for k in (
            "isolation",
            "uid",
            "gid",
            "work_dir",
            "kernel_dir",
            "masked",
            "ro_binds",
            "rw_binds",
            "seccomp",
            "deny_inet_dgram",
            "landlock",
            "network",
            "pythonpath_entry",
        )
    }
    if isolation == "none":
        return inner(inner_policy, argv)
    env = dict(os.environ)
    for key in (POLICY_ENV, POLICY_SHA_ENV):
        env.pop(key, None)
    env[INNER_ENV] = json.dumps(inner_policy, separators=(",", ":"))
    # Run as a module from the same interpreter, with the same flags as a plain kernel start
    # (site enabled): the inner stage becomes the kernel process itself.
    inner_cmd = [sys.executable, "-m", "pixell_kernel_runtime.sandbox.launcher"]
    inner_cmd += ["--stage", "inner", "--"] + argv
    if isolation == "bwrap":
        cmd = _bwrap_cmd(policy, inner_cmd)
    elif isolation == "unshare":
        cmd = _unshare_cmd(policy, inner_cmd)
        env["JPY_PARENT_PID"] = "1"
        # bwrap's --die-with-parent, for unshare: when the server dies unshare dies, and
        # --kill-child takes the namespace down with it.
        confine.set_pdeathsig(signal.SIGKILL)
    else:
        raise LaunchError(f"unknown isolation {isolation!r}")
    os.execve(cmd[0], cmd, env)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- inner stage


def _clean_env(policy: dict) -> None:
    entry = policy.get("pythonpath_entry") or os.environ.get(PYTHONPATH_ENV)
    for key in _OUR_ENV:
        os.environ.pop(key, None)
    if entry:
        parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if entry in parts:
            parts.remove(entry)
        if parts:
            os.environ["PYTHONPATH"] = os.pathsep.join(parts)
        else:
            os.environ.pop("PYTHONPATH", None)
        try:
            sys.path.remove(entry)
        except ValueError:
            pass


def _drop_uid(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise LaunchError("setuid did not take")


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
    work_dir = policy.get("work_dir")
    if isolation == "unshare":
        confine.build_mount_view(
            masked=policy.get("masked") or [],
            ro_binds=policy.get("ro_binds") or [],
            rw_binds=policy.get("rw_binds") or [],
        )
    uid = policy.get("uid")
    if uid is not None and os.geteuid() == 0:
        _drop_uid(uid, policy.get("gid", uid))
    elif os.geteuid() == 0 or confine.capabilities().get("CapEff"):
        confine.drop_capabilities()
    if work_dir:
        # After the uid drop (the dir is the uid's, 0700) and after the mounts above.
        os.chdir(work_dir)
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
        seccomp.install(deny_inet_dgram=bool(policy.get("deny_inet_dgram")))
    _clean_env(policy)
    if isolation == "unshare" and os.getpid() == 1:
        child = os.fork()
        if child:
            _reaper(child)
    return argv


def run_kernel(argv: list[str]) -> None:
    argv = _resolve_argv(argv)
    # ``python -m module args`` runs here (the interpreter is already up: saves ~100 ms).
    if (
        len(argv) >= 3
        and argv[1] == "-m"
        and os.path.realpath(argv[0]) == os.path.realpath(sys.executable)
        and not argv[2].startswith("-")
        and os.environ.get("PIXELL_SANDBOX_EXEC") != "1"
    ):
        import runpy

        module = argv[2]
        sys.argv = [argv[0]] + argv[3:]
        sys.path[0] = os.getcwd()
        for name in [n for n in sys.modules if n.startswith("pixell_kernel_runtime")]:
            sys.modules.pop(name, None)
        sys.stdout.flush()
        runpy._run_module_as_main(module, alter_argv=True)  # type: ignore[attr-defined]
        return
    os.execv(argv[0], argv)


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
        _clean_env({})
        return cmd
    policy = _load_policy(path, os.environ.get(POLICY_SHA_ENV))
    os.environ.pop(POLICY_ENV, None)
    os.environ.pop(POLICY_SHA_ENV, None)
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
