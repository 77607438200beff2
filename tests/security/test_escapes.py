"""Issue 7 regressions: the sandbox escapes of items 1-4 and 6-7, attacked through REST.

Each attack is untrusted code in a session (or files and variables of an uploaded package)
against a real server running as root, once per sandbox mode of the adversarial suite
(``test_attacks.MODES``: bwrap, unshare, Landlock alone). Every payload is harmless even when
it works: its proof is a file in the test's own temp dir, which no kernel can see in a working
sandbox (bwrap and unshare mask /tmp, Landlock does not grant it), or a change to a decoy the
test made there. A proof file that exists means a process outside the sandbox (the launcher's
privileged stage, bwrap, the server) ran or opened what a kernel or a package controls.

Each server gets an explicit minimal environment, its own RUN_DIR and a state dir under a fresh
directory of /var/tmp (item 4c: a state dir below a top-level directory Landlock grants).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import platform
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES, Response, Server, make_apkg, manifest_yaml, wait_for

from pixell_kernel_runtime.packages.builder import build_all
from security.test_attacks import MODES, PRELUDE, assert_all_failed, kill_pids, pids_with

PKG = "pixell-python-agent@0.1.0"
CODE = f"{PKG}/code-executor"
ENV_PKG = "escape-env@0.1.0"
ENV_AGENT = f"{ENV_PKG}/run"
ENV_PACKAGES = ("escape-env", "escape-ld")
HANDLER_PY = "def handler(data):\n    return data\n"
MiB = 1 << 20
# What the lead's per-session disk quota gives the small tier (tmpfs or project quota).
DISK_QUOTA = 256 * MiB
QUOTA_ERRNOS = {"ENOSPC", "EDQUOT"}  # tmpfs says ENOSPC, a project quota EDQUOT: both "full"
# The only variables a privileged stage (launcher before the uid drop, bwrap, unshare) may
# carry: the fixed minimum, the launcher's own pointers, and what bwrap sets itself.
STAGE_ENV = {"PATH", "LANG", "LC_ALL", "PWD", "JPY_PARENT_PID"}
STAGE_ENV_PREFIX = "PIXELL_SANDBOX_"
NAMESPACE_TOOLS = {"bwrap": {"bwrap"}, "unshare": {"unshare"}, "landlock": set()}
# Appends one line naming who imported it; silent where it cannot write (a confined kernel).
STUB = """
import os as _o, sys as _s
try:
    with open({proof!r}, "a") as _f:
        _f.write("%s euid=%d argv=%r\\n" % (__name__, _o.geteuid(), _s.argv))
except OSError:
    pass
"""


# --------------------------------------------------------------------------- servers


def make_server(base: Path, mode: str, state_dir: Path, **extra: str) -> Server:
    home = base / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RUN_DIR": str(base / f"run-{secrets.token_hex(3)}"),
        **MODES[mode],
        **extra,
    }
    return Server(state_dir, [], env, inherit_env=False)


def stop_server(server: Server) -> None:
    run_dir = server.env["RUN_DIR"]
    try:
        server.stop()
    finally:
        leftovers = pids_with(run_dir)
        kill_pids(leftovers)
    assert not leftovers, f"kernels outlived their server: {leftovers}"


@dataclass
class Host:
    mode: str
    server: Server
    base: Path  # the test's own: proofs and decoys live here, out of every kernel's sight
    other_secret: str  # in the .env of a second package (item 4c)

    @property
    def client(self) -> Any:
        return self.server.client


@pytest.fixture(scope="module")
def apkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("escapes-examples")
    return {p.name.rsplit("-", 1)[0]: p for p in build_all(EXAMPLES, out)}


@pytest.fixture(scope="module", params=list(MODES))
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, apkgs: Any
) -> Iterator[Host]:
    mode = request.param
    base = tmp_path_factory.mktemp(f"escapes-{mode}")
    state_root = Path(tempfile.mkdtemp(prefix="pkr-escapes-", dir="/var/tmp"))
    secret = "pkrsecret" + secrets.token_hex(12)
    server = make_server(base, mode, state_root / "state")
    try:
        server.start()
        assert server.client.load(apkgs["pixell-python-agent"]).status == 200
        files = {
            "agent.yaml": manifest_yaml("escape-secret"),
            "main.py": HANDLER_PY,
            ".env": f"ESCAPE_SECRET={secret}\n",
            "secret.txt": secret,
        }
        assert server.client.load(make_apkg(base / "secret.apkg", files)).status == 200
        yield Host(mode, server, base, secret)
    finally:
        try:
            stop_server(server)
        finally:
            shutil.rmtree(state_root, ignore_errors=True)


@pytest.fixture
def h(host: Host) -> Iterator[Host]:
    """The mode's server; every session a test opened is deleted after it."""
    yield host
    for s in host.client.get("/runtime/sessions", timeout=30).json()["sessions"]:
        host.client.delete(f"/runtime/sessions/{quote(s['id'], safe='')}", timeout=60)


