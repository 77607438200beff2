"""A seccomp-BPF allow-list built in pure Python (stdlib only: struct + ctypes).

Imported by the launcher, so it must stay importable without third-party packages and without
the rest of ``pixell_kernel_runtime`` (the numbers live beside it in ``seccomp_tables``). The
filter:

* checks the audit architecture first and denies anything foreign (a 32-bit ``int 0x80`` call
  on x86_64 or an AArch32 task would otherwise be matched against 64-bit numbers), and on x86_64
  denies the x32 ABI (``nr >= 0x40000000``);
* allows only the syscalls in ``seccomp_tables.ALLOWED`` (what ipykernel, pyzmq, numpy, pandas,
  matplotlib, threads, asyncio, multiprocessing and fork/exec need: roughly Docker's default
  profile without System V IPC, POSIX message queues, NUMA policy, ``memfd_secret``, clock
  setting and the calls Docker only grants with capabilities); everything else, including every
  syscall a future kernel adds, returns ``EPERM`` (never kills: user code sees a clean
  ``OSError``);
* denies ``clone`` with any namespace flag and answers ``clone3`` with ``ENOSYS`` (its flags sit
  behind a pointer BPF cannot read; glibc then falls back to ``clone``);
* denies the ``TIOCSTI``/``TIOCLINUX`` ioctls (terminal input injection);
* lets ``personality`` only query (``0xffffffff``) or set ``PER_LINUX`` (no
  ``ADDR_NO_RANDOMIZE``, ``READ_IMPLIES_EXEC``...);
* optionally (``deny_inet_dgram``) denies non-TCP ``AF_INET``/``AF_INET6`` sockets (UDP, raw,
  SCTP, MPTCP), for hosts where no network namespace is available and Landlock only covers TCP;
* optionally (``deny_fastopen``) denies TCP Fast Open: ``sendto``/``sendmsg``/``sendmmsg`` with
  ``MSG_FASTOPEN`` and ``setsockopt(IPPROTO_TCP, TCP_FASTOPEN_CONNECT)``, which connect without
  ``connect()`` and so past Landlock's TCP connect rule.

Socket *families* are never filtered: libzmq aborts when ``AF_INET`` sockets cannot be created,
even over ipc. Classic BPF jumps are forward-only with 8-bit offsets, so the allowed numbers are
merged into ranges and searched with a balanced tree of ``JGE`` nodes whose leaves carry their
own ``ret`` instructions; the few argument checks sit in front of the tree.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

try:
    from . import seccomp_tables as _tables
except ImportError:  # imported by path, as the launcher's and the probe's ``import seccomp``
    import seccomp_tables as _tables  # type: ignore[no-redef]

# BPF opcodes.
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JA = 0x05  # BPF_JMP | BPF_JA (32-bit offset in k)
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGT_K = 0x25  # BPF_JMP | BPF_JGT | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
_ALLOW = SECCOMP_RET_ALLOW
_DENY = SECCOMP_RET_ERRNO | errno.EPERM
_ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}
_COLUMN = {"x86_64": 0, "aarch64": 1}

# struct seccomp_data offsets (little-endian: the low 32 bits of arg N sit at 16 + 8 * N). Every
# argument checked below is an int / unsigned int in the kernel, so the low word is all of it.
_OFF_NR = 0
_OFF_ARCH = 4


def _arg_lo(n: int) -> int:
    return 16 + 8 * n


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
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
PER_LINUX = 0
PER_QUERY = 0xFFFFFFFF
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
IPPROTO_TCP = 6
MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN_CONNECT = 30
_LEAF_RUNS = 3  # ranges checked linearly in one tree leaf


def host_arch() -> str | None:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return None


def syscall_table(arch: str) -> dict[str, int]:
    """Name -> number of every listed syscall on ``arch`` (allowed or argument-checked)."""
    if arch not in _COLUMN:
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for architecture {arch!r}")
    listed = _tables.ALLOWED.keys() & _tables.NEVER
    if listed:  # a bad edit of the table must not widen the sandbox
        raise ValueError(f"seccomp table allows forbidden syscalls: {sorted(listed)}")
    col = _COLUMN[arch]
    return {name: nrs[col] for name, nrs in _tables.ALLOWED.items() if nrs[col] is not None}


def allowed_syscalls(arch: str) -> list[str]:
    """Names a process may call (some only with permitted arguments); clone3 is not one."""
    return sorted(n for n in syscall_table(arch) if n != "clone3")


Insn = tuple[int, int, int, int]  # code, jt, jf, k (offsets already relative)
Target = int | str  # a relative offset or a label


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for nr in sorted(set(numbers)):
        if runs and nr == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], nr)
        else:
            runs.append((nr, nr))
    return runs


def _tree(runs: list[tuple[int, int]]) -> list[Insn]:
    """Self-contained code: ``ret ALLOW`` if A (the syscall number) is in ``runs``, else EPERM."""
    if len(runs) <= _LEAF_RUNS:
        body: list[tuple[int, int, str, int]] = []  # code, k, which branch is the exit, exit
        for lo, hi in runs:
            if lo == hi:
                body.append((_JEQ_K, lo, "jt", 1))
            else:
                body.append((_JGE_K, lo, "jf", 0))  # below this range (and above the last one)
                body.append((_JGT_K, hi, "jf", 1))  # not above it: inside
        deny_at, allow_at = len(body), len(body) + 1
        out: list[Insn] = []
        for i, (code, k, branch, to_allow) in enumerate(body):
            off = (allow_at if to_allow else deny_at) - (i + 1)
            out.append((code, off, 0, k) if branch == "jt" else (code, 0, off, k))
        return out + [(_RET_K, 0, 0, _DENY), (_RET_K, 0, 0, _ALLOW)]
    mid = len(runs) // 2
    left, right = _tree(runs[:mid]), _tree(runs[mid:])
    pivot = runs[mid][0]
    if len(left) <= 255:
        return [(_JGE_K, len(left), 0, pivot)] + left + right
    # Too far for an 8-bit jump: go through an unconditional (32-bit) jump.
    return [(_JGE_K, 0, 1, pivot), (_JA, 0, 0, len(left))] + left + right


class _Asm:
    """A tiny BPF assembler with forward labels (conditional jump offsets are 8-bit)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, Target, Target, Target]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def ld(self, off: int) -> None:
        self.ins.append((_LD_W_ABS, 0, 0, off))

    def jmp(self, op: int, k: int, jt: Target = 0, jf: Target = 0) -> None:
        self.ins.append((op, jt, jf, k))

    def ja(self, target: str) -> None:
        self.ins.append((_JA, 0, 0, target))

    def op(self, code: int, k: int) -> None:
        self.ins.append((code, 0, 0, k))

    def raw(self, code: list[Insn]) -> None:
        self.ins.extend(code)

    def _off(self, i: int, target: Target, limit: int) -> int:
        off = self.labels[target] - (i + 1) if isinstance(target, str) else target
        if not 0 <= off <= limit:
            raise ValueError(f"BPF jump out of range at {i}: {off}")
        return off

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.ins):
            if code == _JA:
                k = self._off(i, k, 0xFFFFFFFF)
            out += struct.pack(
                "=HBBI", code, self._off(i, jt, 255), self._off(i, jf, 255), int(k) & 0xFFFFFFFF
            )
        if len(self.ins) > 4096:  # BPF_MAXINSNS
            raise ValueError(f"seccomp filter too long: {len(self.ins)} instructions")
        return bytes(out)


