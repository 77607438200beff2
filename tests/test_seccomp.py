"""The seccomp allow-list on its own, in real child processes (no server involved).

* the numbers in ``seccomp_tables`` agree with the kernel headers on this machine;
* the assembled program, run in a small classic-BPF interpreter, gives every syscall number of
  both architectures the action the tables and argument checks say;
* a real ipykernel under the filter imports numpy and pandas, draws with matplotlib, runs
  ``multiprocessing.Pool``, ``subprocess``, threads, asyncio, fork and loopback sockets;
* the calls that must stay closed get ``EPERM`` (``clone3``: ``ENOSYS``), with arguments that
  would also fail harmlessly if the filter let them through;
* ``deny_fastopen`` stops TCP Fast Open connecting (the listener never sees it) while UDP and
  ordinary socket options keep working.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import jupyter_client
from jupyter_client.kernelspec import KernelSpecManager

from pixell_kernel_runtime.sandbox import seccomp, seccomp_tables

SANDBOX_DIR = Path(seccomp.__file__).parent
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
TIMEOUT = 120


def header_numbers(arch: str) -> dict[str, int]:
    """Syscall numbers of ``arch`` read from the installed UAPI headers (64-bit names)."""
    text = HEADERS[arch].read_text()
    generic = dict(re.findall(r"#define __NR3264_(\w+) (\d+)", text))
    out: dict[str, int] = {}
    for name, value in re.findall(r"#define __NR_(\w+)\s+(\w+)", text):
        if value.isdigit():
            out[name] = int(value)
        elif value.removeprefix("__NR3264_") in generic:  # __NR3264_stat is never defined
            out[name] = int(generic[value.removeprefix("__NR3264_")])
    out.pop("syscalls", None)
    return out


def run_bpf(prog: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Interpret the subset of classic BPF that the seccomp module emits."""
    argv = list(args) + [0] * (6 - len(args))
    data = struct.pack("<IIQ6Q", nr, arch, 0, *argv)
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:
            acc &= k
        elif code == 0x06:
            return k
        elif code == 0x05:
            pc += k
        else:
            cond = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if cond else jf


def test_tables_match_the_kernel_headers() -> None:
    for arch, col in (("x86_64", 0), ("aarch64", 1)):
        headers = header_numbers(arch)
        newest = max(headers.values())
        for name, nrs in seccomp_tables.ALLOWED.items():
            if name == "uretprobe":  # x86_64 only (6.11), in a 64-bit-only slot
                assert nrs == (335, None) and name not in headers
            elif nrs[col] is None:
                assert name not in headers, (arch, name)
            elif name in headers:
                assert nrs[col] == headers[name], (arch, name, nrs[col], headers[name])
            else:  # newer than these headers: one number on every architecture since 424
                assert nrs[col] > newest and nrs[0] == nrs[1], (arch, name)
        assert not seccomp_tables.ALLOWED.keys() & seccomp_tables.NEVER