# --------------------------------------------------------------------------- helpers


def cell(body: str, **params: Any) -> str:
    """``body`` with ``P`` (parameters) and test_attacks' helpers; its ``result`` is ``R``."""
    header = f"import contextlib, json\nP = json.loads({json.dumps(params)!r})\n"
    return header + PRELUDE + body + "\nresult = R\n"


def invoke(h: Host, code: str, sid: str, *, agent: str = CODE, timeout: float = 30) -> Response:
    input_ = {"code": code, "session_id": sid, "timeout_seconds": timeout}
    return h.client.invoke(agent, input_, timeout=timeout + 90)


def run(h: Host, code: str, sid: str, **kw: Any) -> dict[str, Any]:
    resp = invoke(h, code, sid, **kw)
    assert resp.status == 200, resp
    return resp.json()["output"]


def ok(out: dict[str, Any]) -> Any:
    assert out["status"] == "success", out
    return out["result"]


def session_url(package: str, sid: str) -> str:
    return f"/runtime/sessions/{quote(f'{package}:{sid}', safe='')}"


def session_info(h: Host, package: str, sid: str) -> dict[str, Any]:
    resp = h.client.get(session_url(package, sid), timeout=30)
    assert resp.status == 200, resp
    return resp.json()


def proofs(pattern: str) -> dict[str, str]:
    """Proof files matching ``pattern``, with what they say (who wrote them)."""
    found = {}
    for path in sorted(glob.glob(pattern)):
        if os.path.isdir(path):
            found[path] = f"dir with {sum(len(f) for _, _, f in os.walk(path))} files"
        else:
            found[path] = Path(path).read_text(errors="replace")[:600]
    return found


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def proc_tree(root: int) -> list[int]:
    """``root`` and its descendants (by /proc/<pid>/stat ppid)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry)] = int(
                    _read(f"/proc/{entry}/stat").rsplit(b")", 1)[1].split()[1]
                )
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return tree


def proc_status(pid: int) -> dict[str, str]:
    lines = _read(f"/proc/{pid}/status").decode().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def proc_environ(pid: int) -> dict[str, str]:
    items = [e.decode(errors="replace") for e in _read(f"/proc/{pid}/environ").split(b"\0") if e]
    return dict(item.partition("=")[::2] for item in items)


def proc_argv(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0")[:-1]]


def _privileged(status: dict[str, str]) -> bool:
    return status["Uid"].split()[1] == "0" or int(status["CapEff"], 16) != 0


def is_stage(argv: list[str]) -> bool:
    """A launcher stage or namespace tool (it started privileged), not the kernel exec'd last."""
    tool = bool(argv) and os.path.basename(argv[0]) in ("bwrap", "unshare")
    return tool or any("pixell_kernel_runtime" in a for a in argv)


def errname(code: int | None) -> str | None:
    return None if code is None else errno.errorcode.get(code, str(code))


# --------------------------------------------------------------------------- item 1


def _plant_work_dir_modules(h: Host, sid: str, proof: Path) -> None:
    """The kernel writes modules into its cwd (the session work dir) that a ``python -m``
    started there would import before the real ones."""
    files = [
        "pixell_kernel_runtime/__init__.py",
        "pixell_kernel_runtime/sandbox/__init__.py",
        "pixell_kernel_runtime/sandbox/launcher.py",
        "sitecustomize.py",
    ]
    body = """
for rel in P["files"]:
    if os.path.dirname(rel):
        os.makedirs(os.path.dirname(rel), exist_ok=True)
    with open(rel, "w") as fh:
        fh.write(P["stub"])
R["planted"] = sorted(os.listdir("pixell_kernel_runtime/sandbox"))
"""
    planted = ok(run(h, cell(body, files=files, stub=STUB.format(proof=str(proof))), sid))
    assert planted["planted"] == ["__init__.py", "launcher.py"], planted


def _assert_unimported_and_alive(h: Host, sid: str, proof: Path) -> None:
    after = invoke(h, "result = 6 * 7", sid)  # starts a kernel if there is none
    assert not proof.exists(), f"work-dir modules ran outside the sandbox: {proofs(str(proof))}"
    assert after.status == 200, after
    assert ok(after.json()["output"]) == 42, after


