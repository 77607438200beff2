"""Adversarial suite: attacks launched through the REST API, each of which must be CONTAINED.

Every attack runs as untrusted code in a code-executor session (one test drives a handler
agent's code at import time instead). Contained means, after each attack:

* the server process is alive, not stopped, and answers ``/runtime/health``;
* a *victim* session of the same package (``secret = 42`` and a file in its working dir, set
  up before any attack) keeps its kernel, its state and its file;
* nothing outside the attacker's own session changed: a snapshot (names, sizes, mtimes, hashes)
  of the state dir (package store included), the victim's working dir, canary files the test
  owns under /tmp and /etc, a root-only file and a few tracked repo files is identical, and no
  file named with the attack's token exists anywhere an attack tried to write;
* no process an attack spawned (each carries a unique marker in its argv) outlives its session.

The whole suite runs once per sandbox mode, each against one module-scoped server:

* ``bwrap``: everything this host offers (the default);
* ``unshare``: ``SANDBOX_BWRAP=none``, the util-linux ``unshare`` fallback;
* ``landlock``: ``SANDBOX_BWRAP=none SANDBOX_UNSHARE=none``, no namespaces at all: Landlock,
  seccomp, rlimits and cgroups only. The report states weaker guarantees there (kernels see the
  host's processes; without a reachable interpreter for the session uid they run as root
  without capabilities) and the tests hold the sandbox to exactly what it states.

An operator policy (``SANDBOX_CONFIG``) gives kernels a small file-size limit and pids cap so
that the disk and fork bombs stay cheap.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Client, Server, make_apkg, manifest_yaml, wait_for

REPO = Path(__file__).resolve().parents[2]
PKG = "pixell-python-agent@0.1.0"
CODE = f"{PKG}/code-executor"
EVIL_PKG = "evil-import@0.1.0"
EVIL = f"{EVIL_PKG}/attack"
FSIZE = 8 << 20  # the operator's RLIMIT_FSIZE for every kernel
PIDS = 128  # the operator's pids cap (cgroup pids.max and RLIMIT_NPROC) for tier "small"
VICTIM_TEXT = "the victim's own file\n"
# Tracked files nobody should touch while the suite runs (hashed before/after each attack).
REPO_FILES = (
    "pyproject.toml",
    "Makefile",
    "Dockerfile",
    "pixell_kernel_runtime/examples/pixell-python-agent/agent.yaml",
)

MODES: dict[str, dict[str, str]] = {
    "bwrap": {"SANDBOX_BWRAP": shutil.which("bwrap") or "/usr/bin/bwrap"},
    "unshare": {"SANDBOX_BWRAP": "none", "SANDBOX_UNSHARE": shutil.which("unshare") or "unshare"},
    "landlock": {"SANDBOX_BWRAP": "none", "SANDBOX_UNSHARE": "none"},
}
SANDBOX_WARNING = "WARNING pixell_kernel_runtime.sandbox:"


# --------------------------------------------------------------------------- host-side helpers


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def pids_with(marker: str) -> set[int]:
    """Live (non-zombie) host processes whose argv contains ``marker``."""
    found = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmd or _stat_fields(int(entry))[0] in ("Z", "X"):
                continue
        except (OSError, IndexError):
            continue
        found.add(int(entry))
    return found


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        return {line.split()[4] for line in fh}


BASELINE_MOUNTS = _mount_points()


def stray_mounts(roots: list[str]) -> list[str]:
    """Host mount points at or under ``roots`` that were not there when the module was loaded."""
    new = _mount_points() - BASELINE_MOUNTS
    return sorted(m for m in new if any(_under(m, r) for r in roots))


def detach_mounts(points: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for point in sorted(points, key=len, reverse=True):
        libc.umount2(point.encode(), 2)  # MNT_DETACH


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (mode, size, mtime_ns) of everything under ``root`` (no symlink follow)."""
    out: dict[str, tuple[int, int, int]] = {}
    if not os.path.lexists(root):
        return out
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc}"


