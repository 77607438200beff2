"""Process confinement primitives used by the launcher (stdlib only: os + ctypes).

* Landlock (filesystem allow-list, TCP deny, scoping of signals and abstract unix sockets);
* dropping every capability (bounding, ambient, effective, permitted, inheritable);
* building a bwrap-like mount view inside a fresh mount namespace (the ``unshare`` fallback):
  read-only root, tmpfs over the masked directories, read-only re-binds of what the kernel
  needs, the kernel dir as the only writable place;
* ``PR_SET_PDEATHSIG``.

Nothing here imports the rest of ``pixell_kernel_runtime``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _err(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# --------------------------------------------------------------------------- prctl / caps

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )


def set_pdeathsig(sig: int) -> None:
    if _prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise _err("prctl(PR_SET_PDEATHSIG)")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 63


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP): nothing exec'd later, setuid
    binaries or file capabilities included, can ever gain a capability back."""
    for cap in range(_last_cap() + 1):
        if _prctl(PR_CAPBSET_DROP, cap) != 0:
            raise _err(f"prctl(PR_CAPBSET_DROP, {cap})")


def drop_capabilities() -> None:
    """Drop every capability of the calling process, for good."""
    for cap in range(_last_cap() + 1):
        _prctl(PR_CAPBSET_DROP, cap)  # needs CAP_SETPCAP; harmless without
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(b"\0" * 24)
    if _libc.capset(header, data) != 0:
        raise _err("capset")


def capabilities() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Cap"):
                    key, val = line.split(":", 1)
                    out[key] = int(val.strip(), 16)
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- landlock

_NR_LANDLOCK_CREATE_RULESET = 444  # same number on x86_64 and aarch64
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def landlock_abi() -> int:
    """The Landlock ABI version, 0 when unsupported or disabled."""
    rc = _libc.syscall(
        ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(rc), 0)


def _fs_all(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def landlock_restrict(
    *,
    read_only: list[str],
    read_write: list[str],
    devices: list[str],
    deny_tcp: bool,
    scope: bool = True,
) -> dict:
    """Confine the calling process (and its future children) with Landlock.

    ``read_only`` trees get execute/read, ``read_write`` trees every right, ``devices`` (files or
    directories under /dev) read/write/ioctl. With ``deny_tcp`` (ABI >= 4) every TCP bind and
    connect is refused. Requires no_new_privs (or CAP_SYS_ADMIN). Returns what was applied.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not supported or disabled")
    handled_fs = _fs_all(abi)
    handled_net = (NET_BIND_TCP | NET_CONNECT_TCP) if (deny_tcp and abi >= 4) else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if (scope and abi >= 6) else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    attr_buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _libc.syscall(
        ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET),
        attr_buf,
        ctypes.c_size_t(len(attr)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        raise _err("landlock_create_ruleset")
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    dev = FS_READ_FILE | FS_WRITE_FILE | FS_READ_DIR | (FS_TRUNCATE if abi >= 3 else 0)
    dev |= FS_IOCTL_DEV if abi >= 5 else 0
    applied: dict[str, list[str]] = {"read_only": [], "read_write": [], "devices": []}
    try:
        for kind, paths, rights in (
            ("read_only", read_only, read),
            ("read_write", read_write, handled_fs),
            ("devices", devices, dev),
        ):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights & handled_fs
                    if not os.path.isdir(f"/proc/self/fd/{fd}"):
                        allowed &= _FILE_RIGHTS
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
                    rc = _libc.syscall(
                        ctypes.c_long(_NR_LANDLOCK_ADD_RULE),
                        ctypes.c_int(ruleset),
                        ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                        rule,
                        ctypes.c_uint32(0),
                    )
                    if rc < 0:
                        raise _err(f"landlock_add_rule({path})")
                    applied[kind].append(path)
                finally:
                    os.close(fd)
        rc = _libc.syscall(
            ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)
        )
        if rc < 0:
            raise _err("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return {"abi": abi, "tcp_denied": bool(handled_net), "scoped": bool(scoped), **applied}


# --------------------------------------------------------------------------- mounts

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
_NR_MOUNT_SETATTR = 442  # x86_64 and aarch64


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    rc = _libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        ctypes.c_ulong(flags),
        data.encode() if data is not None else None,
    )
    if rc != 0:
        raise _err(f"mount({source!r} -> {target!r})")


def _set_readonly(target: str, *, recursive: bool, readonly: bool = True) -> None:
    attr = struct.pack(
        "=QQQQ", MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0
    )
    buf = ctypes.create_string_buffer(attr, len(attr))
    rc = _libc.syscall(
        ctypes.c_long(_NR_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        target.encode(),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0),
        buf,
        ctypes.c_size_t(len(attr)),
    )
    if rc == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        raise _err(f"mount_setattr({target!r})")
    # Kernels before 5.12: remount each mount point below target one by one.
    points = [target]
    if recursive:
        prefix = target.rstrip("/") + "/"
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(prefix):
                    points.append(mp)
    for mp in points:
        flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0)
        try:
            _mount(None, mp, None, flags, None)
        except OSError:
            if mp == target:
                raise


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _makedirs_0755(path: str) -> None:
    """mkdir -p whose new directories are 0755 whatever the umask (a dropped uid must pass)."""
    if os.path.isdir(path):
        return
    _makedirs_0755(os.path.dirname(path))
    os.mkdir(path)
    os.chmod(path, 0o755)


def build_mount_view(
    *,
    masked: list[str],
    ro_binds: list[str],
    rw_binds: list[str],
    shm_bytes: int | None = None,
) -> None:
    """Inside a fresh (private) mount namespace, with CAP_SYS_ADMIN over it.

    / becomes read-only (recursively), each of ``masked`` gets an empty tmpfs, ``ro_binds`` are
    re-bound read-only at their own path (reached through file descriptors opened before the
    masking, so they need no search permission on their parents afterwards), ``rw_binds``
    writable, /dev/shm a private writable tmpfs of at most ``shm_bytes``.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    fds: list[tuple[str, int, bool]] = []
    for path, writable in [(p, False) for p in ro_binds] + [(p, True) for p in rw_binds]:
        try:
            fds.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC), writable))
        except FileNotFoundError:
            continue
    try:
        _set_readonly("/", recursive=True)
        for path in masked:
            if os.path.isdir(path) and not os.path.islink(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        if os.path.isdir("/dev/shm"):
            size = f",size={int(shm_bytes)}" if shm_bytes else ""
            _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
        # Parents before children so that a nested bind lands on top.
        for path, fd, writable in sorted(fds, key=lambda item: item[0].count("/")):
            is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
            if any(_under(path, m) for m in masked):
                _makedirs_0755(path if is_dir else os.path.dirname(path))
                if not is_dir and not os.path.exists(path):
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
            _set_readonly(path, recursive=writable is False, readonly=not writable)
    finally:
        for _path, fd, _w in fds:
            os.close(fd)