@pytest.mark.timeout(240)
def test_work_dir_modules_are_not_imported_on_restart(h: Host) -> None:
    # issue 7 item 1: POST .../restart must not start anything from the work dir as root.
    proof = h.base / f"proof-workdir-{h.mode}-restart"
    sid = "workdir-restart"
    _plant_work_dir_modules(h, sid, proof)
    resp = h.client.post_json(f"{session_url(PKG, sid)}/restart", {}, timeout=120)
    assert not proof.exists(), f"work-dir modules ran outside the sandbox: {proofs(str(proof))}"
    assert resp.status == 200, resp
    _assert_unimported_and_alive(h, sid, proof)


@pytest.mark.timeout(240)
def test_work_dir_modules_are_not_imported_after_the_kernel_exits(h: Host) -> None:
    # issue 7 item 1: the kernel exits, the next invoke starts a new one from the same dirs.
    proof = h.base / f"proof-workdir-{h.mode}-exit"
    sid = "workdir-exit"
    _plant_work_dir_modules(h, sid, proof)
    died = run(h, "import os\nos._exit(0)", sid)
    assert died["status"] == "error" and died["kernel_exit"]["exit_code"] == 0, died
    _assert_unimported_and_alive(h, sid, proof)


# --------------------------------------------------------------------------- item 2


@dataclass
class EnvPackage:
    marker: str
    proofs: str  # glob of every proof file the packages' files and variables could create


def _load_code_package(host: Host, name: str, variables: dict[str, str], files: dict) -> None:
    sub_agent = {
        "name": "run",
        "description": "runs code",
        "endpoint": "/execute",
        "capabilities": ["python-execution"],
    }
    metadata = {"version": "0.1.0", "sub_agents": [sub_agent]}
    manifest = manifest_yaml(name, environment=variables, metadata=metadata)
    files = {"agent.yaml": manifest, "main.py": HANDLER_PY, **files}
    assert host.client.load(make_apkg(host.base / f"{name}.apkg", files)).status == 200


@pytest.fixture(scope="module")
def env_pkg(host: Host) -> EnvPackage:
    """Packages whose root and manifest ``environment`` run code in (or make files from)
    whatever interpreter or loader starts with them: escape-env (Python) and escape-ld (ld.so,
    apart: its output file, opened early, breaks today's unshare stage before it can fail)."""
    marker = secrets.token_hex(6)
    prefix = f"{host.base}/proof-env-{host.mode}"
    warn_module = f"pkrwarn_{marker}"
    variables = {
        "ESCAPE_MARKER": marker,
        # The warnings machinery imports the category's module at interpreter start.
        "PYTHONWARNINGS": f"ignore::{warn_module}.W",
        # An interpreter writes bytecode of everything it imports there.
        "PYTHONPYCACHEPREFIX": f"{prefix}-pycache",
        # Read by privileged readers only in principle: the environ test covers them.
        "OPENSSL_CONF": f"{prefix}-openssl.cnf",
        "GCONV_PATH": f"{prefix}-gconv",
    }
    files = {
        "sitecustomize.py": STUB.format(proof=f"{prefix}-sitecustomize"),
        "usercustomize.py": STUB.format(proof=f"{prefix}-usercustomize"),
        f"{warn_module}.py": STUB.format(proof=f"{prefix}-warnings")
        + "class W(Warning):\n    pass\n",
    }
    _load_code_package(host, "escape-env", variables, files)
    # ld.so of every dynamically linked program writes <path>.<pid>.
    ld = {"ESCAPE_MARKER": marker, "LD_DEBUG": "files", "LD_DEBUG_OUTPUT": f"{prefix}-lddebug"}
    _load_code_package(host, "escape-ld", ld, {})
    return EnvPackage(marker, f"{prefix}-*")


@pytest.mark.timeout(180)
def test_package_files_and_variables_never_reach_a_privileged_stage(
    h: Host, env_pkg: EnvPackage
) -> None:
    # issue 7 item 2: sitecustomize at the package root, PYTHONWARNINGS, PYTHONPYCACHEPREFIX
    # and LD_DEBUG_OUTPUT from the manifest, at kernel start.
    code = "import os\nresult = os.environ.get('ESCAPE_MARKER')"
    answers = [invoke(h, code, "env-a", agent=f"{name}@0.1.0/run") for name in ENV_PACKAGES]
    found = proofs(env_pkg.proofs)
    assert not found, f"package files or variables acted outside the sandbox: {found}"
    for resp in answers:  # the kernel itself does get the package's variables
        assert resp.status == 200, resp
        assert ok(resp.json()["output"]) == env_pkg.marker


