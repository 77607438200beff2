"""From probe results to a plan (which layers), and from a plan to one kernel's policy JSON."""

from __future__ import annotations

import functools
import os
import site
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
PACKAGE_PARENT = str(Path(PACKAGE_DIR).parent)


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


def needs_pythonpath(probed: dict | None = None) -> bool:
    """Must the kernel env carry PYTHONPATH for ``-m pixell_kernel_runtime...`` to import?
    The probe knows (it tries a clean interpreter: an editable install may do without);
    otherwise: unless the package sits in site-packages."""
    if probed is not None and "launcher_importable" in probed:
        return not probed["launcher_importable"]
    try:
        sp = [os.path.realpath(p) for p in site.getsitepackages()]
    except AttributeError:
        sp = []
    return os.path.realpath(PACKAGE_PARENT) not in sp


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
        landlock_abi=landlock_abi,
        seccomp=sc,
        rlimits=bool(probed.get("rlimits", {}).get("ok", True)),
        network_isolation=net,
        cgroups=probed.get("cgroups", {}),
        bwrap_path=bw.get("path"),
        unshare_path=us.get("path"),
    )


def document(
    plan: Plan,
    *,
    kernel_dir: str,
    work_dir: str,
    uid: int | None,
    rlimits: dict,
    cgroup_procs: list[str],
    network: bool,
    package_root: str | None,
    data_dirs: list[str],
    masked: list[str],
    guard: list[str] | None = None,
    extra: dict | None = None,
    pythonpath: bool = True,
) -> dict:
    """The policy JSON the launcher reads (``sandbox.json``)."""
    masked = minimal_roots([m for m in masked if os.path.isdir(m)])
    needed = runtime_paths()
    if network and os.path.exists("/etc/resolv.conf"):
        needed.append(os.path.realpath("/etc/resolv.conf"))
    # Never re-expose a masked tree, or the tree holding other kernels' dirs.
    guarded = masked + [kernel_dir, *(guard or [])]
    needed = [p for p in needed if not any(_under(g, p) for g in guarded)]
    ro: list[str] = []
    if plan.uses_namespaces:
        # Only what a tmpfs hides needs re-binding; the rest is visible through --ro-bind / /.
        ro += [p for p in needed if any(_under(p, m) for m in masked)]
    extra_ro = [os.path.normpath(p) for p in [package_root, *data_dirs] if p]
    extra_ro = [p for p in extra_ro if os.path.exists(p) and not any(_under(g, p) for g in guarded)]
    ro = minimal_roots(ro + extra_ro)
    ro = [p for p in ro if not _under(p, kernel_dir)]
    landlock = None
    if plan.landlock_abi:
        top_masked = {m for m in masked if m.count("/") == 1}
        tops = []
        for name in sorted(os.listdir("/")):
            path = "/" + name
            if path in top_masked or path == "/dev" or not os.path.isdir(path):
                continue
            tops.append(path)
        if plan.root and uid is None:
            # The kernel keeps uid 0 (without capabilities): owner permissions still let it
            # read root-only files, so /etc is granted piecewise, world-readable parts only.
            tops = [t for t in tops if t != "/etc"] + world_readable_parts("/etc")
        landlock = {
            "read_only": minimal_roots(tops + needed + ro),
            # Not /dev/shm: without a mount namespace it is the HOST's, shared by every session
            # (all uid 0 when there is no uid drop: free to overwrite or delete each other's
            # and root's shared memory) and it outlives the session (RAM never given back).
            "read_write": [kernel_dir],
            "devices": list(LANDLOCK_DEVICES),
        }
    doc = {
        "version": 1,
        "kernel_dir": kernel_dir,
        "work_dir": work_dir,
        "uid": uid,
        "gid": uid,
        "rlimits": rlimits,
        "cgroup_procs": cgroup_procs,
        "isolation": plan.isolation,
        "bwrap": plan.bwrap_path,
        "unshare": plan.unshare_path,
        "network": bool(network),
        "masked": masked if plan.uses_namespaces else [],
        "ro_binds": ro if plan.uses_namespaces else [],
        "rw_binds": [kernel_dir] if plan.uses_namespaces else [],
        "seccomp": plan.seccomp,
        "deny_inet_dgram": bool(plan.seccomp and not network and not plan.uses_namespaces),
        "landlock": landlock,
        "pythonpath_entry": PACKAGE_PARENT if pythonpath else None,
    }
    if extra:
        doc.update(extra)
    return doc
