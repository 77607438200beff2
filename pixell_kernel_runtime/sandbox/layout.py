"""Where one session's files live on the host, and who owns them.

Two trees per session, so that nothing the server opens is ever something a kernel can write::

    <run_dir>/k/<name>/                 server dir: owned by a guard uid (root, or in gid-only mode
        connection.json                 the session's unused pool uid), mode 0711; the kernel may
        kernel.log                      pass through it (Landlock mode) but not list or change it.
        sandbox.json                    connection.json is readable by the kernel's gid only;
        s/                              kernel.log and sandbox.json by the server only.
                                        s/ holds the ipc sockets: the kernel binds them, the server
                                        connects (the only kernel-writable place the server uses).
    <run_dir>/w/<name>/                 the kernel's writable tree (home, tmp, work): a size- and
                                        inode-limited tmpfs where the host allows one, owned by the
                                        kernel's ids from birth; the server never looks inside it.

Everything is created fresh and owned correctly at creation: no privileged process ever walks,
chowns or opens an entry a kernel could have replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass

log = logging.getLogger("pixell_kernel_runtime.sandbox")

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
LOG_NAME = "kernel.log"
POLICY_NAME = "sandbox.json"
CONNECTION_NAME = "connection.json"


@dataclass(frozen=True)
class SessionDirs:
    server: str
    tree: str
    quota: bool  # the tree is a size/inode-limited tmpfs of its own

    @property
    def sockets(self) -> str:
        return os.path.join(self.server, "s")

    @property
    def ipc_prefix(self) -> str:
        # jupyter_client names ipc endpoints "<ip>-<port>": the sockets land in sockets/.
        return os.path.join(self.sockets, "k")

    @property
    def connection_file(self) -> str:
        return os.path.join(self.server, CONNECTION_NAME)

    @property
    def log_file(self) -> str:
        return os.path.join(self.server, LOG_NAME)

    @property
    def policy_file(self) -> str:
        return os.path.join(self.server, POLICY_NAME)

    @property
    def home(self) -> str:
        return os.path.join(self.tree, "home")

    @property
    def tmp(self) -> str:
        return os.path.join(self.tree, "tmp")

    @property
    def work(self) -> str:
        return os.path.join(self.tree, "work")


@dataclass(frozen=True)
class Owners:
    """Who owns what. ``kernel_uid``/``gid``: the kernel's ids (None: the server's own).
    ``guard_uid``: owner of the server-side files, never the kernel's uid."""

    kernel_uid: int | None
    gid: int | None
    guard_uid: int = 0

    @property
    def separated(self) -> bool:
        return self.gid is not None

    @property
    def tree_mode(self) -> int:
        # gid-only (kernel keeps uid 0 without capabilities): reach through the group bits.
        return 0o070 if self.kernel_uid == 0 else 0o700


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: str, options: str) -> None:
    rc = _libc().mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {path}: {os.strerror(err)}")


def _mkdir_owned(path: str, mode: int, uid: int | None, gid: int | None) -> None:
    os.mkdir(path, 0o700)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)