@pytest.mark.timeout(180)
def test_privileged_stages_run_with_the_fixed_minimum_environment(
    h: Host, env_pkg: EnvPackage
) -> None:
    # issue 7 items 1-2: every launcher stage and namespace tool in the kernel's process tree
    # started with the fixed minimum (no PYTHONPATH, no package variable), those still root
    # have cwd /, and the package's variables reach the kernel itself. A stage is a process
    # whose argv names pixell_kernel_runtime, bwrap or unshare: a kernel exec'd with its own
    # environment must not (or it gets that environment in-process, after every layer).
    code = "import os\nresult = [os.getpid(), os.environ.get('ESCAPE_MARKER')]"
    inner_pid, marker = ok(run(h, code, "env-b", agent=ENV_AGENT))
    tree = proc_tree(session_info(h, ENV_PKG, "env-b")["kernel_pid"])
    kernel = [p for p in tree if proc_status(p)["NSpid"].split()[-1] == str(inner_pid)]
    assert len(kernel) == 1, (inner_pid, tree)
    stages = {p: proc_argv(p) for p in tree if is_stage(proc_argv(p))}
    tools = {os.path.basename(argv[0]) for argv in stages.values()} & {"bwrap", "unshare"}
    assert tools == NAMESPACE_TOOLS[h.mode], stages
    extra = {}
    for pid, argv in stages.items():
        names = set(proc_environ(pid))
        wrong = sorted(n for n in names - STAGE_ENV if not n.startswith(STAGE_ENV_PREFIX))
        if wrong:
            extra[pid] = {"argv": argv[:6], "variables": wrong}
    assert not extra, f"privileged stages started with more than the fixed minimum: {extra}"
    # Stages still holding root or capabilities (the kernel itself aside) stay out of its dirs.
    held = [p for p in stages if p not in kernel and _privileged(proc_status(p))]
    cwds = {p: os.readlink(f"/proc/{p}/cwd") for p in held}
    assert all(cwd == "/" for cwd in cwds.values()), cwds
    assert marker == env_pkg.marker


# --------------------------------------------------------------------------- item 3

# Walks from the kernel's cwd up to 3 parents and subverts every server file it can.
SUBVERT = r"""
def swap(path):
    os.unlink(path)
    if P["fifo"]:
        os.mkfifo(path)
    else:
        os.symlink(P["decoy"], path)
    return "replaced"
def forge(path):
    doc = json.loads(read(path))
    doc["key"] = P["forged"]
    tmp = path + ".forged"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)
    return "forged"
d = os.getcwd()
for _ in range(4):
    try:
        names = os.listdir(d)
    except OSError as exc:
        names = []
        R["list " + d] = "ERR " + repr(exc)
    for name in names:
        path = os.path.join(d, name)
        if name == "kernel.log" or (name == "sandbox.json" and not P["fifo"]):
            attempt("replace " + path, swap, path)
        elif name == "connection.json" and not P["fifo"]:
            attempt("forge " + path, forge, path)
    d = os.path.dirname(d)
"""

# In the kernel started after that: write through its stdout/stderr, touch the connection file.
THROUGH = r"""
os.write(1, ("through fd 1 " + P["token"] + "\n").encode())
os.write(2, ("through fd 2 " + P["token"] + "\n").encode())
def open_for_write(path):  # never writes: the attempt alone must fail
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    return "opened"
def replace_it(path):
    with open(path + ".new", "w") as fh:
        fh.write("{}")
    os.replace(path + ".new", path)
    return "replaced"
def chmod_it(path):  # puts the mode back if it worked
    mode = os.stat(path).st_mode & 0o7777
    os.chmod(path, mode | 0o200)
    os.chmod(path, mode)
    return "changed"
attempt("open connection file for writing", open_for_write, P["conn"])
attempt("replace connection file", replace_it, P["conn"])
attempt("chmod connection file", chmod_it, P["conn"])
"""


