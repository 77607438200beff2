"""From probe results to a plan (which layers), and from a plan to one kernel's policy JSON."""

from __future__ import annotations

import functools
import os
import site
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pixell_kernel_runtime

# Hidden behind an empty tmpfs (bwrap, unshare); with Landlock alone they are left out of the
# read allow-list when they are top-level directories.
DEFAULT_MASKED = ("/tmp", "/root", "/home", "/run")
# Device nodes a kernel may open read/write under Landlock (everything else in /dev is denied).
LANDLOCK_DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/pts",
    "/dev/ptmx",
)
PACKAGE_DIR = str(Path(pixell_kernel_runtime.__file__).resolve().parent)
LAUNCHER = os.path.join(PACKAGE_DIR, "sandbox", "launcher.py")
# The privileged stages' whole environment: nothing a package or the server's caller chose.
LAUNCHER_PATH_ENV = "/usr/sbin:/usr/bin:/sbin:/bin"


def launcher_argv(*, stage: str = "outer") -> list[str]:
    """How every privileged stage starts: isolated mode (no PYTHON* variables, no user site,
    no script or working directory on sys.path) and the launcher by absolute path."""
    argv = [sys.executable, "-I", LAUNCHER]
    if stage != "outer":
        argv += ["--stage", stage]
    return argv


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def minimal_roots(paths: list[str]) -> list[str]:
    """Drop every path contained in another one; keep order stable."""
    out: list[str] = []
    for p in sorted(set(paths), key=lambda s: (s.count("/"), s)):
        if not any(_under(p, q) for q in out):
            out.append(p)
    return out


def runtime_paths() -> list[str]:
    """Everything the kernel's interpreter and the launcher need to read, found generically:
    prefixes, the interpreter's directory, site-packages, sys.path entries (editable installs)
    and the directory holding the pixell_kernel_runtime package. Symlinks are kept in both
    spellings."""
    cands: list[str] = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
        PACKAGE_DIR,
    ]
    try:
        cands += site.getsitepackages()
    except AttributeError:
        pass
    # sys.path[0] is the server's script dir or cwd: not something the kernel needs.
    cands += [p for p in sys.path[1:] if p]
    out: list[str] = []
    for p in cands:
        if not os.path.isabs(p) or not os.path.exists(p):
            continue
        for q in {os.path.normpath(p), os.path.realpath(p)}:
            if q != "/" and q not in out:
                out.append(q)
    return minimal_roots(out)


@functools.lru_cache(maxsize=8)
def _world_readable(root: str) -> tuple[bool, tuple[str, ...]]:
    """(whole tree world-readable?, the largest world-readable pieces of it)."""
    try:
        st = os.lstat(root)
    except OSError:
        return False, ()
    if stat.S_ISLNK(st.st_mode):
        return True, ()  # Landlock checks the target, wherever it is
    if not stat.S_ISDIR(st.st_mode):
        ok = bool(st.st_mode & stat.S_IROTH)
        return ok, (root,) if ok else ()
    if st.st_mode & 0o005 != 0o005:
        return False, ()
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return False, ()
    whole = True
    parts: list[str] = []
    for name in names:
        ok, sub = _world_readable(os.path.join(root, name))
        whole = whole and ok
        parts.extend(sub)
    return (True, (root,)) if whole else (False, tuple(parts))


def world_readable_parts(root: str) -> list[str]:
    return list(_world_readable(root)[1])


@dataclass
class Plan:
    mode: str
    root: bool
    isolation: str  # bwrap | unshare | none
    uid: bool
    # Root, no namespace tool and an interpreter the pool uids cannot reach: the kernel keeps
    # uid 0 without any capability, and a gid of its own separates it from other kernels.
    gid_only: bool
    landlock_abi: int  # 0 = not used
    seccomp: bool
    rlimits: bool
    network_isolation: str | None  # "namespace" | "landlock+seccomp" | None
    cgroups: dict = field(default_factory=dict)
    bwrap_path: str | None = None
    unshare_path: str | None = None

    @property
    def uses_namespaces(self) -> bool:
        return self.isolation in ("bwrap", "unshare")

    @property
    def separated(self) -> bool:
        """Does each kernel get ids of its own (a uid, or at least a gid)?"""
        return self.uid or self.gid_only


def decide(probed: dict, mode: str, *, exclude: tuple[str, ...] = ()) -> Plan:
    root = bool(probed.get("root"))
    bw = probed.get("bwrap", {})
    us = probed.get("unshare", {})
    if bw.get("ok") and "bwrap" not in exclude:
        isolation = "bwrap"
    elif us.get("ok") and "unshare" not in exclude:
        isolation = "unshare"
    else:
        isolation = "none"
    uid_info = probed.get("uid", {})
    # With bwrap/unshare the launcher re-binds what the uid must read (running as root while
    # it does); without them the uid must reach the interpreter by itself.
    uid = root and (isolation != "none" or bool(uid_info.get("exec_ok")))
    gid_only = root and not uid
    sc = bool(probed.get("seccomp", {}).get("ok"))
    ll = int(probed.get("landlock", {}).get("abi") or 0)
    landlock_abi = ll if (isolation == "none" and ll >= 1) else 0
    if isolation != "none":
        net = "namespace"
    elif landlock_abi >= 4 and sc:
        net = "landlock+seccomp"
    else:
        net = None
    return Plan(
        mode=mode,
        root=root,
        isolation=isolation,
        uid=uid,
        gid_only=gid_only,
        landlock_abi=landlock_abi,
        seccomp=sc,
        rlimits=bool(probed.get("rlimits", {}).get("ok", True)),
        network_isolation=net,
        cgroups=probed.get("cgroups", {}),
        bwrap_path=bw.get("path"),
        unshare_path=us.get("path"),
    )