def prepare_run_dir(run_dir: str) -> None:
    """The run dir's two halves: searchable by every kernel uid, listable by none. (The run dir
    itself may be the operator's: it is left as it is.)"""
    os.makedirs(run_dir, mode=0o711, exist_ok=True)
    for d in (os.path.join(run_dir, "k"), os.path.join(run_dir, "w")):
        os.makedirs(d, mode=0o711, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{d} is not a directory of ours")
        os.chmod(d, 0o711)


def create(
    run_dir: str,
    name: str,
    owners: Owners,
    *,
    disk_bytes: int | None,
    inodes: int | None,
    quota: bool,
) -> SessionDirs:
    """Make a session's two trees, owned right from the start. Raises OSError."""
    dirs = SessionDirs(
        server=os.path.join(run_dir, "k", name), tree=os.path.join(run_dir, "w", name), quota=False
    )
    guard = owners.guard_uid if owners.separated else None
    _mkdir_owned(dirs.server, 0o711, guard, 0 if owners.separated else None)
    try:
        _mkdir_owned(dirs.sockets, owners.tree_mode, _tree_owner(owners), owners.gid)
        _mkdir_owned(dirs.tree, owners.tree_mode, _tree_owner(owners), owners.gid)
        if quota and disk_bytes:
            opts = [f"size={disk_bytes}", f"mode={owners.tree_mode:o}"]
            if inodes:
                opts.append(f"nr_inodes={inodes}")
            owner = _tree_owner(owners)
            if owner is not None:
                opts.append(f"uid={owner}")
            if owners.gid is not None:
                opts.append(f"gid={owners.gid}")
            _mount_tmpfs(dirs.tree, ",".join(opts))
            dirs = SessionDirs(server=dirs.server, tree=dirs.tree, quota=True)
    except OSError:
        remove(dirs)
        raise
    return dirs


def _tree_owner(owners: Owners) -> int | None:
    if owners.kernel_uid == 0:
        return owners.guard_uid
    return owners.kernel_uid


def remove(dirs: SessionDirs) -> None:
    """Unmount and delete both trees (after every process of the session is gone)."""
    if dirs.quota or _is_mount_point(dirs.tree):
        if _libc().umount2(dirs.tree.encode(), MNT_DETACH) != 0:
            log.warning("could not unmount %s: %s", dirs.tree, os.strerror(ctypes.get_errno()))
    # rmtree works on file descriptors and never follows a link the kernel left behind.
    shutil.rmtree(dirs.tree, ignore_errors=True)
    shutil.rmtree(dirs.server, ignore_errors=True)


def _is_mount_point(path: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo)."""
    prefix = root.rstrip("/") + "/"
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(prefix):
                out.append(point)
    return out


def sweep(run_dir: str) -> int:
    """Detach the session tmpfs mounts a dead server left in ``run_dir/w`` (RUN_DIR reused)."""
    libc = _libc()
    points = mounts_under(os.path.join(run_dir, "w"))
    for point in sorted(points, key=len, reverse=True):
        libc.umount2(point.encode(), MNT_DETACH)
    return len(points)


RUN_DIR_PREFIX = "pkr-"


def run_dir_prefix() -> str:
    """The runtime's own run dirs are named after the server's pid: ``pkr-<pid>-XXXX``."""
    return f"{RUN_DIR_PREFIX}{os.getpid()}-"


def sweep_dead_run_dirs(parent: str) -> list[str]:
    """Run dirs (and their session tmpfs mounts) left in ``parent`` by servers that died without
    cleaning up (SIGKILL, OOM): only ``pkr-<pid>-*`` dirs of ours whose pid is gone."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] + "-" != RUN_DIR_PREFIX or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if pid == os.getpid() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            os.kill(pid, 0)
            continue  # its server still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        libc = _libc()
        for point in sorted(mounts_under(path), key=len, reverse=True):
            libc.umount2(point.encode(), MNT_DETACH)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def open_log(path: str) -> int:
    """The kernel's stdout/stderr file, opened so that nothing at ``path`` can fool us:
    never through a link, never blocking on a FIFO, only ever a regular file."""
    fd = os.open(
        path,
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        0o600,
    )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{path} is not a regular file of ours")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_log_tail(path: str, limit: int = 2000) -> str:
    """The end of a kernel log, read with the same care as :func:`open_log`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        os.lseek(fd, max(0, st.st_size - limit), os.SEEK_SET)
        return os.read(fd, limit).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)


def _set_socket_dir(dirs: SessionDirs, uid: int, gid: int, mode: int) -> None:
    fd = os.open(dirs.sockets, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_socket_dir(dirs: SessionDirs, owners: Owners) -> None:
    """Before a launch: the kernel may bind its ipc sockets in its socket dir."""
    if owners.separated:
        owner = _tree_owner(owners)
        _set_socket_dir(dirs, -1 if owner is None else owner, owners.gid, owners.tree_mode)


def lock_socket_dir(dirs: SessionDirs, owners: Owners) -> None:
    """Once the kernel has bound its sockets (before any user code runs): the server connects
    to those paths, so the kernel must not be able to swap one for a link to another socket.
    The dir becomes the guard's, readable and searchable by the kernel's group, writable by
    nobody but root."""
    if owners.separated:
        _set_socket_dir(
            dirs, owners.guard_uid, owners.gid, 0o050 if owners.kernel_uid == 0 else 0o750
        )


def secure_connection_file(path: str, owners: Owners) -> None:
    """jupyter_client wrote it 0600 as us: let the kernel's group read it, nobody write it."""
    if not owners.separated:
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EPERM, f"{path} is not a regular file")
        os.fchown(fd, owners.guard_uid, owners.gid)
        os.fchmod(fd, 0o440)
    finally:
        os.close(fd)