@pytest.mark.timeout(240)
def test_server_files_in_the_kernel_tree_cannot_be_swapped(h: Host) -> None:
    # issue 7 item 3: kernel.log / sandbox.json -> symlink to a decoy, connection.json forged;
    # the kernel dies and the server starts the next one.
    token = secrets.token_hex(6)
    decoy = h.base / f"decoy-{h.mode}.txt"
    decoy.write_bytes(b"the test's decoy " + token.encode() + b"\n")
    decoy.chmod(0o644)
    before = (decoy.read_bytes(), os.lstat(decoy).st_mode, os.lstat(decoy).st_uid)
    forged = secrets.token_hex(16)
    sid = "swap"
    params = {"decoy": str(decoy), "forged": forged, "fifo": False}
    subverted = ok(run(h, cell(SUBVERT, **params), sid))
    died = run(h, "import os\nos._exit(1)", sid)
    assert died["status"] == "error", died
    after = run(h, "result = 'started'", sid)  # the server starts the next kernel
    info = session_info(h, PKG, sid)
    conn = info["connection_file"]
    assert conn, info
    through = run(h, cell(THROUGH, token=token, conn=conn), sid)
    now = (decoy.read_bytes(), os.lstat(decoy).st_mode, os.lstat(decoy).st_uid)
    assert now == before, f"the decoy was written through a swapped server file: {now[0]!r}"
    assert_all_failed(ok(through))
    st = os.lstat(conn)
    kernel_uid = ok(run(h, "import os\nresult = os.getuid()", sid))
    owner = {"uid": st.st_uid, "mode": oct(st.st_mode), "kernel": kernel_uid, "sub": subverted}
    # Never the kernel's own uid (an owner may chmod). Where a pool uid cannot reach the
    # interpreter (a host fact: Landlock mode with Python under a 0700 dir) the kernel keeps
    # uid 0 without capabilities and the file belongs to the session's guard uid, which
    # nothing runs as; everywhere else the kernel has a pool uid and the file is root's.
    exe = Path(os.path.realpath(sys.executable))
    gid_only = h.mode == "landlock" and not all(os.stat(d).st_mode & 0o001 for d in exe.parents)
    assert stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222, owner
    if gid_only:
        assert kernel_uid == 0 and st.st_uid >= 200000, owner
    else:
        assert kernel_uid >= 200000 and st.st_uid == 0, owner
    assert json.loads(Path(conn).read_text()).get("key") not in (None, forged), conn
    assert ok(after) == "started"


# The socket dir: the server connects (as root) to the paths the kernel bound.
SOCKETS = r"""
conn = json.load(open(P["conn"]))
base = conn["ip"]
sockdir = os.path.dirname(base)
shell = "%s-%d" % (base, conn["shell_port"])
R["bound"] = os.path.exists(shell)
attempt("unlink a bound socket", os.unlink, shell)
attempt("rename a bound socket", os.rename, shell, shell + ".moved")
attempt("symlink a new endpoint", os.symlink, "/run/some-other.sock", base + "-65000")
attempt("create a file", lambda: open(os.path.join(sockdir, "x"), "w").close())
attempt("chmod the dir", os.chmod, sockdir, 0o777)
"""


@pytest.mark.timeout(240)
def test_the_kernel_cannot_change_the_sockets_the_server_connects_to(h: Host) -> None:
    # issue 7 item 3, its last piece: the ipc sockets live in a dir the kernel needs to bind
    # in; once they are bound (before any user code), the dir is the guard's again.
    sid = "sockets"
    for attempt_no in range(2):
        conn = session_info(h, PKG, sid)["connection_file"] if attempt_no else None
        if conn is None:
            ok(run(h, "result = 1", sid))
            conn = session_info(h, PKG, sid)["connection_file"]
        got = ok(run(h, cell(SOCKETS, conn=conn), sid))
        assert got.pop("bound") is True, got
        assert_all_failed(got)
        assert ok(run(h, "result = 6 * 7", sid)) == 42  # the server still reaches it
        # After a restart the new kernel binds again, and the dir is locked again.
        resp = h.client.post_json(session_url(PKG, sid) + "/restart", {}, timeout=120)
        assert resp.status == 200, resp


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", list(MODES))
def test_kernel_log_fifo_does_not_hang_the_server(
    mode: str, tmp_path: Path, apkgs: dict[str, Path]
) -> None:
    # issue 7 item 3: kernel.log made a FIFO; the next start must not block the event loop.
    server = make_server(tmp_path, mode, tmp_path / "state")
    host = Host(mode, server, tmp_path, "")
    readers: list[int] = []
    try:
        server.start()
        assert server.client.load(apkgs["pixell-python-agent"]).status == 200
        subverted = ok(run(host, cell(SUBVERT, decoy="", forged="", fifo=True), "fifo"))
        assert run(host, "import os\nos._exit(1)", "fifo")["status"] == "error"
        answer: dict[str, Any] = {}

        def next_invoke() -> None:
            try:
                answer["resp"] = invoke(host, "result = 6 * 7", "fifo", timeout=20)
            except OSError as exc:
                answer["error"] = repr(exc)

        worker = threading.Thread(target=next_invoke, daemon=True)
        worker.start()
        stalls: list[str] = []

        def health_answers() -> bool:
            try:
                resp = server.client.get("/runtime/health", timeout=3)
            except OSError as exc:
                stalls.append(repr(exc))
                return True
            if resp.status != 200:
                stalls.append(repr(resp))
            return bool(stalls) or not worker.is_alive()

        wait_for(health_answers, timeout=110, interval=0.1)
        if stalls:  # unblock the server (it waits for a reader) so that it can stop
            readers = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in _fifos(server)]
        worker.join(120)
        assert not stalls, f"/runtime/health stopped answering: {stalls}; planted {subverted}"
        resp = answer.get("resp")
        assert resp is not None and resp.status == 200, answer
        assert ok(resp.json()["output"]) == 42
    finally:
        try:
            stop_server(server)
        finally:
            for fd in readers:
                os.close(fd)