def test_filter_gives_every_number_its_action() -> None:
    for arch in ("x86_64", "aarch64"):
        audit = seccomp.AUDIT_ARCH[arch]
        table = seccomp.syscall_table(arch)
        by_nr = {nr: name for name, nr in table.items()}
        never = {nr for n, nr in header_numbers(arch).items() if n in seccomp_tables.NEVER}
        assert len(never) > 60
        plain = seccomp.build_filter(arch)
        both = seccomp.build_filter(arch, deny_inet_dgram=True, deny_fastopen=True)
        for prog in (plain, both):
            for nr in range(0, 1100):
                want = ENOSYS if by_nr.get(nr) == "clone3" else ALLOW if nr in by_nr else EPERM
                assert run_bpf(prog, nr, audit) == want, (arch, nr, by_nr.get(nr))
            assert not never & set(by_nr)
            assert run_bpf(prog, table["getpid"], 0x40000003) == EPERM  # i386 on x86_64
            assert run_bpf(prog, table["getpid"], 0x40000028) == EPERM  # AArch32
            if arch == "x86_64":
                assert run_bpf(prog, table["getpid"] | 0x40000000, audit) == EPERM  # x32
            clone, ioctl, pers = table["clone"], table["ioctl"], table["personality"]
            assert run_bpf(prog, clone, audit, (0x10000000 | 17,)) == EPERM  # CLONE_NEWUSER
            assert run_bpf(prog, clone, audit, (0x40000000 | 17,)) == EPERM  # CLONE_NEWNET
            assert run_bpf(prog, clone, audit, (0x003D0F00,)) == ALLOW  # pthread_create
            assert run_bpf(prog, ioctl, audit, (0, 0x5412)) == EPERM  # TIOCSTI
            assert run_bpf(prog, ioctl, audit, (0, 0x541C)) == EPERM  # TIOCLINUX
            assert run_bpf(prog, ioctl, audit, (0, 0x5413)) == ALLOW  # TIOCGWINSZ
            assert run_bpf(prog, pers, audit, (0xFFFFFFFF,)) == ALLOW
            assert run_bpf(prog, pers, audit, (0x0040000,)) == EPERM  # ADDR_NO_RANDOMIZE
            assert run_bpf(prog, pers, audit, (0x0400000,)) == EPERM  # READ_IMPLIES_EXEC
        # The options, and only with the options.
        sock, sendto, sendmsg = table["socket"], table["sendto"], table["sendmsg"]
        sendmmsg, sso = table["sendmmsg"], table["setsockopt"]
        for prog, on in ((plain, False), (both, True)):
            closed = EPERM if on else ALLOW
            assert run_bpf(prog, sock, audit, (2, 2, 0)) == closed  # AF_INET, SOCK_DGRAM
            assert run_bpf(prog, sock, audit, (10, 1, 262)) == closed  # AF_INET6 MPTCP
            assert run_bpf(prog, sock, audit, (2, 1 | 0x80800, 0)) == ALLOW  # TCP
            assert run_bpf(prog, sock, audit, (10, 1, 6)) == ALLOW
            assert run_bpf(prog, sock, audit, (1, 2, 0)) == ALLOW  # AF_UNIX
            assert run_bpf(prog, sendto, audit, (3, 0, 1, 0x20000000)) == closed
            assert run_bpf(prog, sendto, audit, (3, 0, 1, 0x40)) == ALLOW  # MSG_DONTWAIT
            assert run_bpf(prog, sendmsg, audit, (3, 0, 0x20004000)) == closed
            assert run_bpf(prog, sendmsg, audit, (3, 0, 0x4000)) == ALLOW
            assert run_bpf(prog, sendmmsg, audit, (3, 0, 1, 0x20000000)) == closed
            assert run_bpf(prog, sso, audit, (3, 6, 30)) == closed  # TCP_FASTOPEN_CONNECT
            assert run_bpf(prog, sso, audit, (3, 6, 1)) == ALLOW  # TCP_NODELAY
            assert run_bpf(prog, sso, audit, (3, 1, 30)) == ALLOW  # SOL_SOCKET, 30
    assert len(plain) // 8 < 255


def test_search_tree_stays_in_jump_range_when_large() -> None:
    # 600 scattered numbers: the left halves outgrow an 8-bit jump and need the JA trampoline.
    runs = seccomp._ranges([n for n in range(0, 2400, 4)] + [2401, 2402, 2403])
    code = seccomp._tree(runs)
    assert any(c == 0x05 for c, *_ in code)
    prog = b"".join(struct.pack("=HBBI", *insn) for insn in [(0x20, 0, 0, 0), *code])
    for nr in range(0, 2500):
        want = ALLOW if (nr < 2400 and nr % 4 == 0) or 2401 <= nr <= 2403 else EPERM
        assert run_bpf(prog, nr, 0) == want, nr


def _child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter that can ``import seccomp``; return its JSON line."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    cmd = [sys.executable, "-c", code, str(SANDBOX_DIR), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


DENIED_CHILD = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
import seccomp
calls = json.loads(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
master, slave = os.openpty()
seccomp.install()
res = {"mode": seccomp.current_mode()}
for name, nr, args in calls:
    args = [slave if a == "PTY" else ctypes.c_char_p(b"x") if a == "BUF" else a for a in args]
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *[a if isinstance(a, ctypes.c_char_p)
                                          else ctypes.c_long(a) for a in args])
    if rc == 0 and name == "clone":
        os._exit(0)  # a child the filter should have refused: leave at once
    res[name] = [rc, ctypes.get_errno()]
