"""The server as an unprivileged user: what the sandbox keeps, what it loses (docs/deploy.md).

The wheel built from this checkout goes into a venv of Debian's own python3 (the developers'
interpreter lives under a 0700 /root, which no other user can execute), and `pixell-kernel-runtime
serve --examples` runs as the system user ``pkr-test`` through setpriv, as a hardened unit would
start it: no capabilities, an empty bounding set, no_new_privs. The code executor then runs over
REST and /runtime/sandbox is read. The same venv served by root is the control. Needs root (to
create the user and hand it a directory); CI runs as root, and what is missing is installed with
apt-get, as the Makefile does. Run with -s to see the FIGURES lines docs/deploy.md quotes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import REPO, Client, free_port, process_tree, wait_for

pytestmark = pytest.mark.timeout(1500)

USER = "pkr-test"
SYSTEM_PYTHON = "/usr/bin/python3"
CODE = "pixell-python-agent@0.1.0/code-executor"
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
NO_NAMESPACES = {"SANDBOX_BWRAP": "none", "SANDBOX_UNSHARE": "none"}
# What a kernel reports about itself and about what it can reach (SERVER_LOG, PORT set first).
PROBE = r"""
import os, socket
st = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
work = os.getcwd()
def attempt(fn):
    try:
        return fn()
    except OSError as exc:
        return type(exc).__name__
result = {
    "uid": os.getuid(), "pid": os.getpid(), "seccomp": st["Seccomp"].strip(),
    "no_new_privs": st["NoNewPrivs"].strip(), "cap_eff": st["CapEff"].strip(),
    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "cgroup": [x for x in open("/proc/self/cgroup").read().splitlines() if x[:3] == "0::"][0],
    "own": os.path.basename(os.path.dirname(work)),
    "sessions": attempt(lambda: sorted(os.listdir(os.path.dirname(os.path.dirname(work))))),
    "server_log": attempt(lambda: len(open(SERVER_LOG).read())),
    "server_port": attempt(lambda: socket.create_connection(("127.0.0.1", PORT), 1).close()),
}
"""
PEEK = """
def peek(pid):
    try:
        return len(open(f"/proc/{pid}/environ", "rb").read())
    except OSError as exc:
        return type(exc).__name__
"""


@dataclass
class Host:
    venv: Path
    base: Path  # ours, under /tmp: tmp_path's parents are 0700, no other user gets through
    user_dir: Path  # USER's, 0700
    uid: int
    gid: int


def _run(argv: list[str], timeout: float, **kw: Any) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _system_python_ok() -> bool:
    check = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", check], timeout=60).returncode == 0


def _ensure_system_packages() -> None:
    """What `make system-deps` does on a fresh Debian machine, for what this test needs."""
    missing = [] if _system_python_ok() else ["python3", "python3-venv"]
    missing += [] if shutil.which("bwrap") else ["bubblewrap"]
    if missing:
        assert shutil.which("apt-get"), f"install {missing}: no apt-get on this machine"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update"], 600, env=env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], 900, env=env)
    assert _system_python_ok(), f"{SYSTEM_PYTHON} is not Python >= 3.11 with venv and ensurepip"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _processes(match: Any) -> list[int]:
    """Live processes (zombies are dead already) for which ``match(pid)`` holds."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if match(int(entry)) and _state(int(entry)) not in ("Z", "X"):
                out.append(int(entry))
    return out


def _of_user(uid: int) -> list[int]:
    return _processes(lambda pid: os.stat(f"/proc/{pid}").st_uid == uid)


def _sleepers(mark: str) -> list[int]:
    argv = b"/bin/sleep\0" + mark.encode() + b"\0"
    return _processes(lambda pid: Path(f"/proc/{pid}/cmdline").read_bytes() == argv)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    assert os.geteuid() == 0, (
        "tests/test_nonroot.py runs as root: it creates the user pkr-test and runs the server as "
        "that user (CI runs `bash .ci/run` as root)"
    )
    _ensure_system_packages()
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        # --system: no /etc/subuid range, which could overlap the sandbox's uid pool.
        _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
              "/nonexistent", "--shell", "/usr/sbin/nologin", USER], 60)  # fmt: skip
        created = True
    entry = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="pkr-nonroot-"))
    try:
        os.chmod(base, 0o755)  # our own new dir: the user reads the venv in it, writes nothing
        work = tmp_path_factory.mktemp("nonroot-wheel")
        shutil.copytree(REPO, work / "src", ignore=shutil.ignore_patterns(*NOT_SOURCE))
        build = [sys.executable, "-m", "pip", "wheel", str(work / "src"), "--no-deps"]
        _run([*build, "-w", str(work)], 600)
        (wheel,) = work.glob("pixell_kernel_runtime-*.whl")
        _run([SYSTEM_PYTHON, "-m", "venv", str(base / "venv")], 300)
        _run([str(base / "venv" / "bin" / "python"), "-m", "pip", "install", str(wheel)], 900)
        (base / "u").mkdir(mode=0o700)
        os.chown(base / "u", entry.pw_uid, entry.pw_gid)
        yield Host(base / "venv", base, base / "u", entry.pw_uid, entry.pw_gid)
    finally:
        left = _of_user(entry.pw_uid)
        for pid in left:  # what the servers left (reported below); USER is this test's own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], capture_output=True, timeout=60)
    assert not left, f"processes of {USER} outlived the tests: {left}"