def _fifos(server: Server) -> list[str]:
    """FIFOs under the server's run dir (where today's kernel.log lives)."""
    found = []
    for d, _, names in os.walk(server.env["RUN_DIR"]):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISFIFO(os.lstat(os.path.join(d, name)).st_mode):
                    found.append(os.path.join(d, name))
    return found


# --------------------------------------------------------------------------- item 4

FAST_OPEN = r"""
def fast_open_sendto(port):
    with socket.socket() as s:
        return s.sendto(b"pkr-tfo", socket.MSG_FASTOPEN, ("127.0.0.1", port))
def fast_open_connect(port):
    with socket.socket() as s:
        s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        return s.send(b"pkr-tfo-connect")
attempt("sendto MSG_FASTOPEN", fast_open_sendto, P["port"])
attempt("TCP_FASTOPEN_CONNECT", fast_open_connect, P["port"])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host", ["landlock"], indirect=True)
def test_tcp_fast_open_does_not_pass_landlock(h: Host) -> None:
    # issue 7 item 4 (a): Fast Open connects without connect(); nothing may reach loopback.
    fastopen = Path("/proc/sys/net/ipv4/tcp_fastopen").read_text().strip()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        accepted: list[Any] = []

        def arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                conn, peer = listener.accept()
                accepted.append(peer)
                conn.close()
            return bool(accepted)

        out = run(h, cell(FAST_OPEN, port=listener.getsockname()[1]), "tfo")
        wait_for(arrived, timeout=3)
        tried = ok(out)
    assert not accepted, f"connections from the kernel: {accepted}; {tried}; fastopen={fastopen}"


A_CELL = r"""
import subprocess, time
child = subprocess.Popen(["sleep", "60." + P["mark"]])
try:
    end = time.monotonic() + 40
    n = 0
    while time.monotonic() < end:
        print(P["secret"], n, flush=True)
        n += 1
        time.sleep(0.05)
finally:
    child.kill()
    child.wait()
"""

B_CELL = r"""
import glob, zmq
own = read("/proc/self/cmdline").split("\0")
own = own[own.index("-f") + 1] if "-f" in own else None
found = set(P["conn_files"])
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            found.update(a for a in read("/proc/%s/cmdline" % entry).split("\0")
                         if a.endswith("connection.json"))
        except OSError:
            pass
found.discard(own)
R["connection files"] = sorted(found)
endpoints = set(P["endpoints"])
for path in sorted(found):
    attempt("read " + path, read, path)
    with contextlib.suppress(Exception):
        doc = json.loads(read(path))
        endpoints.add("ipc://%s-%s" % (doc["ip"], doc["iopub_port"]))
    endpoints.update("ipc://" + p for p in glob.glob(os.path.dirname(path) + "/*-*"))
R["endpoints"] = sorted(endpoints)
zctx = zmq.Context()
poller = zmq.Poller()
subs = []
for ep in sorted(endpoints):
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    attempt("connect " + ep, s.connect, ep)
    poller.register(s, zmq.POLLIN)
    subs.append(s)
got = []
end = time.monotonic() + P["listen"]
while time.monotonic() < end and len(got) < 40:
    for s, _ in poller.poll(200):
        got.append(b"|".join(s.recv_multipart())[-1500:].decode("latin-1"))
R["messages"] = got
for s in subs:
    s.close()