def build_filter(
    arch: str | None = None, *, deny_inet_dgram: bool = False, deny_fastopen: bool = False
) -> bytes:
    """Return the raw ``struct sock_filter[]`` bytes of the allow-list for ``arch``."""
    arch = arch or host_arch()
    if arch not in AUDIT_ARCH:
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for architecture {arch!r}")
    table = syscall_table(arch)
    # Syscalls dispatched to an argument check; all others in the table are allowed outright.
    checks = {"clone": "clone", "clone3": "enosys", "ioctl": "ioctl", "personality": "pers"}
    if deny_inet_dgram:
        checks["socket"] = "socket"
    if deny_fastopen:
        checks.update(sendto="flags3", sendmmsg="flags3", sendmsg="flags2", setsockopt="sso")
    plain = [nr for name, nr in table.items() if name not in checks]

    a = _Asm()
    a.ld(_OFF_ARCH)
    a.jmp(_JEQ_K, AUDIT_ARCH[arch], 1, 0)
    a.op(_RET_K, _DENY)
    a.ld(_OFF_NR)
    if arch == "x86_64":
        a.jmp(_JGE_K, X32_SYSCALL_BIT, 0, 1)
        a.op(_RET_K, _DENY)
    for name, target in checks.items():
        a.jmp(_JEQ_K, table[name], target, 0)
    a.ja("tree")
    # Argument checks (A is reloaded; the tree below still gets the number: these all return).
    a.label("clone")
    a.ld(_arg_lo(0))
    a.jmp(_JSET_K, CLONE_NS_FLAGS, "deny", "allow")
    a.label("ioctl")
    a.ld(_arg_lo(1))
    a.jmp(_JEQ_K, TIOCSTI, "deny", 0)
    a.jmp(_JEQ_K, TIOCLINUX, "deny", "allow")
    a.label("pers")
    a.ld(_arg_lo(0))
    a.jmp(_JEQ_K, PER_QUERY, "allow", 0)
    a.jmp(_JEQ_K, PER_LINUX, "allow", "deny")
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
    if deny_fastopen:
        a.label("flags3")  # sendto(fd, buf, len, flags, ...), sendmmsg(fd, vec, n, flags)
        a.ld(_arg_lo(3))
        a.jmp(_JSET_K, MSG_FASTOPEN, "deny", "allow")
        a.label("flags2")  # sendmsg(fd, msg, flags)
        a.ld(_arg_lo(2))
        a.jmp(_JSET_K, MSG_FASTOPEN, "deny", "allow")
        a.label("sso")  # setsockopt(fd, level, optname, ...)
        a.ld(_arg_lo(1))
        a.jmp(_JEQ_K, IPPROTO_TCP, 0, "allow")
        a.ld(_arg_lo(2))
        a.jmp(_JEQ_K, TCP_FASTOPEN_CONNECT, "deny", "allow")
    a.label("allow")
    a.op(_RET_K, _ALLOW)
    a.label("deny")
    a.op(_RET_K, _DENY)
    a.label("enosys")
    a.op(_RET_K, _ENOSYS)
    a.label("tree")
    a.raw(_tree(_ranges(plain)))
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


def install(
    arch: str | None = None, *, deny_inet_dgram: bool = False, deny_fastopen: bool = False
) -> int:
    """Set no_new_privs and install the filter on the calling thread. Returns the rule count."""
    prog_bytes = build_filter(arch, deny_inet_dgram=deny_inet_dgram, deny_fastopen=deny_fastopen)
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