def grants_around(roots: list[str], guarded: list[str]) -> list[str]:
    """``roots`` as Landlock read grants, split so that no guarded path is covered: a root that
    holds a guarded path is replaced by its other children, recursively."""
    out: list[str] = []
    for root in minimal_roots(roots):
        if any(_under(root, g) for g in guarded):
            continue
        inside = [g for g in guarded if _under(g, root)]
        if not inside:
            out.append(root)
            continue
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        out += grants_around([os.path.join(root, n) for n in names], inside)
    return out


def document(
    plan: Plan,
    *,
    dirs: Any,
    uid: int | None,
    gid: int | None,
    rlimits: dict,
    cgroup_procs: list[str],
    network: bool,
    package_root: str | None,
    data_dirs: list[str],
    masked: list[str],
    guarded: list[str],
    kernel_env: dict[str, str],
    shm_bytes: int | None,
    extra: dict | None = None,
) -> dict:
    """The policy JSON the launcher reads (``sandbox.json``): every layer and the kernel's own
    environment, which is applied only at the last step."""
    masked = minimal_roots([m for m in masked if os.path.isdir(m)])
    own = [dirs.sockets, dirs.tree]
    needed = runtime_paths()
    if network and os.path.exists("/etc/resolv.conf"):
        needed.append(os.path.realpath("/etc/resolv.conf"))
    # Never re-expose a masked or guarded tree (the run dir with every session, the state dir
    # with the store): only the kernel's own pieces of them are granted, one by one.
    guarded = minimal_roots([*masked, *guarded, dirs.server, dirs.tree])
    needed = [p for p in needed if not any(_under(g, p) for g in guarded)]
    extra_ro = [os.path.normpath(p) for p in [package_root, *data_dirs] if p]
    extra_ro = [p for p in extra_ro if os.path.exists(p)]
    ro: list[str] = []
    if plan.uses_namespaces:
        # Only what a tmpfs hides needs re-binding; the rest is visible through --ro-bind / /.
        ro += [p for p in needed if any(_under(p, m) for m in masked)]
    ro = minimal_roots(ro + extra_ro)
    ro = [p for p in ro if not any(_under(p, o) for o in own)]
    landlock = None
    if plan.landlock_abi:
        tops = [
            "/" + name
            for name in sorted(os.listdir("/"))
            if name != "dev" and os.path.isdir("/" + name)
        ]
        if plan.root and plan.gid_only:
            # The kernel keeps uid 0 (without capabilities): owner permissions still let it
            # read root-only files, so /etc is granted piecewise, world-readable parts only.
            guarded = minimal_roots([*guarded, "/etc"])
            tops += world_readable_parts("/etc")
        landlock = {
            "read_only": minimal_roots(grants_around(tops, guarded) + needed + ro)
            + [dirs.connection_file],
            # Not /dev/shm: without a mount namespace it is the HOST's, shared by every session
            # and outliving it (RAM never given back).
            "read_write": own,
            "devices": list(LANDLOCK_DEVICES),
        }
    fenced_net = not network and not plan.uses_namespaces
    doc = {
        "version": 2,
        "server_dir": dirs.server,
        "sockets": dirs.sockets,
        "tree": dirs.tree,
        "connection_file": dirs.connection_file,
        "work_dir": dirs.work,
        "make_dirs": [dirs.home, dirs.tmp, dirs.work],
        "uid": uid,
        "gid": gid,
        "rlimits": rlimits,
        "cgroup_procs": cgroup_procs,
        "isolation": plan.isolation,
        "bwrap": plan.bwrap_path,
        "unshare": plan.unshare_path,
        "network": bool(network),
        "masked": masked if plan.uses_namespaces else [],
        "ro_binds": ro if plan.uses_namespaces else [],
        "ro_files": [dirs.connection_file] if plan.uses_namespaces else [],
        "rw_binds": own if plan.uses_namespaces else [],
        "shm_bytes": shm_bytes if plan.uses_namespaces else None,
        "seccomp": plan.seccomp,
        "deny_inet_dgram": bool(plan.seccomp and fenced_net),
        # Landlock's TCP rule does not see a Fast Open connect: seccomp must refuse it.
        "deny_fastopen": bool(plan.seccomp and fenced_net),
        "landlock": landlock,
        "kernel_env": dict(kernel_env),
    }
    if extra:
        doc.update(extra)
    return doc