zctx.term()
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("host", ["landlock"], indirect=True)
def test_sessions_cannot_read_each_others_output_or_keys(h: Host) -> None:
    # issue 7 item 4 (b): B finds A through /proc and subscribes to A's iopub socket.
    secret = "pkrlive" + secrets.token_hex(12)
    mark = str(secrets.randbelow(10**8) + 10**8)
    assert ok(run(h, "result = 1", "a")) == 1
    conn = session_info(h, PKG, "a")["connection_file"]
    doc = json.loads(Path(conn).read_text())
    endpoints = [f"ipc://{doc['ip']}-{doc[f'{c}_port']}" for c in ("iopub", "shell", "control")]
    answer: dict[str, Any] = {}
    code_a = cell(A_CELL, secret=secret, mark=mark)
    worker = threading.Thread(target=lambda: answer.update(a=run(h, code_a, "a", timeout=60)))
    worker.start()
    try:
        assert wait_for(lambda: bool(pids_with(f"60.{mark}")), 60), "A's cell never started"
        resp = invoke(h, cell(B_CELL, conn_files=[conn], endpoints=endpoints, listen=6), "b")
    finally:
        h.client.post_json(f"{session_url(PKG, 'a')}/interrupt", {}, timeout=30)
        worker.join(120)
    assert resp.status == 200, resp
    seen = ok(resp.json()["output"])
    assert secret.encode() not in resp.body, f"B read A's output: {seen['messages'][:3]}"
    assert doc["key"].encode() not in resp.body, "B read A's connection key"
    assert secret in answer["a"]["stdout"], answer  # A really printed it all along


WALK_STATE = r"""
found = {}
for d, dirs, files in os.walk(P["state"]):
    for name in files:
        path = os.path.join(d, name)
        try:
            found[path] = read(path)[:4096]
        except OSError as exc:
            found[path] = "ERR " + repr(exc)
R["files"] = found
R["walked"] = len(found)
"""


@pytest.mark.timeout(120)
def test_state_dir_and_other_packages_stay_unreadable(h: Host) -> None:
    # issue 7 item 4 (c): a state dir under /var (Landlock grants whole top-level dirs).
    state = h.server.state_dir
    stored = [
        p for p in state.rglob("*") if p.is_file() and h.other_secret in p.read_text("latin-1")
    ]
    assert stored, "the other package's secret is not even in the store"
    resp = invoke(h, cell(WALK_STATE, state=str(state)), "state")
    assert resp.status == 200, resp
    files = ok(resp.json()["output"])["files"]
    leaked = sorted(p for p, text in files.items() if h.other_secret in text)
    assert h.other_secret.encode() not in resp.body, f"read from the state dir: {leaked}"


# --------------------------------------------------------------------------- items 6-7

FILL_DISK = r"""
import shutil
total, err = 0, None
chunk = b"\0" * (1 << 20)
os.makedirs("fill", exist_ok=True)
try:
    for i in range(64):
        with open("fill/f%d" % i, "wb", buffering=0) as fh:
            for _ in range(8):
                total += fh.write(chunk)
except OSError as exc:
    err = exc.errno
finally:
    shutil.rmtree("fill", ignore_errors=True)
R["total"], R["errno"] = total, err
"""

FILL_INODES = r"""
import shutil
made, err = 0, None
os.makedirs("inodes", exist_ok=True)
try:
    for i in range(100000):
        os.close(os.open("inodes/%d" % i, os.O_CREAT | os.O_WRONLY, 0o600))
        made += 1
except OSError as exc:
    err = exc.errno
finally:
    shutil.rmtree("inodes", ignore_errors=True)
R["made"], R["errno"] = made, err
"""


@pytest.mark.timeout(240)
def test_work_dir_has_a_disk_quota(h: Host) -> None:
    # issue 7 item 6: 64 x 8 MiB in the work dir stops at the small tier's quota (256 MiB).
    res = ok(run(h, cell(FILL_DISK), "disk", timeout=120))
    assert errname(res["errno"]) in QUOTA_ERRNOS, f"no quota: {res['total'] // MiB} MiB written"
    assert 8 * MiB <= res["total"] <= DISK_QUOTA, res


@pytest.mark.timeout(300)
def test_work_dir_has_an_inode_limit(h: Host) -> None:
    # issue 7 item 6: 100000 empty files in the work dir stop at the inode limit.
    res = ok(run(h, cell(FILL_INODES), "inodes", timeout=180))
    assert errname(res["errno"]) in QUOTA_ERRNOS, f"no inode limit: {res['made']} files made"
    assert 0 < res["made"] < 100000, res