@dataclass
class Served:
    """One server run: as USER through setpriv, or as root (the control)."""

    host: Host
    name: str
    as_root: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cgroup: Path | None = None  # a delegated cgroup v2 directory to start the server in
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    start_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.dir = (self.host.base if self.as_root else self.host.user_dir) / self.name
        self.dir.mkdir(mode=0o755 if self.as_root else 0o700)
        if not self.as_root:
            os.chown(self.dir, self.host.uid, self.host.gid)
        self.log_path = self.dir / "server.log"
        self.client = Client(self.port)

    def argv(self, *extra: str) -> list[str]:
        server = [str(self.host.venv / "bin" / "pixell-kernel-runtime"), "serve", "--examples"]
        server += ["--port", str(self.port), "--state-dir", str(self.dir / "state")]
        server += ["--run-dir", str(self.dir / "run"), *extra]
        if self.as_root:
            return server
        ids = [f"--reuid={self.host.uid}", f"--regid={self.host.gid}", "--clear-groups"]
        drop = ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        argv = ["setpriv", *ids, *drop, "--", *server]
        if self.cgroup is not None:
            # What systemd does for Delegate=yes: root places the process, then it drops.
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup)]
            argv += ["setpriv", *ids, *drop, "--", *server]
        return argv

    def spawn(self, *extra: str) -> subprocess.Popen:
        bin_dir = self.host.venv / "bin"
        # No warm pool unless asked: every session's kernel starts on demand, so the first
        # execute measures the sandboxed kernel start, which is where root and non-root differ.
        env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.dir),
               "LANG": "C.UTF-8", "METRICS_PORT": "0", "POOL_SIZE": "0", **self.env}  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(*extra), env=env, cwd="/", stdout=log, stderr=subprocess.STDOUT
            )
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # setpriv (and sh) exec: this is the server itself

    def start(self) -> Served:
        t0 = time.monotonic()
        proc = self.spawn()
        while time.monotonic() < t0 + 120:
            assert proc.poll() is None, f"{self.name} exited {proc.returncode}:\n{self.logs()}"
            with contextlib.suppress(OSError):  # not listening yet
                if self.client.get("/runtime/health", timeout=2).status == 200:
                    self.start_seconds = time.monotonic() - t0
                    return self
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{self.name} did not answer in 120 s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, bounded; then nothing of the run may be left: processes, session dirs."""
        assert self.proc is not None
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.logs()}") from None
        assert code == 0, f"{self.name} exited {code}:\n{self.logs()}"
        assert wait_for(lambda: not _processes(tree.__contains__), 10), f"{self.name}: {tree}"
        for half in ("k", "w"):
            path = self.dir / "run" / half
            left = os.listdir(path) if path.exists() else []
            assert left == [], f"{self.name}: session dirs left in run/{half}: {left}"

    def sandbox(self) -> dict[str, Any]:
        answer = self.client.get("/runtime/sandbox")
        assert answer.status == 200, answer
        return answer.json()

    def run_code(self, code: str, session: str) -> tuple[Any, float]:
        t0 = time.monotonic()
        answer = self.client.invoke(CODE, {"code": code, "session_id": session}, timeout=120)
        took = time.monotonic() - t0
        assert answer.status == 200, answer
        output = answer.json()["output"]
        assert output["status"] == "success", output
        return output["result"], took

    def probe(self, session: str) -> tuple[dict[str, Any], float]:
        setup = f"SERVER_LOG = {str(self.log_path)!r}\nPORT = {self.port}\n"
        return self.run_code(setup + PROBE, session)

    def sleeper(self, session: str) -> str:
        """A daemon the kernel leaves behind (its own session, reparented away from it)."""
        mark = "77" + str(secrets.randbelow(10**6))
        code = (
            f"import subprocess\nsubprocess.Popen(['/bin/sleep', '{mark}'], start_new_session=True)"
        )
        self.run_code(code + "\nresult = 1", session)
        assert len(_sleepers(mark)) == 1
        return mark

    def delete_session(self, session: str) -> None:
        sid = quote(f"pixell-python-agent@0.1.0:{session}", safe="")
        answer = self.client.delete(f"/runtime/sessions/{sid}")
        assert answer.status == 200, answer

    def figures(self, first: float, second: float, warm: float) -> None:
        line = {"scenario": self.name, "start_s": round(self.start_seconds, 3),
                "first_execute_s": round(first, 3), "second_session_s": round(second, 3),
                "warm_execute_s": round(warm, 4)}  # fmt: skip
        print("FIGURES " + json.dumps(line))


def test_root_control(host: Host) -> None:
    """The same venv served by root: a uid per kernel and cgroups, what non-root loses."""
    served = Served(host, "root", as_root=True).start()
    try:
        layers = served.sandbox()["layers"]
        assert layers["uid"]["enabled"] is True, layers["uid"]
        assert layers["bwrap"]["enabled"] is True, layers["bwrap"]
        assert layers["cgroups"]["enabled"] is True, layers["cgroups"]
        report, first = served.probe("a")
        low, high = layers["uid"]["range"]
        assert low <= report["uid"] < high, report
        _, second = served.probe("b")
        served.figures(first, second, served.run_code("result = 1", "a")[1])
    finally:
        served.stop()


def test_nonroot_with_user_namespaces(host: Host) -> None:
    served = Served(host, "userns").start()
    try:
        status = Path(f"/proc/{served.pid}/status").read_text()
        assert f"\nUid:\t{host.uid}\t{host.uid}\t" in status, status
        for line in ("CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "NoNewPrivs:\t1"):
            assert f"\n{line}\n" in status, status
        doc = served.sandbox()
        layers = doc["layers"]
        assert doc["isolation"] == "bwrap", doc
        assert layers["uid"]["enabled"] is False, layers["uid"]
        assert layers["uid"]["reason"] == "the server does not run as root", layers["uid"]
        assert layers["network_isolation"]["method"] == "namespace", layers["network_isolation"]
        assert layers["seccomp"]["enabled"] is True, layers["seccomp"]
        assert layers["landlock"]["enabled"] is False, layers["landlock"]
        assert layers["cgroups"]["enabled"] is False, layers["cgroups"]
        assert layers["disk_quota"]["enabled"] is False, layers["disk_quota"]
        assert sorted(doc["missing"]) == ["cgroup kill", "cgroup limits", "disk quota"], doc

        report, first = served.probe("a")
        other, second = served.probe("b")
        # Every kernel runs as the server's own uid; the namespaces keep them apart.
        assert report["uid"] == other["uid"] == host.uid, (report, other)
        assert [report[k] for k in ("seccomp", "no_new_privs", "cap_eff")] == ["2", "1", "0" * 16]
        assert report["processes"] <= 3, report  # a pid namespace: bwrap's init and the kernel
        assert report["sessions"] == [report["own"]], report  # b's tree is not in a's view
        assert report["server_log"] == "FileNotFoundError", report  # same uid, out of view
        assert report["server_port"] == "ConnectionRefusedError", report  # its own loopback
        served.figures(first, second, served.run_code("result = 1", "a")[1])

        # A daemon a kernel leaves dies with its pid namespace when the session ends.
        mark = served.sleeper("b")
        served.delete_session("b")
        assert wait_for(lambda: not _sleepers(mark), 10), "the kernel's daemon outlived it"
    finally:
        served.stop()
    assert _of_user(host.uid) == []


def test_nonroot_without_namespaces(host: Host) -> None:
    """What a container under Docker's default seccomp profile leaves (no namespace creation):
    Landlock and seccomp, every kernel and the server under one uid."""
    served = Served(host, "landlock", env=NO_NAMESPACES).start()
    try:
        doc = served.sandbox()
        layers = doc["layers"]
        assert doc["isolation"] == "none", doc
        assert layers["landlock"]["enabled"] is True, layers["landlock"]
        assert layers["network_isolation"]["method"] == "landlock+seccomp", layers
        assert layers["seccomp"]["enabled"] is True, layers["seccomp"]
        assert layers["server_undumpable"]["enabled"] is True, layers["server_undumpable"]
        assert {"uid", "namespaces (bwrap and unshare)", "cgroup kill"} <= set(doc["missing"])

        report, first = served.probe("a")
        other, second = served.probe("b")
        assert report["uid"] == other["uid"] == host.uid, (report, other)
        assert report["seccomp"] == "2", report
        assert report["processes"] > 3, report  # the host's processes are in sight
        assert report["sessions"] == "PermissionError", report  # the run dir is not granted
        assert report["server_log"] == "PermissionError", report
        assert report["server_port"] == "PermissionError", report  # Landlock's TCP rule
        # Same uid, yet neither the other kernel (another Landlock domain) nor the server
        # (undumpable) can be read through /proc.
        peek = PEEK + f"result = [peek({other['pid']}), peek({served.pid})]"
        assert served.run_code(peek, "a")[0] == ["PermissionError", "PermissionError"]
        served.figures(first, second, served.run_code("result = 1", "a")[1])
    finally:
        served.stop()
    assert _of_user(host.uid) == []


def test_nonroot_warm_pool(host: Host) -> None:
    """The default warm pool works for a non-root server: a new session takes a kernel started
    ahead of it, sandboxed the same way, under the server's uid."""
    served = Served(host, "pool", env={"POOL_SIZE": "1"}).start()
    try:
        pool = lambda: served.client.get("/runtime/info").json()["pool"]  # noqa: E731
        assert wait_for(lambda: pool()["ready"] == 2, 60), pool()  # one per example package
        report, _ = served.probe("a")
        assert (report["uid"], report["seccomp"]) == (host.uid, "2"), report
        assert pool()["hits"] == 1, pool()
    finally:
        served.stop()
    assert _of_user(host.uid) == []