@dataclass
class Ctx:
    mode: str
    server: Server
    client: Client
    secret: str
    token: str  # in the name of every file an attack tries to create
    mark: str  # digits: in the argv of every process an attack spawns (sleep 300.<mark>)
    base: Path
    root_only: Path
    tmp_canary: Path
    etc_canary: Path
    tcp: socket.socket
    udp: socket.socket
    report: dict[str, Any]
    victim_cwd: str = ""
    victim_conn: str = ""  # its connection file, in the root-owned server dir
    victim_pid: int = 0
    victim_pids: set[int] = field(default_factory=set)
    victim_ids: tuple[int, int] = (-1, -1)  # its kernel's (uid, gid)
    run_dir: str = ""
    sessions: list[tuple[str, str]] = field(default_factory=list)
    serial: int = 0

    @property
    def victim_dir(self) -> str:
        return os.path.dirname(self.victim_cwd)

    @property
    def mount_roots(self) -> list[str]:
        """Where a mount escaping the sandbox would land (all the test's own or /etc)."""
        return [str(self.base), str(self.tmp_canary.parent), "/etc"]

    @property
    def store(self) -> Path:
        return self.server.state_dir / "packages"

    @property
    def degraded(self) -> bool:
        """No namespaces: known from the mode the test chose, never from what the server
        reports (test_report_and_single_warning_match_the_mode holds the report to it)."""
        return self.mode == "landlock"

    def invoke(self, agent: str, input_: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
        resp = self.client.invoke(agent, input_, timeout=timeout)
        assert resp.status == 200, resp
        return resp.json()

    def session(self, package: str = PKG) -> str:
        self.serial += 1
        sid = f"attacker-{self.serial}"
        self.sessions.append((package, sid))
        return sid

    def delete_session(self, package: str, sid: str) -> None:
        """Delete an attacker session that exists (and forget it: contained() deletes the rest)."""
        resp = self.client.delete(f"/runtime/sessions/{quote(f'{package}:{sid}', safe='')}")
        assert resp.status == 200, resp
        if (package, sid) in self.sessions:
            self.sessions.remove((package, sid))

    def run(self, code: str, *, timeout: float = 30, sid: str | None = None) -> dict[str, Any]:
        """Run ``code`` in a fresh attacker session; the answer's ``output``."""
        sid = sid or self.session()
        answer = self.invoke(
            CODE, {"code": code, "session_id": sid, "timeout_seconds": timeout}, timeout + 60
        )
        return answer["output"]

    def params(self, **extra: Any) -> dict[str, Any]:
        return {
            "server_pid": self.server.proc.pid,
            "server_port": self.server.port,
            "token": self.token,
            "mark": self.mark,
            **extra,
        }


def attack_code(ctx: Ctx, body: str, **params: Any) -> str:
    """The attack ``body`` with ``P`` (parameters) and helpers defined; ``result = R``."""
    header = f"import json as _json\nP = _json.loads({json.dumps(ctx.params(**params))!r})\n"
    return header + PRELUDE + body + "\nresult = R\n"


# Defined in every attack cell: R collects "OK <repr>" or "ERR <exception>" per attempt.
PRELUDE = r"""
import ctypes, errno, os, signal, socket, subprocess, sys, time
R = {}

def attempt(name, fn, *args):
    try:
        value = fn(*args)
    except BaseException as exc:
        R[name] = "ERR " + type(exc).__name__ + ": " + str(exc)[:300]
    else:
        R[name] = "OK " + repr(value)

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.syscall.restype = ctypes.c_long

def checked(rc, what):
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))
    return rc

def run(*cmd):
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=15)
    if p.returncode != 0:
        raise OSError(p.returncode, (p.stderr or p.stdout).strip()[-300:])
    return p.stdout[-300:]

def read(path):
    with open(path, "rb") as fh:
        return fh.read().decode("latin-1")

def write(path, data="pwned"):
    with open(path, "w") as fh:
        fh.write(data)
    return path
"""


def results(output: dict[str, Any]) -> dict[str, str]:
    assert output["status"] == "success", output
    res = output["result"]
    assert isinstance(res, dict) and res, output
    return res


def assert_all_failed(res: dict[str, str], names: list[str] | None = None) -> None:
    names = list(res) if names is None else names
    missing = [n for n in names if n not in res]
    assert not missing, f"attempts that did not run: {missing}"
    succeeded = {n: res[n][:300] for n in names if not res[n].startswith("ERR")}
    assert not succeeded, f"attacks that SUCCEEDED: {json.dumps(succeeded, indent=1)}"


# --------------------------------------------------------------------------- containment


def snapshot(ctx: Ctx) -> dict[str, Any]:
    return {
        "state_dir": tree(ctx.server.state_dir),
        "victim_work": tree(Path(ctx.victim_cwd)),
        "victim_files": {
            n: tree(Path(ctx.victim_conn).parent / n)
            for n in ("connection.json", "sandbox.json", "kernel.log")
        },
        "victim_text": digest(Path(ctx.victim_cwd) / "victim.txt"),
        "tmp_canary": (tree(ctx.tmp_canary.parent), digest(ctx.tmp_canary)),
        "etc_canary": (tree(ctx.etc_canary), digest(ctx.etc_canary)),
        "root_only": (tree(ctx.root_only), digest(ctx.root_only)),
        "repo": {f: (tree(REPO / f), digest(REPO / f)) for f in REPO_FILES},
    }


def token_files(ctx: Ctx) -> list[str]:
    """Files named with the token anywhere an attack tried to create one."""
    dirs = [
        "/",
        "/etc",
        "/tmp",
        "/var/tmp",
        "/dev/shm",
        str(REPO),
        str(REPO / ".git"),
        str(REPO / "tests"),
        str(ctx.tmp_canary.parent),
        ctx.victim_dir,
        ctx.victim_cwd,
        os.path.dirname(ctx.victim_conn),
    ]
    found = [p for d in dirs for p in glob.glob(os.path.join(d, f"*{ctx.token}*"))]
    for root in (ctx.server.state_dir,):
        for dirpath, dirnames, filenames in os.walk(root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if ctx.token in n]
    return found


def nothing_arrived(ctx: Ctx) -> None:
    """The test's own TCP listener and UDP socket on loopback got nothing from any kernel."""
    try:
        got = ctx.udp.recvfrom(4096)
    except BlockingIOError:
        pass
    else:
        raise AssertionError(f"a UDP datagram crossed the sandbox: {got}")
    try:
        conn, peer = ctx.tcp.accept()
    except BlockingIOError:
        pass
    else:
        conn.close()
        raise AssertionError(f"a TCP connection crossed the sandbox from {peer}")


def udp_after_sentinel(ctx: Ctx) -> list[bytes]:
    """Send the test's own datagram to its UDP socket and read until it arrives: whatever came
    before it (from a kernel) is returned. Loopback delivers in order for one receiver."""
    sentinel = b"sentinel-" + secrets.token_hex(4).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(sentinel, ctx.udp.getsockname())
    before: list[bytes] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data, _ = ctx.udp.recvfrom(4096)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if data == sentinel:
            return before
        before.append(data)
    raise AssertionError(f"our own sentinel datagram never arrived (got {before})")


def server_alive(ctx: Ctx) -> None:
    pid = ctx.server.proc.pid
    assert ctx.server.proc.poll() is None, f"the server died:\n{ctx.server.logs()[-3000:]}"
    state = _stat_fields(pid)[0]
    assert state not in ("T", "t"), f"the server is stopped/traced (state {state})"
    resp = ctx.client.get("/runtime/health", timeout=10)
    assert resp.status == 200 and resp.json()["status"] == "healthy", resp


def victim_intact(ctx: Ctx) -> None:
    answer = ctx.invoke(
        CODE,
        {
            "code": "import os\nresult = [secret, open('victim.txt').read(), os.getcwd()]",
            "session_id": "victim",
            "timeout_seconds": 20,
        },
    )
    out = answer["output"]
    assert out["status"] == "success", out
    assert out["session_restarted"] is False, out
    assert out["result"] == [42, VICTIM_TEXT, ctx.victim_cwd], out
    sessions = {s["id"]: s for s in ctx.client.get("/runtime/sessions").json()["sessions"]}
    victim = sessions[f"{PKG}:victim"]
    assert victim["kernel_pid"] == ctx.victim_pid and victim["restarts"] == 0, victim
    for pid in ctx.victim_pids:
        assert os.path.exists(f"/proc/{pid}"), f"victim process {pid} is gone"


@contextlib.contextmanager
def contained(ctx: Ctx) -> Iterator[None]:
    """Snapshot; the attack; then every containment check, and the attacker sessions deleted."""
    before = snapshot(ctx)
    yield
    server_alive(ctx)
    after = snapshot(ctx)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"changed outside the attacker's session: {changed}"
    created = token_files(ctx)
    for path in created:  # so that one breach does not fail every later test
        with contextlib.suppress(OSError):
            os.unlink(path)
    assert not created, f"attack files created: {created}"
    victim_intact(ctx)
    for package, sid in list(ctx.sessions):
        ctx.delete_session(package, sid)
    assert not ctx.sessions
    wait_for(lambda: not pids_with(ctx.mark), 5.0)
    leftovers = pids_with(ctx.mark)
    kill_pids(leftovers)
    assert not leftovers, f"attack processes outlived their session: {leftovers}"
    server_alive(ctx)


# --------------------------------------------------------------------------- the server


EVIL_MAIN = r'''
"""Runs its attacks when imported, keeps what happened, and answers with it."""
import ctypes
import os
import signal
import socket

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _attempt(results, name, fn, *args):
    try:
        value = fn(*args)
    except BaseException as exc:
        results[name] = "ERR " + type(exc).__name__ + ": " + str(exc)[:300]
    else:
        results[name] = "OK " + repr(value)


def _read(path):
    with open(path, "rb") as fh:
        return fh.read().decode("latin-1")


def _write(path):
    with open(path, "w") as fh:
        fh.write("pwned")
    return path


def _connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return port


def _ptrace(pid):
    if libc.ptrace(16, pid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


def server_pids():
    """Python processes running the runtime's server, as far as /proc shows them: pairs of
    (pid, is it the test's own server)."""
    found = []
    mine = os.environ.get("ATTACK_STATE_DIR", "missing")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = _read(f"/proc/{entry}/cmdline").split("\0")
        except OSError:
            continue
        if any("pixell_kernel_runtime" in a for a in argv) and "serve" in argv:
            found.append((int(entry), mine in argv))
    return found


def attacks(known_pid):
    scanned = server_pids()
    r = {"scanned_pids": [pid for pid, _ in scanned], "environ": dict(os.environ)}
    token = os.environ.get("ATTACK_TOKEN", "missing")
    # Signals and ptrace only at the test's own server, even if other runtimes are visible.
    pids = sorted({pid for pid, mine in scanned if mine} | {known_pid})
    walked = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            for what in ("environ", "cmdline"):
                try:
                    walked[f"{entry}/{what}"] = _read(f"/proc/{entry}/{what}")
                except OSError as exc:
                    walked[f"{entry}/{what}"] = "ERR " + repr(exc)
    r["walked"] = walked
    _attempt(r, "read /proc/1/environ", _read, "/proc/1/environ")
    for pid in pids:
        _attempt(r, f"read /proc/{pid}/environ", _read, f"/proc/{pid}/environ")
        _attempt(r, f"ptrace {pid}", _ptrace, pid)
        _attempt(r, f"SIGSTOP {pid}", os.kill, pid, signal.SIGSTOP)
        _attempt(r, f"SIGKILL {pid}", os.kill, pid, signal.SIGKILL)
    _attempt(r, "write /etc", _write, f"/etc/pkrpwn-{token}-handler")
    _attempt(r, "tcp connect", _connect, int(os.environ.get("ATTACK_TCP_PORT", "1")))
    _attempt(r, "tcp runtime", _connect, int(os.environ.get("ATTACK_SERVER_PORT", "1")))
    return r


IMPORT_RESULTS = attacks(int(os.environ.get("ATTACK_SERVER_PID", "0")))


def attack(data):
    return {
        "import": IMPORT_RESULTS,
        "call": attacks(int(data.get("server_pid", 0))),
        "uid": os.getuid(),
        "gid": os.getgid(),
    }
'''


def _write_evil_package(ctx: Ctx) -> Path:
    manifest = manifest_yaml(
        "evil-import",
        entrypoint="main:attack",
        environment={
            "ATTACK_TOKEN": ctx.token,
            "ATTACK_TCP_PORT": str(ctx.tcp.getsockname()[1]),
            "ATTACK_SERVER_PORT": str(ctx.server.port),
            "ATTACK_SERVER_PID": str(ctx.server.proc.pid),
            "ATTACK_STATE_DIR": str(ctx.server.state_dir),
            # A package must never get the server's variables, interpolated or not.
            "LEAK": "${PIXELL_TEST_SECRET:-not-leaked}",
        },
        metadata={
            "version": "0.1.0",
            "sub_agents": [{"name": "attack", "description": "x", "endpoint": "main:attack"}],
        },
    )
    return make_apkg(ctx.base / "evil.apkg", {"agent.yaml": manifest, "main.py": EVIL_MAIN})


@pytest.fixture(scope="module", params=list(MODES))
def ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    mode = request.param
    base = tmp_path_factory.mktemp(f"attacks-{mode}")
    token = secrets.token_hex(6)
    mark = str(random.randrange(10**8, 10**9))
    secret = "pkrsecret" + secrets.token_hex(16)
    root_only = base / "root-only.txt"
    root_only.write_text(secret)
    root_only.chmod(0o600)
    tmp_canary = Path(f"/tmp/pkr-canary-{secrets.token_hex(4)}") / "canary.txt"
    tmp_canary.parent.mkdir(mode=0o755)
    tmp_canary.write_text("tmp canary\n")
    etc_dir = Path("/etc") if os.access("/etc", os.W_OK) else base / "etc"
    etc_dir.mkdir(exist_ok=True)
    etc_canary = etc_dir / f"pkr-canary-{secrets.token_hex(4)}"
    etc_canary.write_text("etc canary\n")
    config = base / "sandbox-policy.json"
    config.write_text(json.dumps({"limits": {"fsize": FSIZE}, "tiers": {"small": {"pids": PIDS}}}))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    env = {"PIXELL_TEST_SECRET": secret, "SANDBOX_CONFIG": str(config), **MODES[mode]}
    # The usage ledger changes with every call the server meters (its own writes): out of the
    # state dir, whose every byte the attacks must leave as it was.
    (base / "ledger").mkdir()
    env["METERING_DB"] = str(base / "ledger" / "metering.db")
    server = Server(base / "state", ["--examples"], env)
    c: Ctx | None = None
    try:
        server.start()
        c = Ctx(
            mode=mode,
            server=server,
            client=server.client,
            secret=secret,
            token=token,
            mark=mark,
            base=base,
            root_only=root_only,
            tmp_canary=tmp_canary,
            etc_canary=etc_canary,
            tcp=tcp,
            udp=udp,
            report=server.client.get("/runtime/sandbox").json(),
        )
        assert server.client.load(_write_evil_package(c)).status == 200
        out = c.invoke(
            CODE,
            {
                "code": "import os\nsecret = 42\nopen('victim.txt', 'w').write("
                f"{VICTIM_TEXT!r})\nresult = os.getcwd()",
                "session_id": "victim",
            },
        )["output"]
        assert out["status"] == "success", out
        c.victim_cwd = out["result"]
        c.run_dir = str(Path(c.victim_cwd).parents[2])
        sessions = server.client.get("/runtime/sessions").json()["sessions"]
        victim = next(s for s in sessions if s["session_id"] == "victim")
        c.victim_pid, c.victim_conn = victim["kernel_pid"], victim["connection_file"]
        c.victim_pids = {c.victim_pid} | pids_with(c.victim_conn)
        assert Path(c.victim_cwd, "victim.txt").read_text() == VICTIM_TEXT
        ids = c.invoke(
            CODE, {"code": "import os\nresult = [os.getuid(), os.getgid()]", "session_id": "victim"}
        )["output"]
        assert ids["status"] == "success", ids
        c.victim_ids = tuple(ids["result"])
        yield c
    finally:
        # Every step runs whatever the one before did: a server that fails to stop must not
        # leave processes, mounts or canaries behind.
        tcp.close()
        udp.close()
        stop_error: BaseException | None = None
        if server.proc is not None:
            with contextlib.suppress(OSError):
                os.kill(server.proc.pid, signal.SIGCONT)  # in case an attack froze it
            try:
                server.stop()
            except BaseException as exc:  # noqa: BLE001 - reported after the cleanup
                stop_error = exc
        leftovers = pids_with(mark)
        mounts = stray_mounts([str(base), str(tmp_canary.parent), "/etc"])
        detach_mounts(mounts)
        if c is not None and c.run_dir:
            leftovers |= pids_with(c.run_dir)
        kill_pids(leftovers)
        created = token_files(c) if c is not None and c.victim_cwd else []
        shutil.rmtree(tmp_canary.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc_canary.unlink()
        for path in created + [
            p for d in ("/etc", "/tmp", "/dev/shm", "/") for p in glob.glob(f"{d}/*{token}*")
        ]:
            with contextlib.suppress(OSError):
                os.unlink(path)
        assert not mounts, f"mounts made by attacks on the host (detached): {mounts}"
        assert not leftovers, f"kernel or attack processes outlived the server: {leftovers}"
        if stop_error is not None:
            raise stop_error


# --------------------------------------------------------------------------- the report


def test_report_and_single_warning_match_the_mode(ctx: Ctx) -> None:
    rep = ctx.report
    layers = rep["layers"]
    warnings = [line for line in ctx.server.logs().splitlines() if SANDBOX_WARNING in line]
    assert rep["mode"] == "best_effort"
    assert rep["verified"]["ok"] is True, rep["verified"]
    for name in ("clean_env", "rlimits", "seccomp", "cgroups", "network_isolation"):
        assert layers[name]["enabled"] is True, (name, layers[name])
    if ctx.mode == "bwrap":
        assert rep["isolation"] == "bwrap" and layers["bwrap"]["enabled"] is True, rep
        assert layers["uid"]["enabled"] is True and layers["network_isolation"]["method"] == (
            "namespace"
        )
        assert rep["missing"] == [] and warnings == [], (rep["missing"], warnings)
        return
    # Degraded: bwrap is not in force, and ONE warning line names what is missing.
    assert layers["bwrap"]["enabled"] is False and layers["bwrap"]["reason"], layers["bwrap"]
    assert len(warnings) == 1, warnings
    assert "degraded" in warnings[0] and "bwrap" in warnings[0], warnings[0]
    for name in rep["missing"]:
        assert name in warnings[0], (name, warnings[0])
    if ctx.mode == "unshare":
        assert rep["isolation"] == "unshare" and layers["unshare"]["enabled"] is True, rep
        assert layers["uid"]["enabled"] is True
        assert layers["network_isolation"]["method"] == "namespace"
        assert rep["missing"] == ["bwrap"], rep["missing"]
        assert "unshare fallback" in warnings[0]
    else:
        # No namespaces: what the report promises instead, and what the tests below hold it to.
        assert rep["isolation"] == "none" and layers["unshare"]["enabled"] is False, rep
        assert layers["landlock"]["enabled"] is True, layers["landlock"]
        assert layers["network_isolation"]["method"] == "landlock+seccomp"
        assert layers["server_undumpable"]["enabled"] is True
        assert "namespaces (bwrap and unshare)" in rep["missing"]
        assert "Kernels see host processes and paths" in warnings[0]
        # A fact of this host and CI: the interpreter is a pyenv under 0700 /root, which a
        # pool uid cannot search; without namespaces to bind it elsewhere the kernel keeps
        # uid 0 (no capabilities) and gets a gid of its own.
        exe = Path(os.path.realpath(sys.executable))
        unreachable = [str(d) for d in exe.parents if not os.stat(d).st_mode & 0o001]
        assert unreachable, f"{exe} is reachable by any uid: this host is not the one described"
        assert layers["uid"]["enabled"] is False and layers["uid"]["gid_only"] is True, layers
        assert "keep uid 0 without any capability" in warnings[0], warnings[0]
        assert "a gid of its own" in warnings[0], warnings[0]


# --------------------------------------------------------------------------- attacks


def test_server_environment_and_root_only_files_stay_unread(ctx: Ctx) -> None:
    body = r"""
for path in ("/proc/%d/environ" % P["server_pid"], "/proc/1/environ", "/proc/self/environ",
             "/proc/%d/cmdline" % P["server_pid"], "/etc/shadow", P["root_only"]):
    attempt("read " + path, read, path)
walked = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        for what in ("environ", "cmdline"):
            try:
                walked[entry + "/" + what] = read("/proc/%s/%s" % (entry, what))
            except OSError as exc:
                walked[entry + "/" + what] = "ERR " + repr(exc)
R["walked"] = repr(walked)
R["own_environ"] = repr(dict(os.environ))
"""
    code = attack_code(ctx, body, root_only=str(ctx.root_only))
    sid = ctx.session()
    with contained(ctx):
        resp = ctx.client.invoke(CODE, {"code": code, "session_id": sid, "timeout_seconds": 30})
        assert resp.status == 200, resp
        # The whole answer, every process's environ and cmdline included, lacks the secret.
        assert ctx.secret.encode() not in resp.body
        res = results(resp.json()["output"])
        walked = res["walked"]
        assert "ipykernel" in walked, "the walk did not even see the kernel's own cmdline"
        pid = ctx.server.proc.pid
        must_fail = [
            f"read /proc/{pid}/environ",
            "read /proc/1/environ",
            "read /etc/shadow",
            f"read {ctx.root_only}",
        ]
        assert_all_failed(res, must_fail)
        if ctx.degraded:
            # Stated: without a pid namespace kernels see host processes (their argv) ...
            assert f"'{pid}/cmdline'" in walked
            # ... but the server is undumpable: its environ stays closed.
            assert ctx.report["layers"]["server_undumpable"]["enabled"] is True
        else:
            # A pid namespace: the server is not even visible.
            assert res[f"read /proc/{pid}/cmdline"].startswith("ERR FileNotFoundError")
            assert f"'{pid}/" not in walked


def test_ptrace_and_signals_cannot_reach_server_or_victim(ctx: Ctx) -> None:
    body = r"""
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
def ptrace(req, pid):
    return checked(-1 if libc.ptrace(req, pid, None, None) != 0 else 0, "ptrace")
def pidfd_signal(pid, sig):
    fd = checked(libc.syscall(434, pid, 0), "pidfd_open")
    try:
        return checked(libc.syscall(424, fd, sig, None, 0), "pidfd_send_signal")
    finally:
        os.close(fd)
targets = [P["server_pid"]] + P["victims"]
for pid in targets:
    attempt("PTRACE_ATTACH %d" % pid, ptrace, PTRACE_ATTACH, pid)
    attempt("PTRACE_SEIZE %d" % pid, ptrace, PTRACE_SEIZE, pid)
attempt("SIGSTOP server", os.kill, P["server_pid"], signal.SIGSTOP)
attempt("SIGKILL server", os.kill, P["server_pid"], signal.SIGKILL)
attempt("pidfd SIGKILL server", pidfd_signal, P["server_pid"], signal.SIGKILL)
for pid in P["victims"]:
    attempt("SIGKILL victim %d" % pid, os.kill, pid, signal.SIGKILL)
    attempt("pidfd SIGKILL victim %d" % pid, pidfd_signal, pid, signal.SIGKILL)
"""
    victims = sorted(ctx.victim_pids)
    with contained(ctx):
        res = results(ctx.run(attack_code(ctx, body, victims=victims)))
        assert len(res) == 2 * (1 + len(victims)) + 3 + 2 * len(victims)
        # Every kill and ptrace call failed: no signal was sent, nothing to wait for.
        assert_all_failed(res)
        server_alive(ctx)


def test_other_sessions_store_etc_and_repo_are_out_of_reach(ctx: Ctx) -> None:
    # The store: ids/<id> -> objects/<sha256>/{record.json, pkg/}; a kernel gets its own pkg/
    # bound read-only and nothing else of the store.
    own_root = (ctx.store / "ids" / PKG / "pkg").resolve()
    other_pkg = ctx.store / "ids" / "hello-handler@0.1.0" / "pkg"
    assert (other_pkg / "agent.yaml").is_file() and (other_pkg / ".env").is_file()
    assert (own_root.parent / "record.json").is_file()
    params = {
        "victim_cwd": ctx.victim_cwd,
        "victim_dir": ctx.victim_dir,
        "victim_conn": ctx.victim_conn,
        "store": str(ctx.store),
        "other_pkg": str(other_pkg),
        "own_roots": [str(ctx.store / "ids" / PKG / "pkg"), str(own_root)],
        "state_dir": str(ctx.server.state_dir),
        "tmp_canary": str(ctx.tmp_canary),
        "etc_canary": str(ctx.etc_canary),
        "repo": str(REPO),
    }
    body = r"""
T = "pkrpwn-" + P["token"]
V = P["victim_cwd"]
attempt("list victim work", os.listdir, V)
attempt("read victim file", read, V + "/victim.txt")
attempt("read victim connection", read, P["victim_conn"])
attempt("write victim file", write, V + "/victim.txt")
attempt("create in victim work", write, V + "/" + T)
def via_symlink():
    link = os.path.join(os.getcwd(), T + "-link")
    os.symlink(V + "/victim.txt", link)
    try:
        return read(link)
    finally:
        os.unlink(link)
attempt("read victim via symlink", via_symlink)
def via_hardlink(src):
    dst = os.path.join(os.getcwd(), T + "-hard")
    os.link(src, dst)
    try:
        with open(dst, "a") as fh:
            return fh.write("pwned")
    finally:
        os.unlink(dst)
attempt("hardlink etc canary", via_hardlink, P["etc_canary"])
R["store walk"] = sorted(
    os.path.join(d, n) for d, dirs, files in os.walk(P["store"]) for n in dirs + files
)
attempt("read other package", read, P["other_pkg"] + "/agent.yaml")
attempt("read other package .env", read, P["other_pkg"] + "/.env")
attempt("read own store record", read, P["own_roots"][1] + "/../record.json")
attempt("create in store", write, P["store"] + "/" + T)
attempt("create in state dir", write, P["state_dir"] + "/" + T)
for i, root in enumerate(P["own_roots"]):
    attempt("create in own package %d" % i, write, root + "/" + T)
attempt("create in /etc", write, "/etc/" + T)
attempt("overwrite etc canary", write, P["etc_canary"])
attempt("overwrite tmp canary", write, P["tmp_canary"])
attempt("unlink tmp canary", os.unlink, P["tmp_canary"])
attempt("create in /tmp", write, "/tmp/" + T)
attempt("create in /", write, "/" + T)
attempt("create in repo", write, P["repo"] + "/" + T)
attempt("create in .git", write, P["repo"] + "/.git/" + T)
def open_for_write(path):  # never writes: the attempt alone must fail
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    return "opened"
attempt("open tracked file for writing", open_for_write, P["repo"] + "/pyproject.toml")
attempt("open .git/config for writing", open_for_write, P["repo"] + "/.git/config")
"""
    with contained(ctx):
        res = results(ctx.run(attack_code(ctx, body, **params)))
        # The kernel sees, of the store, its own package and the directories leading to it.
        seen = res.pop("store walk")
        own = str(own_root)
        strays = [p for p in seen if not (_under(p, own) or own.startswith(p + "/"))]
        assert not strays, strays
        assert_all_failed(res)
        assert VICTIM_TEXT.strip() not in json.dumps(res)


def test_network_egress_reaches_nothing(ctx: Ctx) -> None:
    body = r"""
def connect(host, port, timeout=2.0):
    with socket.create_connection((host, port), timeout=timeout) as s:
        return s.getpeername()
def http_get(port):
    import urllib.request
    return urllib.request.urlopen("http://127.0.0.1:%d/runtime/health" % port, timeout=2).read()
def udp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(3):
            s.sendto(b"pkr-udp-" + P["token"].encode(), ("127.0.0.1", port))
        return "sent"
attempt("tcp test listener", connect, "127.0.0.1", P["tcp_port"])
attempt("tcp runtime port", connect, "127.0.0.1", P["server_port"])
attempt("http runtime health", http_get, P["server_port"])
attempt("tcp 10.255.255.1:80", connect, "10.255.255.1", 80, 1.0)
attempt("udp sendto", udp, P["udp_port"])
"""
    params = {"tcp_port": ctx.tcp.getsockname()[1], "udp_port": ctx.udp.getsockname()[1]}
    with contained(ctx):
        res = results(ctx.run(attack_code(ctx, body, **params)))
        assert_all_failed(res, [n for n in res if n != "udp sendto"])
        if ctx.degraded:
            # Without a network namespace seccomp denies UDP sockets outright (stated).
            assert res["udp sendto"].startswith("ERR PermissionError"), res["udp sendto"]
        elif ctx.mode == "bwrap":
            # bwrap brings up the namespace's own loopback: the datagrams go there.
            assert res["udp sendto"] == "OK 'sent'", res["udp sendto"]
        else:
            # unshare leaves the new namespace's loopback down: no route at all.
            assert "[Errno 101] Network is unreachable" in res["udp sendto"], res["udp sendto"]
        # Our own datagram, sent now, is the first (and only) one our socket gets.
        assert udp_after_sentinel(ctx) == [], "UDP datagrams crossed the sandbox"
        nothing_arrived(ctx)


def test_memory_bomb_raises_memory_error_and_the_session_goes_on(ctx: Ctx) -> None:
    sid = ctx.session()

    def bombed(out: dict[str, Any]) -> None:
        # RLIMIT_DATA sits below the cgroup's memory limit: Python sees MemoryError, the
        # kernel lives on (the README's promise), no OOM kill.
        assert out["status"] == "error", out
        assert out["exception"]["ename"] == "MemoryError", out
        assert out.get("state_lost") is not True and "kernel_exit" not in out, out

    with contained(ctx):
        started = time.monotonic()
        bombed(ctx.run("x = bytearray(30 * 2**30)", sid=sid))
        # Bounded at 8 GiB touched: far past any tier here, far below what the host holds.
        grow = "chunks = []\nfor _ in range(8192):\n    chunks.append(b'\\x01' * 2**20)\n"
        bombed(ctx.run(grow, sid=sid))
        assert time.monotonic() - started < 60
        server_alive(ctx)
        after = ctx.run("chunks = None\nresult = 6 * 7", sid=sid)
        assert after["status"] == "success" and after["result"] == 42, after
        assert after["session_restarted"] is False, after


def test_fork_bomb_is_capped_and_its_children_die_with_the_session(ctx: Ctx) -> None:
    body = r"""
forked, error = 0, None
for _ in range(5000):
    try:
        pid = os.fork()
    except OSError as exc:
        error = repr(exc)
        break
    if pid == 0:
        try:
            os.execv("/bin/sleep", ["sleep", "30." + P["mark"]])
        finally:
            time.sleep(30)
            os._exit(0)
    forked += 1
print("forked", forked, "then", error)
R["forked"] = forked
R["error"] = error
"""
    sid = ctx.session()
    with contained(ctx):
        out = ctx.run(attack_code(ctx, body), sid=sid, timeout=60)
        assert out["status"] == "success", out
        forked = out["result"]["forked"]
        assert out["stdout"].startswith(f"forked {forked} then "), out["stdout"]
        assert (
            out["result"]["error"]
            and "Resource temporarily unavailable" in (out["result"]["error"])
        )
        assert 0 < forked < PIDS, forked  # the operator's pids cap, far below 5000
        assert wait_for(lambda: len(pids_with(f"30.{ctx.mark}")) == forked, 10), (
            forked,
            len(pids_with(f"30.{ctx.mark}")),
        )
        server_alive(ctx)
        ctx.delete_session(PKG, sid)
        assert wait_for(lambda: not pids_with(f"30.{ctx.mark}"), 5), pids_with(ctx.mark)


def test_disk_fill_stops_at_the_file_size_limit(ctx: Ctx) -> None:
    body = r"""
import resource
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
R["limit"] = list(limit)
chunk = b"\0" * (1 << 20)
def fill(path):
    written = 0
    with open(path, "wb", buffering=0) as fh:
        for _ in range(int(1.2 * limit[0]) // len(chunk) + 1):  # at most ~1.2 x the limit
            written += fh.write(chunk)
    return written
attempt("fill work dir", fill, "big-" + P["token"] + ".bin")
R["size"] = os.path.getsize("big-" + P["token"] + ".bin")
R["cwd"] = os.getcwd()
attempt("fill /dev/shm", fill, "/dev/shm/pkrpwn-" + P["token"])
attempt("fill /tmp", fill, "/tmp/pkrpwn-" + P["token"])
"""
    sid = ctx.session()
    with contained(ctx):
        out = ctx.run(attack_code(ctx, body), sid=sid)
        res = results(out)
        assert res["limit"] == [FSIZE, FSIZE], res
        assert res["fill work dir"].startswith("ERR OSError: [Errno 27] File too large"), res
        assert res["size"] <= FSIZE, res
        assert os.path.getsize(Path(res["cwd"]) / f"big-{ctx.token}.bin") <= FSIZE
        assert res["fill /dev/shm"].startswith("ERR"), res
        assert res["fill /tmp"].startswith("ERR"), res


def test_cpu_spin_times_out_while_the_server_stays_responsive(ctx: Ctx) -> None:
    sid = ctx.session()
    with contained(ctx):
        holder: dict[str, Any] = {}

        def spin() -> None:
            holder["out"] = ctx.run("while True:\n    pass", sid=sid, timeout=2)

        worker = threading.Thread(target=spin)
        started = time.monotonic()
        worker.start()
        latencies = []
        while worker.is_alive():
            t0 = time.monotonic()
            assert ctx.client.get("/runtime/health", timeout=5).status == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        worker.join()
        elapsed = time.monotonic() - started
        out = holder["out"]
        assert out["status"] == "error" and out["error"] == "timeout", out
        # The deadline fired (not before its 2 s, and long before the 90 s call timeout), and
        # the server answered health all along (each probe within its own 5 s timeout).
        # How fast it answered is the benchmarks' business, not a test's.
        assert 2 <= elapsed < 60, elapsed
        assert len(latencies) >= 10, latencies
        after = ctx.run("result = 'alive'", sid=sid)
        assert after["status"] == "success" and after["result"] == "alive", after


def test_setsid_children_and_daemons_die_with_their_session(ctx: Ctx) -> None:
    body = r"""
child = subprocess.Popen(["sleep", "300." + P["mark"]], start_new_session=True)
R["popen"] = child.pid
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "301." + P["mark"]])
    finally:
        os._exit(0)
os.waitpid(pid, 0)
R["daemonized"] = True
"""
    sid = ctx.session()
    with contained(ctx):
        out = ctx.run(attack_code(ctx, body), sid=sid)
        assert out["status"] == "success", out
        assert wait_for(lambda: len(pids_with(ctx.mark)) == 2, 5), pids_with(ctx.mark)
        sessions = {p: _stat_fields(p)[3] for p in pids_with(ctx.mark)}  # session ids
        assert len(set(sessions.values())) == 2, sessions  # both left the kernel's session
        ctx.delete_session(PKG, sid)
        assert wait_for(lambda: not pids_with(ctx.mark), 5), pids_with(ctx.mark)


def test_remounting_and_new_namespaces_are_refused(ctx: Ctx) -> None:
    body = r"""
MS_REMOUNT, MS_BIND, MS_RDONLY = 32, 4096, 1
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
def mount(src, target, fstype, flags):
    return checked(libc.mount(src, target, fstype, ctypes.c_ulong(flags), None), "mount")
def unshare(flags):
    return checked(libc.unshare(flags), "unshare")
attempt("mount -o remount,rw /", run, "mount", "-o", "remount,rw", "/")
attempt("ctypes remount / rw", mount, None, b"/", None, MS_REMOUNT | MS_BIND)
# Targets the test owns (its own package in the test's store), never a host directory.
attempt("ctypes tmpfs over own package", mount, b"tmpfs", P["own_root"].encode(), b"tmpfs", 0)
attempt("ctypes bind work over own package", mount, os.getcwd().encode(),
        P["own_root"].encode(), None, MS_BIND)
attempt("unshare -r", run, "unshare", "-r", "true")
attempt("unshare -rm remount", run, "unshare", "-rm", "sh", "-c",
        "mount -o remount,rw / && touch /pkrpwn-" + P["token"])
attempt("unshare(NEWUSER)", unshare, CLONE_NEWUSER)
attempt("unshare(NEWNS)", unshare, CLONE_NEWNS)
attempt("unshare(NEWUSER|NEWNS)", unshare, CLONE_NEWUSER | CLONE_NEWNS)
attempt("unshare(NEWNET)", unshare, CLONE_NEWNET)
attempt("unshare(NEWPID)", unshare, CLONE_NEWPID)
attempt("chroot", lambda: checked(libc.chroot(b"/tmp"), "chroot"))
attempt("write /", write, "/pkrpwn-" + P["token"])
attempt("write /etc", write, "/etc/pkrpwn-" + P["token"])
# Privileges: no uid 0 with power, no way out of the cgroups or past the hard rlimits.
import resource
def become_root():
    if os.geteuid() != 0:
        os.setgid(0)
        os.setuid(0)
    else:  # root without capabilities (no uid drop): even this needs CAP_SETGID
        os.setgroups([0])
    return os.geteuid()
attempt("become root", become_root)
for ctrl in ("memory", "pids", "cpu", "unified"):
    attempt("join root cgroup " + ctrl, write, "/sys/fs/cgroup/%s/cgroup.procs" % ctrl,
            str(os.getpid()))
for name in ("RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_CPU"):
    res = getattr(resource, name)
    attempt("raise " + name, resource.setrlimit, res, (resource.RLIM_INFINITY,) * 2)
attempt("su root", run, "su", "-c", "id")
status = dict(line.split(":\t", 1) for line in read("/proc/self/status").splitlines()
              if line.startswith(("CapEff", "CapPrm", "NoNewPrivs", "Seccomp:")))
R["status"] = {k: v.strip() for k, v in status.items()}
"""
    own_root = str((ctx.store / "ids" / PKG / "pkg").resolve())
    with contained(ctx):
        res = results(ctx.run(attack_code(ctx, body, own_root=own_root)))
        status = res.pop("status")
        assert status == {
            "CapEff": "0000000000000000",
            "CapPrm": "0000000000000000",
            "NoNewPrivs": "1",
            "Seccomp": "2",
        }, status
        assert_all_failed(res)
        assert not stray_mounts(ctx.mount_roots), stray_mounts(ctx.mount_roots)


def test_handler_import_time_attacks_fail(ctx: Ctx) -> None:
    sid = ctx.session(EVIL_PKG)
    with contained(ctx):
        resp = ctx.client.invoke(EVIL, {"session_id": sid, "server_pid": ctx.server.proc.pid})
        assert resp.status == 200, resp
        assert ctx.secret.encode() not in resp.body
        out = resp.json()["output"]
        assert set(out) >= {"import", "call"}, out
        pid = ctx.server.proc.pid
        for phase in ("import", "call"):
            r = out[phase]
            assert r["environ"]["ATTACK_TOKEN"] == ctx.token, r["environ"]  # it really ran
            assert r["environ"]["LEAK"] == "not-leaked", r["environ"]
            attempts = [n for n, v in r.items() if isinstance(v, str) and n != "scanned_pids"]
            assert f"SIGKILL {pid}" in attempts and f"ptrace {pid}" in attempts, attempts
            assert_all_failed(r, attempts)
            if ctx.degraded:
                assert pid in r["scanned_pids"], r["scanned_pids"]  # host processes visible
            else:
                assert r["scanned_pids"] == [], r["scanned_pids"]
        # The attacker ran under ids of its own, never the victim's (nor root's, but where the
        # report says the kernel keeps uid 0 for want of a reachable interpreter).
        start, end = ctx.report["layers"]["uid"]["range"]
        ids = (out["uid"], out["gid"])
        assert out["gid"] != ctx.victim_ids[1] and start <= out["gid"] <= end, (ids, ctx.victim_ids)
        if ctx.mode == "landlock":
            assert ids[0] == ctx.victim_ids[0] == 0, (ids, ctx.victim_ids)  # gid_only, stated
        else:
            assert out["uid"] != ctx.victim_ids[0] and start <= out["uid"] <= end, ids
        nothing_arrived(ctx)
        server_alive(ctx)


# --------------------------------------------------------------------------- other modes


def test_strict_mode_starts_with_every_layer(server_factory: Callable[..., Server]) -> None:
    srv = server_factory(["--sandbox", "strict"], MODES["bwrap"])
    rep = srv.client.get("/runtime/sandbox").json()
    assert rep["mode"] == "strict" and rep["isolation"] == "bwrap", rep
    assert rep["missing"] == [], rep["missing"]
    for name in ("bwrap", "uid", "rlimits", "seccomp", "cgroups", "network_isolation"):
        assert rep["layers"][name]["enabled"] is True, (name, rep["layers"][name])
    assert SANDBOX_WARNING not in srv.logs()


def test_off_mode_warns_loudly(server_factory: Callable[..., Server]) -> None:
    srv = server_factory(["--sandbox", "off"])
    rep = srv.client.get("/runtime/sandbox").json()
    assert rep["mode"] == "off", rep
    assert not any(layer["enabled"] for layer in rep["layers"].values()), rep["layers"]
    warnings = [line for line in srv.logs().splitlines() if SANDBOX_WARNING in line]
    assert len(warnings) == 1 and "SANDBOX OFF" in warnings[0], warnings
    assert "UNCONFINED" in warnings[0] and "untrusted" in warnings[0], warnings[0]
