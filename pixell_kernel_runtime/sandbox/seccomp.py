"""A seccomp-BPF deny-list built in pure Python (stdlib only: struct + ctypes).

Imported by the launcher, so it must stay importable without third-party packages and without
the rest of ``pixell_kernel_runtime``. The filter:

* checks the audit architecture first (a 32-bit ``int 0x80`` or x32 syscall on x86_64 would
  otherwise bypass a table keyed by 64-bit numbers) and denies anything foreign;
* returns ``EPERM`` for every denied syscall (never kills: user code sees a clean ``OSError``);
* denies ``clone`` with any namespace flag and answers ``clone3`` with ``ENOSYS`` (its flags sit
  behind a pointer BPF cannot read; glibc falls back to ``clone``);
* denies the ``TIOCSTI``/``TIOCLINUX`` ioctls (terminal input injection);
* optionally (``deny_inet_dgram``) denies non-TCP ``AF_INET``/``AF_INET6`` sockets, for hosts
  where no network namespace is available and Landlock only covers TCP. Socket *families* are
  never filtered: libzmq aborts when ``AF_INET`` sockets cannot be created, even over ipc.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# BPF opcodes.
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data offsets (little-endian: the low 32 bits of arg N sit at 16 + 8 * N).
_OFF_NR = 0
_OFF_ARCH = 4


def _arg_lo(n: int) -> int:
    return 16 + 8 * n


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
SECCOMP_MODE_FILTER = 2

CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
IPPROTO_TCP = 6

# The deny-list, by name. Names missing from an architecture's table are skipped.
DENIED = (
    "ptrace",
    "mount",
    "umount2",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "open_by_handle_at",
    "name_to_handle_at",
    "perf_event_open",
    "process_vm_readv",
    "process_vm_writev",
    "userfaultfd",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "sethostname",
    "setdomainname",
    "syslog",
    "vhangup",
    "nfsservctl",
    "uselib",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "_sysctl",
    "kcmp",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "pidfd_getfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)

# Checked against /usr/include/x86_64-linux-gnu/asm/unistd_64.h and asm-generic/unistd.h.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101,
        "mount": 165,
        "umount2": 166,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "bpf": 321,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "pivot_root": 155,
        "chroot": 161,
        "setns": 308,
        "unshare": 272,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "perf_event_open": 298,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "userfaultfd": 323,
        "acct": 163,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "iopl": 172,
        "ioperm": 173,
        "quotactl": 179,
        "quotactl_fd": 443,
        "lookup_dcookie": 212,
        "sethostname": 170,
        "setdomainname": 171,
        "syslog": 103,
        "vhangup": 153,
        "nfsservctl": 180,
        "uselib": 134,
        "create_module": 174,
        "get_kernel_syms": 177,
        "query_module": 178,
        "_sysctl": 156,
        "kcmp": 312,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "move_mount": 429,
        "open_tree": 428,
        "mount_setattr": 442,
        "pidfd_getfd": 438,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        # Argument-checked.
        "clone": 56,
        "clone3": 435,
        "ioctl": 16,
        "socket": 41,
    },
    "aarch64": {
        "ptrace": 117,
        "mount": 40,
        "umount2": 39,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "bpf": 280,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "pivot_root": 41,
        "chroot": 51,
        "setns": 268,
        "unshare": 97,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "perf_event_open": 241,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "userfaultfd": 282,
        "acct": 89,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "quotactl": 60,
        "quotactl_fd": 443,
        "lookup_dcookie": 18,
        "sethostname": 161,
        "setdomainname": 162,
        "syslog": 116,
        "vhangup": 58,
        "nfsservctl": 42,
        "kcmp": 272,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "move_mount": 429,
        "open_tree": 428,
        "mount_setattr": 442,
        "pidfd_getfd": 438,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "clone": 220,
        "clone3": 435,
        "ioctl": 29,
        "socket": 198,
    },
}

AUDIT_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}


def host_arch() -> str | None:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return None


class _Asm:
    """A tiny BPF assembler with forward labels (jump offsets are 8-bit)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def ld(self, off: int) -> None:
        self.ins.append((_LD_W_ABS, 0, 0, off))

    def jmp(self, op: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.ins.append((op, jt, jf, k))

    def op(self, code: int, k: int) -> None:
        self.ins.append((code, 0, 0, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for target in (jt, jf):
                if isinstance(target, str):
                    off = self.labels[target] - (i + 1)
                else:
                    off = int(target)
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump out of range at {i}: {off}")
                offs.append(off)
            out += struct.pack("=HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


def build_filter(arch: str | None = None, *, deny_inet_dgram: bool = False) -> bytes:
    """Return the raw ``struct sock_filter[]`` bytes of the deny-list for ``arch``."""
    arch = arch or host_arch()
    if arch not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for architecture {arch!r}")
    table = SYSCALLS[arch]
    denied = sorted({table[name] for name in DENIED if name in table})
    a = _Asm()
    a.ld(_OFF_ARCH)
    a.jmp(_JEQ_K, AUDIT_ARCH[arch], 0, "deny")
    a.ld(_OFF_NR)
    if arch == "x86_64":
        a.jmp(_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    for nr in denied:
        a.jmp(_JEQ_K, nr, "deny", 0)
    a.jmp(_JEQ_K, table["clone"], "clone", 0)
    a.jmp(_JEQ_K, table["clone3"], "enosys", 0)
    a.jmp(_JEQ_K, table["ioctl"], "ioctl", 0)
    if deny_inet_dgram:
        a.jmp(_JEQ_K, table["socket"], "socket", 0)
    a.op(_RET_K, SECCOMP_RET_ALLOW)
    # Argument checks. Classic BPF only jumps forward, so the shared returns come last.
    a.label("clone")
    a.ld(_arg_lo(0))
    a.jmp(_JSET_K, CLONE_NS_FLAGS, "deny", "allow")
    a.label("ioctl")
    a.ld(_arg_lo(1))
    a.jmp(_JEQ_K, TIOCSTI, "deny", 0)
    a.jmp(_JEQ_K, TIOCLINUX, "deny", "allow")
    if deny_inet_dgram:
        a.label("socket")
        a.ld(_arg_lo(0))
        a.jmp(_JEQ_K, AF_INET, "inet", 0)
        a.jmp(_JEQ_K, AF_INET6, "inet", "allow")
        a.label("inet")
        a.ld(_arg_lo(1))
        a.op(_AND_K, 0xF)  # strip SOCK_NONBLOCK / SOCK_CLOEXEC
        a.jmp(_JEQ_K, SOCK_STREAM, 0, "deny")
        a.ld(_arg_lo(2))
        a.jmp(_JEQ_K, 0, "allow", 0)
        a.jmp(_JEQ_K, IPPROTO_TCP, "allow", "deny")
    a.label("allow")
    a.op(_RET_K, SECCOMP_RET_ALLOW)
    a.label("deny")
    a.op(_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)
    a.label("enosys")
    a.op(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    return a.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def set_no_new_privs() -> None:
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def install(arch: str | None = None, *, deny_inet_dgram: bool = False) -> int:
    """Set no_new_privs and install the filter on the calling thread. Returns the rule count."""
    prog_bytes = build_filter(arch, deny_inet_dgram=deny_inet_dgram)
    count = len(prog_bytes) // 8
    buf = ctypes.create_string_buffer(prog_bytes, len(prog_bytes))
    prog = _SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    set_no_new_privs()
    libc = _libc()
    libc.prctl.argtypes = None
    rc = libc.prctl(
        ctypes.c_int(PR_SET_SECCOMP),
        ctypes.c_ulong(SECCOMP_MODE_FILTER),
        ctypes.byref(prog),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
    return count


def current_mode() -> int:
    """0 = none, 1 = strict, 2 = filter (as in /proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