FILL_SHM = r"""
written, err = 0, None
chunk = b"\0" * (1 << 20)
try:
    with open("/dev/shm/pkr-x", "wb", buffering=0) as fh:
        for _ in range(512):
            written += fh.write(chunk)
except OSError as exc:
    err = exc.errno
finally:
    with contextlib.suppress(OSError):
        os.unlink("/dev/shm/pkr-x")
R["written"], R["errno"] = written, err
"""
# With namespaces /dev/shm is the kernel's own bounded tmpfs; without, the host's: not writable.
SHM_ERRNO = {"bwrap": "ENOSPC", "unshare": "ENOSPC", "landlock": "EACCES"}


@pytest.mark.timeout(180)
def test_dev_shm_is_bounded(h: Host) -> None:
    # issue 7 item 6: /dev/shm takes less than 512 MiB from one kernel.
    res = ok(run(h, cell(FILL_SHM), "shm", timeout=120))
    assert errname(res["errno"]) == SHM_ERRNO[h.mode], f"{res['written'] // MiB} MiB: {res}"
    assert res["written"] < 512 * MiB, res


@pytest.mark.timeout(120)
def test_kernel_has_no_capabilities_even_in_its_bounding_set(h: Host) -> None:
    # issue 7 item 7: the bounding set is dropped, not only the effective set.
    body = """
R.update({k: v.strip() for k, v in (l.split(":", 1) for l in read("/proc/self/status").splitlines())
          if k in ("CapBnd", "CapEff", "CapPrm", "CapAmb")})
"""
    caps = ok(run(h, cell(body), "caps"))
    assert caps == dict.fromkeys(("CapBnd", "CapEff", "CapPrm", "CapAmb"), "0" * 16), caps


SYSCALLS = {  # name -> (x86_64, aarch64)
    "personality": (135, 92),
    "shmget": (29, 194),
    "shmctl": (31, 195),
    "msgget": (68, 186),
    "msgctl": (71, 187),
    "mbind": (237, 235),
    "memfd_secret": (447, 447),
}

DENIED = r"""
import platform
nr = {k: v[platform.machine() == "aarch64"] for k, v in P["syscalls"].items()}
sc = libc.syscall
def call(name, *args):
    rc = sc(nr[name], *[ctypes.c_ulong(a) if isinstance(a, int) else a for a in args])
    return checked(rc, name)
def personality():
    old = call("personality", 0xFFFFFFFF)  # query
    call("personality", 0x0040000)  # ADDR_NO_RANDOMIZE
    call("personality", old)  # only reached if it was allowed: put it back
    return old
def shmget():
    shmid = call("shmget", 0, 4096, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    call("shmctl", shmid, 0, None)  # IPC_RMID
    return shmid
def msgget():
    qid = call("msgget", 0, 0o1600)
    call("msgctl", qid, 0, None)
    return qid
def memfd_secret():
    os.close(call("memfd_secret", 0))
    return "fd"
attempt("personality(ADDR_NO_RANDOMIZE)", personality)
attempt("shmget", shmget)
attempt("msgget", msgget)
attempt("mbind", call, "mbind", 0, 0, 0, None, 0, 0)
attempt("memfd_secret", memfd_secret)
"""


@pytest.mark.timeout(120)
def test_seccomp_denies_what_the_allow_list_leaves_out(h: Host) -> None:
    # issue 7 item 7: an allow-list returns EPERM for personality, System V IPC, mbind, ...
    assert platform.machine() in ("x86_64", "aarch64"), platform.machine()
    res = ok(run(h, cell(DENIED, syscalls=SYSCALLS), "seccomp"))
    denied = {n: v for n, v in res.items() if v.startswith("ERR PermissionError: [Errno 1] ")}
    assert res and denied == res, res  # EPERM: the filter's default answer


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", list(MODES))
def test_uid_range_overlapping_subordinate_ids_is_refused(mode: str, tmp_path: Path) -> None:
    # issue 7 item 7: the kill-by-uid sweep must never reach another user's subordinate ids.
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("someuser:300500:65536\n")
    subgid.write_text("someuser:500000:65536\n")
    config = tmp_path / "sandbox.json"
    config.write_text(json.dumps({"uids": {"start": 300000, "count": 1000}}))
    server = make_server(
        tmp_path,
        mode,
        tmp_path / "state",
        SANDBOX_CONFIG=str(config),
        SANDBOX_SUBID_FILES=f"{subuid}:{subgid}",
    )
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            server.start(timeout=90)
    finally:
        stop_server(server)
    assert server.proc is not None and server.proc.returncode not in (None, 0)
    logs = server.logs()
    assert str(subuid) in logs and "overlap" in logs.lower(), logs[-2000:]