res["persona"] = libc.syscall(ctypes.c_long(calls[0][1]), ctypes.c_long(0xFFFFFFFF))
res["per_linux"] = libc.syscall(ctypes.c_long(calls[0][1]), ctypes.c_long(0))
pid = os.fork()
if pid == 0:
    os._exit(3)
res["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(res))
"""


def test_denied_syscalls_get_eperm() -> None:
    arch = seccomp.host_arch()
    nrs = header_numbers(arch)
    # Each call's arguments make it fail harmlessly (EINVAL, EFAULT, EBADF, ESRCH, ENOENT) should
    # the filter let it through; personality and unshare would only change this child.
    calls: list[tuple[str, int, list]] = [
        ("personality", nrs["personality"], [0x0040000]),  # ADDR_NO_RANDOMIZE
        ("mbind", nrs["mbind"], [0, 0, 99, 0, 0, 0]),
        ("set_mempolicy", nrs["set_mempolicy"], [99, 0, 0]),
        ("migrate_pages", nrs["migrate_pages"], [-1, 0, 0, 0]),
        ("move_pages", nrs["move_pages"], [-1, 1, 0, 0, 0, 0]),
        ("memfd_secret", nrs["memfd_secret"], [0xFFFF]),
        ("shmget", nrs["shmget"], [0, 0, 0]),
        ("shmat", nrs["shmat"], [-1, 0, 0]),
        ("shmdt", nrs["shmdt"], [1]),
        ("shmctl", nrs["shmctl"], [-1, 0, 0]),
        ("msgget", nrs["msgget"], [0x7E5EC0, 0]),
        ("msgsnd", nrs["msgsnd"], [-1, 0, 0, 0]),
        ("semget", nrs["semget"], [0, -1, 0]),
        ("semop", nrs["semop"], [-1, 0, 0]),
        ("mq_open", nrs["mq_open"], [0, 0, 0, 0]),
        ("unshare", nrs["unshare"], [0x10000000]),  # CLONE_NEWUSER
        ("clone", nrs["clone"], [0x40000000 | 17, 0, 0, 0, 0]),  # CLONE_NEWNET | SIGCHLD
        ("clone3", nrs["clone3"], [0, 0]),
        ("ptrace", nrs["ptrace"], [3, os.getpid(), 0, 0]),  # PEEKUSER on a non-tracee
        ("process_vm_readv", nrs["process_vm_readv"], [-1, 0, 0, 0, 0, 0]),
        ("kcmp", nrs["kcmp"], [-1, -1, 0, 0, 0]),
        ("pidfd_getfd", nrs["pidfd_getfd"], [-1, 0, 0]),
        ("mount", nrs["mount"], [0, 0, 0, 0, 0]),
        ("umount2", nrs["umount2"], [0, 0]),
        ("pivot_root", nrs["pivot_root"], [0, 0]),
        ("chroot", nrs["chroot"], [0]),
        ("setns", nrs["setns"], [-1, 0]),
        ("bpf", nrs["bpf"], [999, 0, 0]),
        ("keyctl", nrs["keyctl"], [9999, 0, 0, 0, 0]),
        ("add_key", nrs["add_key"], [0, 0, 0, 0, 0]),
        ("kexec_load", nrs["kexec_load"], [0, 0, 0, 0xFFFF]),
        ("finit_module", nrs["finit_module"], [-1, 0, 0]),
        ("reboot", nrs["reboot"], [0, 0, 0, 0]),  # bad magic
        ("swapon", nrs["swapon"], [0, 0]),
        ("open_by_handle_at", nrs["open_by_handle_at"], [-1, 0, 0]),
        ("perf_event_open", nrs["perf_event_open"], [0, 0, -1, -1, 0]),
        ("userfaultfd", nrs["userfaultfd"], [0xFFFF]),
        ("io_uring_setup", nrs["io_uring_setup"], [0, 0]),
        ("acct", nrs["acct"], [1]),
        ("clock_settime", nrs["clock_settime"], [99, 0]),
        ("settimeofday", nrs["settimeofday"], [1, 0]),
        ("adjtimex", nrs["adjtimex"], [1]),
        ("quotactl", nrs["quotactl"], [0, 0, 0, 0]),
        ("syslog", nrs["syslog"], [99, 0, 0]),
        ("fanotify_init", nrs["fanotify_init"], [0xFFFFFFFF, 0]),
        ("sethostname", nrs["sethostname"], [0, 99999]),
        ("ioctl", nrs["ioctl"], ["PTY", 0x5412, "BUF"]),  # TIOCSTI
        ("lsm_set_self_attr", 460, [0, 0, 0, 0]),  # not in these headers: a "future" call
        ("future_999", 999, []),
    ]
    assert calls[0][0] == "personality"
    if arch == "x86_64":
        calls.append(("x32_getpid", 0x40000000 | nrs["getpid"], []))
    res = _child(DENIED_CHILD, json.dumps(calls))
    assert res.pop("mode") == 2
    assert res.pop("fork") == 3
    persona = res.pop("persona")
    assert persona >= 0 and not persona & 0x0040000
    assert res.pop("per_linux") == persona
    assert res.pop("clone3") == [-1, 38]  # ENOSYS: glibc falls back to clone
    want = {name: [-1, 1] for name, _nr, _args in calls if name != "clone3"}
    assert res == want


FASTOPEN_CHILD = r"""
import ctypes, json, socket, sys
sys.path.insert(0, sys.argv[1])
import seccomp
deny = sys.argv[2] == "deny"
tcp_port, udp_port = int(sys.argv[3]), int(sys.argv[4])
seccomp.install(deny_fastopen=deny)
res = {"mode": seccomp.current_mode()}
def attempt(key, fn):
    try:
        fn()
        res[key] = "ok"
    except OSError as exc:
        res[key] = exc.errno
tcp = ("127.0.0.1", tcp_port)
libc = ctypes.CDLL(None, use_errno=True)
def sendmmsg():
    s = socket.socket()
    if libc.sendmmsg(s.fileno(), None, 1, socket.MSG_FASTOPEN) < 0:
        raise OSError(ctypes.get_errno(), "sendmmsg")
if deny:
    attempt("sendto", lambda: socket.socket().sendto(b"B", socket.MSG_FASTOPEN, tcp))
    attempt("sendmsg", lambda: socket.socket().sendmsg([b"B"], [], socket.MSG_FASTOPEN, tcp))
    attempt("sendmmsg", sendmmsg)
s = socket.socket()
attempt("tfo_connect", lambda: s.setsockopt(socket.IPPROTO_TCP, 30, 1))
attempt("nodelay", lambda: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
attempt("reuseaddr", lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
if not deny:
    attempt("sendto", lambda: s.sendto(b"A", socket.MSG_FASTOPEN, tcp))
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp", lambda: u.sendto(sys.argv[2].encode(), ("127.0.0.1", udp_port)))
print(json.dumps(res))
"""


def test_deny_fastopen_blocks_fast_open_only() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(TIMEOUT)
        ports = (str(listener.getsockname()[1]), str(udp.getsockname()[1]))
        denied = _child(FASTOPEN_CHILD, "deny", *ports)
        assert denied == {
            "mode": 2,
            "sendto": 1,
            "sendmsg": 1,
            "sendmmsg": 1,
            "tfo_connect": 1,
            "nodelay": "ok",
            "reuseaddr": "ok",
            "udp": "ok",
        }
        assert udp.recvfrom(64)[0] == b"deny"
        # The control: the same calls without the option connect, after the denied child ran.
        # The accept queue is FIFO, so if Fast Open had got through above, "B" would come first.
        allowed = _child(FASTOPEN_CHILD, "allow", *ports)
        assert allowed == {
            "mode": 2,
            "tfo_connect": "ok",
            "nodelay": "ok",
            "reuseaddr": "ok",
            "sendto": "ok",
            "udp": "ok",
        }
        assert udp.recvfrom(64)[0] == b"allow"
        listener.settimeout(TIMEOUT)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(8) == b"A"
        listener.setblocking(False)
        try:
            extra = listener.accept()
        except BlockingIOError:
            extra = None
        assert extra is None
        udp.close()


KERNEL_PRE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import seccomp
seccomp.install(deny_fastopen=True)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", sys.argv[2]])
"""

CELLS = [
    (
        "import ctypes, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "st = open('/proc/self/status').read()\n"
        "print('seccomp', st.split('Seccomp:')[1].split()[0])\n"
        "print('shmget', libc.shmget(0, 0, 0), ctypes.get_errno())",
        "seccomp 2\nshmget -1 1\n",
    ),
    (
        "import numpy as np, pandas as pd\n"
        "df = pd.DataFrame({'k': [1, 1, 2], 'v': np.array([1.0, 2.0, 4.0])})\n"
        "print(df.groupby('k')['v'].sum().tolist(), float(np.linalg.inv(np.eye(3) * 2)[0, 0]))",
        "[3.0, 4.0] 0.5\n",
    ),
    (
        "%matplotlib inline\n"
        "import io, matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(); ax.plot([1, 3, 2])\n"
        "buf = io.BytesIO(); fig.savefig(buf, format='png'); print(buf.getvalue()[:4])\n"
        "plt.show()",
        "b'\\x89PNG'\n",
    ),
    (
        "import multiprocessing, operator\n"
        "with multiprocessing.Pool(2) as pool:\n"
        "    print(pool.map(operator.neg, [1, 2, 3]))",
        "[-1, -2, -3]\n",
    ),
    (
        "import subprocess, os\n"
        "open('marker.txt', 'w').close()\n"
        "print(subprocess.run(['ls'], capture_output=True, text=True).stdout.split())\n"
        "print(subprocess.run(['/bin/sh', '-c', 'echo sh-ok'], capture_output=True).stdout)",
        "['marker.txt']\nb'sh-ok\\n'\n",
    ),
    (
        "import threading\n"
        "got = []\n"
        "ts = [threading.Thread(target=got.append, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]; print(sorted(got))",
        "[0, 1, 2, 3]\n",
    ),
    (
        "import socket\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))\n"
        "u.sendto(b'udp', u.getsockname()); print(u.recv(8)); u.close()\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()\n"
        "c.sendall(b'tcp'); print(a.recv(8)); [x.close() for x in (a, c, srv)]",
        "b'udp'\nb'tcp'\n",
    ),
    (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(7)\n"
        "print('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))",
        "fork 7\n",
    ),
    (
        "import asyncio\n"
        "async def echo(r, w):\n"
        "    w.write(await r.read(5)); await w.drain(); w.close()\n"
        "srv = await asyncio.start_server(echo, '127.0.0.1', 0)\n"
        "r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())\n"
        "w.write(b'aio'); await w.drain(); w.write_eof(); print(await r.read())\n"
        "w.close(); srv.close()\n"
        "p = await asyncio.create_subprocess_exec('true'); print('rc', await p.wait())",
        "b'aio'\nrc 0\n",
    ),
]


def test_ipykernel_runs_the_data_stack_under_the_filter(tmp_path: Path) -> None:
    spec_dir = tmp_path / "kernels" / "seccomp"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-c", KERNEL_PRE, str(SANDBOX_DIR), "{connection_file}"]
    spec = {"argv": argv, "display_name": "seccomp", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    work = tmp_path / "work"
    work.mkdir()
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = jupyter_client.KernelManager(kernel_name="seccomp", kernel_spec_manager=ksm)
    km.connection_file = str(tmp_path / "conn.json")
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    km.start_kernel(env=env, cwd=str(work))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        for code, want in CELLS:
            out: list[str] = []
            err: list[str] = []
            images: list[str] = []

            def hook(msg: dict, out: list = out, err: list = err, images: list = images) -> None:
                content = msg["content"]
                if msg["msg_type"] == "stream":
                    (out if content["name"] == "stdout" else err).append(content["text"])
                elif msg["msg_type"] == "display_data":
                    images.extend(k for k in content["data"] if k == "image/png")
                elif msg["msg_type"] == "error":
                    err.append("\n".join(content["traceback"]))

            reply = kc.execute_interactive(code, timeout=TIMEOUT, output_hook=hook)
            assert reply["content"]["status"] == "ok", "".join(err)
            assert "".join(out) == want, (code, "".join(err))
            assert images == (["image/png"] if "%matplotlib" in code else []), code
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