def _delegated_cgroup(host: Host) -> tuple[Path, str]:
    """A cgroup v2 directory handed to USER as systemd's Delegate=yes does (the directory, its
    cgroup.procs, cgroup.threads and cgroup.subtree_control), under this process's own cgroup.
    Returns it and its name as /proc/<pid>/cgroup spells it."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    roots = [m[1] for m in mounts if m[2] == "cgroup2"]
    assert roots, "no cgroup v2 hierarchy mounted: cannot delegate a subtree"
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next(line[3:] for line in lines if line.startswith("0::")).rstrip("/")
    name = f"{own}/pkr-nonroot-{secrets.token_hex(3)}"
    path = Path(roots[0] + name)
    path.mkdir()
    for entry in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        os.chown(path / entry if entry else path, host.uid, host.gid)
    return path, name


def test_nonroot_in_a_delegated_cgroup(host: Host) -> None:
    """With a delegated subtree the non-root server gets cgroup.kill: a daemon a kernel leaves
    is killed with its session even without a pid namespace."""
    cgroup, name = _delegated_cgroup(host)
    try:
        served = Served(host, "delegated", env=NO_NAMESPACES, cgroup=cgroup).start()
        try:
            layers = served.sandbox()["layers"]
            assert layers["cgroups"]["enabled"] is True, layers["cgroups"]
            assert layers["cgroups"]["kill"] == "cgroup.kill", layers["cgroups"]
            assert layers["cgroups"]["limits"] == [], layers["cgroups"]  # v1 holds them here
            report, _ = served.probe("a")
            # Each kernel in a cgroup of its own, inside the delegated one.
            assert report["cgroup"].startswith(f"0::{name}/pkr-"), report
            mark = served.sleeper("b")
            served.delete_session("b")
            assert wait_for(lambda: not _sleepers(mark), 10), "cgroup.kill missed the daemon"
        finally:
            served.stop()
    finally:
        for child in filter(Path.is_dir, cgroup.iterdir()):
            child.rmdir()
        cgroup.rmdir()
    assert _of_user(host.uid) == []


def test_nonroot_strict_refuses_without_a_bound(host: Host) -> None:
    """strict needs a bound on pids or memory: a non-root server without delegated cgroup limits
    has neither (one uid for all, so no RLIMIT_NPROC either) and refuses to start."""
    served = Served(host, "strict")
    proc = served.spawn("--sandbox", "strict")
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"strict did not refuse:\n{served.logs()}") from None
    logs = served.logs()
    assert code == 1, logs
    (line,) = [x for x in logs.splitlines() if "cannot provide" in x]
    lacks = line.split("cannot provide", 1)[1].split(". Details", 1)[0].strip()
    # Only the bound: user namespaces count as separation, the network namespace holds.
    assert lacks == "a bound on pids or memory (no cgroup limits, no dedicated uid)", line
    assert _of_user(host.uid) == []
