"""The kernel sandbox, tested with real ipykernels started through jupyter_client.

Adversarial checks first (network egress, /etc, the server's environ, ptrace, fork and memory
bombs), then interrupt, cleanup of setsid escapees, the ``off`` mode, the degraded probes
(bwrap hidden -> unshare; bwrap and unshare hidden -> Landlock) and the start-up cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pixell_kernel_runtime.sandbox import Sandbox, SandboxUnavailable, plan
from pixell_kernel_runtime.sandbox import policy as sbpolicy
from pixell_kernel_runtime.sandbox import seccomp as sbseccomp
from pixell_kernel_runtime.sandbox.core import SandboxSession
from pixell_kernel_runtime.sandbox.environment import kernel_environment
from pixell_kernel_runtime.sandbox.kernelspec import KERNEL_NAME, RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions.kernel_manager import SessionKernelManager

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def _ipykernel_pids(marker: str) -> set[int]:
    """Host pids of kernel processes whose command line mentions ``marker``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if marker in cmd and ("ipykernel" in cmd or "sleep" in cmd):
            found.add(int(entry))
    return found


def _pids_of_uid(uid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if str(uid) in fields.get("Uid", "").split()[:2]:
            out.add(int(entry))
    return out


class Kernel:
    def __init__(self, km: SessionKernelManager, kc: Any, session: SandboxSession) -> None:
        self.km = km
        self.kc = kc
        self.session = session

    async def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        out: dict[str, Any] = {"stdout": "", "stderr": "", "error": None}

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out[msg["content"]["name"]] += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                out["error"] = msg["content"]["ename"] + ": " + msg["content"]["evalue"]

        reply = await self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        out["status"] = reply["content"]["status"]
        if out["status"] == "error" and out["error"] is None:
            out["error"] = reply["content"].get("ename")
        return out

    async def value(self, code: str, timeout: float = 60) -> Any:
        """Run ``code``, which must print one JSON document last."""
        res = await self.run(code, timeout)
        assert res["status"] == "ok", res
        return json.loads(res["stdout"].strip().splitlines()[-1])


@contextlib.asynccontextmanager
async def kernel(
    sandbox: Sandbox,
    run_dir: Path,
    *,
    package_root: Path,
    package_name: str = "demo",
    package_id: str = "demo@0.1.0",
    resource_tier: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Kernel]:
    """A kernel started exactly as the runtime starts one: a sandbox session, the built-in spec,
    the SandboxProvisioner it names."""
    session = sandbox.open_session(
        package_root=package_root,
        package_name=package_name,
        package_id=package_id,
        resource_tier=resource_tier,
    )
    dirs = session.dirs
    env = kernel_environment(
        extra_env or {}, package_root=str(package_root), home=dirs.home, tmp=dirs.tmp
    )
    km = SessionKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=RuntimeKernelSpecManager(),
        transport="ipc",
        ip=dirs.ipc_prefix,
        connection_file=dirs.connection_file,
    )
    km.sandbox, km.sandbox_session = sandbox, session
    kc = None
    try:
        await km.start_kernel(env=env)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        yield Kernel(km, kc, session)
    finally:
        if kc is not None:
            kc.stop_channels()
        with contextlib.suppress(Exception):
            await km.shutdown_kernel(now=True)
        sandbox.close_session(session)
        sandbox.close_session(session)  # safe twice
        deadline = time.monotonic() + 5
        while _ipykernel_pids(dirs.server) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _ipykernel_pids(dirs.server), "kernel processes left behind"
        assert not os.path.exists(dirs.tree) and not os.path.exists(dirs.server)


def _started(mode: str = "best_effort", **kw: Any) -> Sandbox:
    sb = Sandbox(mode, kw.pop("config_path", None), kw.pop("run_dir"), **kw)
    asyncio.run(sb.start())
    return sb


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    # Short: ipc socket paths must stay under ~100 bytes.
    d = Path(tempfile.mkdtemp(prefix="pkrt-", dir="/tmp"))
    os.chmod(d, 0o711)  # kernel uids pass through it to their own sockets (Landlock mode)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(run_dir: Path) -> Iterator[Path]:
    d = Path(
        tempfile.mkdtemp(prefix="pkrt-data-", dir="/srv" if os.access("/srv", os.W_OK) else None)
    )
    (d / "table.csv").write_text("a,b\n1,2\n")
    os.chmod(d, 0o755)
    os.chmod(d / "table.csv", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def package_root(run_dir: Path) -> Iterator[Path]:
    # Like the package store: outside the kernel dir, world-readable.
    d = Path(tempfile.mkdtemp(prefix="pkrt-pkg-"))
    (d / "agent.py").write_text("ANSWER = 42\n")
    os.chmod(d, 0o755)
    os.chmod(d / "agent.py", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def config_path(run_dir: Path, data_dir: Path) -> Path:
    path = run_dir / "sandbox-config.json"
    path.write_text(
        json.dumps(
            {
                "default": {"tier": "small", "network": False, "data_dirs": [str(data_dir)]},
                "packages": {"netpkg": {"tier": "medium", "network": True}},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def sandbox(run_dir: Path, config_path: Path) -> Sandbox:
    return _started(config_path=config_path, run_dir=run_dir)


@pytest.fixture()
def listener() -> Iterator[int]:
    """A TCP listener on the host's loopback: what egress would reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


# --------------------------------------------------------------------------- unit level


def test_policy_tiers_scaled_and_capped(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "default: {tier: small}\n"
        "packages:\n"
        "  big: {tier: medium, max_tier: large, network: true, data_dirs: [/srv/data]}\n"
    )
    cfg = sbpolicy.load_config(cfg_file)
    host = (2, 8 * sbpolicy.GiB)  # 2 CPUs, 8 GiB
    r = sbpolicy.resolve(cfg, package_name="x", package_id="x@1", host=host)
    assert (r.tier, r.cpus, r.memory_bytes, r.network) == ("small", 1, 2 * sbpolicy.GiB, False)
    assert sbpolicy.MIN_DATA_BYTES <= r.data_bytes < r.memory_bytes
    # resource_tier from the request cannot exceed the operator's max for the package.
    r = sbpolicy.resolve(cfg, package_name="x", package_id="x@1", resource_tier=2, host=host)
    assert r.tier == "small"
    r = sbpolicy.resolve(cfg, package_name="big", package_id="big@1", resource_tier=2, host=host)
    assert r.tier == "large" and r.cpus == 2 and r.memory_bytes == 6 * sbpolicy.GiB  # scaled
    assert r.network and r.data_dirs == ("/srv/data",)
    r = sbpolicy.resolve(cfg, package_name="big", package_id="big@1", resource_tier=0, host=host)
    assert r.tier == "small"
    r = sbpolicy.resolve(cfg, package_name="big", package_id="big@1", host=host)
    assert r.tier == "medium"
    with pytest.raises(sbpolicy.ConfigError):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"default": {"tier": "huge"}}))
        sbpolicy.load_config(bad)


def test_uid_pool_reuses_after_release(tmp_path: Path) -> None:
    pool = sbpolicy.UidPool(250000, 3, lock_dir=str(tmp_path))
    a, b = pool.allocate("a"), pool.allocate("b")
    assert a != b and pool.allocate("a") == a
    # Another runtime process on the same host (same range) never gets a held uid.
    other = sbpolicy.UidPool(250000, 3, lock_dir=str(tmp_path))
    c = other.allocate("x")
    assert c not in (a, b)
    with pytest.raises(RuntimeError):
        other.allocate("y")
    pool.release("a")
    assert other.allocate("y") == a
    with pytest.raises(RuntimeError):
        pool.allocate("c")  # a, b, c all held (b here, a and c by the other process)
    other.release("x")
    assert pool.allocate("c") == c


def test_seccomp_filter_assembles_for_both_arches() -> None:
    for arch in ("x86_64", "aarch64"):
        prog = sbseccomp.build_filter(arch)
        assert len(prog) % 8 == 0 and 40 < len(prog) // 8 < 255
        assert len(sbseccomp.build_filter(arch, deny_inet_dgram=True)) > len(prog)


def test_launcher_without_policy_just_execs() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cmd = plan.launcher_argv() + ["--", "python", "-c", "import sys; print(sys.executable)"]
    out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sys.executable


def test_launcher_refuses_a_tampered_policy(sandbox: Sandbox, package_root: Path) -> None:
    session = sandbox.open_session(
        package_root=package_root, package_name="demo", package_id="demo@1"
    )
    try:
        prefix, env, cwd = sandbox.prepare_launch(session, {"PATH": "/usr/bin:/bin"})
        # The launcher's whole environment is the fixed minimum: nothing of the kernel's.
        assert sorted(env) == [
            "LANG",
            "PATH",
            "PIXELL_SANDBOX_POLICY",
            "PIXELL_SANDBOX_POLICY_SHA256",
        ]
        assert cwd == "/" and prefix[:3] == [sys.executable, "-I", plan.LAUNCHER]
        path = session.dirs.policy_file
        policy = json.loads(Path(path).read_text())
        assert os.stat(path).st_uid == 0 and os.stat(path).st_mode & 0o077 == 0
        policy["seccomp"] = False
        Path(path).write_text(json.dumps(policy))
        cmd = prefix + ["python", "-c", "print('escaped')"]
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        assert out.returncode == 70 and "escaped" not in out.stdout
        assert "digest" in out.stderr
    finally:
        sandbox.close_session(session)


# --------------------------------------------------------------------------- real kernels


def test_report_names_every_layer(sandbox: Sandbox) -> None:
    rep = sandbox.report()
    assert rep["mode"] == "best_effort"
    for name in ("clean_env", "rlimits", "uid", "bwrap", "unshare", "landlock"):
        assert "enabled" in rep["layers"][name] and "reason" in rep["layers"][name]
    for name in ("cgroups", "seccomp", "network_isolation"):
        assert "enabled" in rep["layers"][name]
    print("\nsandbox report:", json.dumps(rep, indent=1))


def test_sandboxed_kernel_is_confined(
    sandbox: Sandbox, run_dir: Path, listener: int, package_root: Path, data_dir: Path
) -> None:
    rep = sandbox.report()["layers"]
    os.environ["PIXELL_TEST_SECRET"] = "hunter2"  # the server's env must not leak

    async def go() -> None:
        async with kernel(sandbox, run_dir, package_root=package_root) as k:
            work = k.session.dirs.work
            res = await k.run("print(6 * 7)")
            assert res["status"] == "ok" and res["stdout"].strip() == "42"
            facts = await k.value(
                "import os, json\n"
                "st = open('/proc/self/status').read()\n"
                "seccomp = [l.split()[1] for l in st.splitlines() if l.startswith('Seccomp:')][0]\n"
                "print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'seccomp': seccomp,"
                " 'env': sorted(os.environ)}))"
            )
            assert facts["cwd"] == work
            assert not any(e.startswith("PIXELL_") for e in facts["env"]), facts["env"]
            if rep["uid"]["enabled"]:
                assert facts["uid"] != 0
            if rep["seccomp"]["enabled"]:
                assert facts["seccomp"] == "2"

            # Network egress to the host's loopback.
            res = await k.run(
                f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=3)"
            )
            if rep["network_isolation"]["enabled"]:
                assert res["status"] == "error", res

            # Writes: /etc, outside the kernel dir, the package and data dirs; inside is fine.
            for target in ("/etc/pixell-owned", "/tmp/pixell-owned", "/root/pixell-owned"):
                res = await k.run(f"open({target!r}, 'w').write('x')")
                assert res["status"] == "error", (target, res)
            assert not os.path.exists("/etc/pixell-owned")
            assert not os.path.exists("/tmp/pixell-owned")
            res = await k.run(f"open({str(package_root / 'x')!r}, 'w')")
            assert res["status"] == "error", res
            res = await k.run(f"open({str(data_dir / 'x')!r}, 'w')")
            assert res["status"] == "error", res
            res = await k.run(f"print(open({str(data_dir / 'table.csv')!r}).read().strip())")
            assert res["stdout"].strip() == "a,b\n1,2", res
            res = await k.run(f"print(open({str(package_root / 'agent.py')!r}).read().strip())")
            assert res["stdout"].strip() == "ANSWER = 42", res
            res = await k.run(
                "open('scratch.txt', 'w').write('ok'); print(open('scratch.txt').read())"
            )
            assert res["stdout"].strip() == "ok", res

            # The server's (here: the test process's) secrets and memory.
            res = await k.run(f"print(open('/proc/{os.getpid()}/environ').read())")
            assert res["status"] == "error" and "hunter2" not in res["stdout"], res
            res = await k.run("import os; print(os.environ.get('PIXELL_TEST_SECRET'))")
            assert res["stdout"].strip() == "None"
            res = await k.value(
                "import ctypes, json\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                f"rc = libc.ptrace(16, {os.getpid()}, 0, 0)\n"
                "print(json.dumps([rc, ctypes.get_errno()]))"
            )
            assert res[0] == -1, res

            # A memory bomb: MemoryError, and the kernel lives on.
            res = await k.run(
                "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))", timeout=60
            )
            assert res["error"] and res["error"].startswith("MemoryError"), res
            res = await k.run("del chunks\nprint('alive')")
            assert res["stdout"].strip() == "alive", res

            # A fork loop, bounded here too (5000 tries; children sleep, then are killed).
            res = await k.value(
                "import os, time, json, signal\n"
                "pids, err = [], None\n"
                "for i in range(5000):\n"
                "    try:\n"
                "        pid = os.fork()\n"
                "    except OSError as e:\n"
                "        err = type(e).__name__\n"
                "        break\n"
                "    if pid == 0:\n"
                "        time.sleep(60)\n"
                "        os._exit(0)\n"
                "    pids.append(pid)\n"
                "for p in pids:\n"
                "    os.kill(p, signal.SIGKILL)\n"
                "for p in pids:\n"
                "    os.waitpid(p, 0)\n"
                "print(json.dumps([len(pids), err]))",
                timeout=90,
            )
            if rep["cgroups"]["enabled"] or rep["uid"]["enabled"]:
                assert res[1] is not None and res[0] < 2000, res
            res = await k.run("print('still alive')")
            assert res["stdout"].strip() == "still alive"

    try:
        asyncio.run(go())
    finally:
        os.environ.pop("PIXELL_TEST_SECRET", None)


def test_network_allowed_by_operator_for_one_package(
    sandbox: Sandbox, run_dir: Path, listener: int, package_root: Path
) -> None:
    async def go() -> None:
        async with kernel(
            sandbox, run_dir, package_root=package_root, package_name="netpkg", package_id="n@1"
        ) as k:
            res = await k.run(
                f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=3)"
                ".close()\nprint('connected')"
            )
            assert res["stdout"].strip() == "connected", res

    asyncio.run(go())


def test_interrupt(sandbox: Sandbox, run_dir: Path, package_root: Path) -> None:
    async def go() -> None:
        async with kernel(sandbox, run_dir, package_root=package_root) as k:
            task = asyncio.create_task(k.run("import time\nwhile True:\n    time.sleep(0.01)"))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            await k.km.interrupt_kernel()
            res = await asyncio.wait_for(task, 15)
            print(f"\ninterrupt answered in {(time.monotonic() - t0) * 1000:.0f} ms")
            assert res["error"] and res["error"].startswith("KeyboardInterrupt"), res
            res = await k.run("print('after')")
            assert res["stdout"].strip() == "after"
            # The deadline path: restart (same env, same policy, same uid and cgroups).
            await k.run("state = 1")
            await k.km.restart_kernel(now=True)
            await k.kc.wait_for_ready(timeout=60)
            res = await k.run("print('state' in globals())")
            assert res["stdout"].strip() == "False", res
            if sandbox.report()["layers"]["uid"]["enabled"]:
                assert (await k.value("import os; print(os.getuid())")) != 0

    asyncio.run(go())


def test_release_kills_setsid_escapees(sandbox: Sandbox, run_dir: Path, package_root: Path) -> None:
    async def go() -> None:
        async with kernel(sandbox, run_dir, package_root=package_root) as k:
            info = sandbox.kernel_info(k.session)
            res = await k.run(
                "import subprocess\n"
                "p = subprocess.Popen(['sleep', '1000'], start_new_session=True,"
                " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "print(p.pid)"
            )
            assert res["status"] == "ok", res
            uid = info["uid"]
            if uid is not None:
                before = _pids_of_uid(uid)
                assert len(before) >= 2  # the kernel and its escapee
            sandbox.end_launch(k.session)  # before shutdown: it must not wait for it
            if uid is not None:
                assert not _pids_of_uid(uid)
            for d in info["cgroups"]:
                assert not os.path.exists(d)
            deadline = time.monotonic() + 5
            while not await _dead(k) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await _dead(k)

    asyncio.run(go())


async def _dead(k: Kernel) -> bool:
    return not await k.km.is_alive()


def test_off_mode_is_a_plain_kernel(run_dir: Path, package_root: Path) -> None:
    sb = _started("off", run_dir=run_dir)
    rep = sb.report()
    assert rep["mode"] == "off" and not any(v["enabled"] for v in rep["layers"].values())

    async def go() -> None:
        async with kernel(sb, run_dir, package_root=package_root) as k:
            facts = await k.value(
                "import os, json\n"
                "st = open('/proc/self/status').read()\n"
                "print(json.dumps([os.getuid(), 'Seccomp:\\t0' in st]))"
            )
            assert facts == [os.getuid(), True]

    asyncio.run(go())


def test_degraded_without_bwrap_falls_back_to_unshare(
    run_dir: Path, package_root: Path, listener: int
) -> None:
    sb = _started(run_dir=run_dir, bwrap_path=None)
    rep = sb.report()
    assert not rep["layers"]["bwrap"]["enabled"]
    assert rep["layers"]["bwrap"]["reason"] == "bwrap not found"
    assert "bwrap" in rep["missing"] or "namespaces (bwrap and unshare)" in rep["missing"]
    if not rep["layers"]["unshare"]["available"]:
        assert rep["isolation"] == "none" and rep["layers"]["landlock"]["enabled"] is not None
    else:
        assert rep["isolation"] == "unshare" and rep["layers"]["unshare"]["enabled"]

    async def go() -> None:
        async with kernel(sb, run_dir, package_root=package_root) as k:
            res = await k.run("print('hello')")
            assert res["stdout"].strip() == "hello"
            res = await k.run("open('/etc/pixell-owned', 'w')")
            assert res["status"] == "error"
            res = await k.run(
                f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=3)"
            )
            assert res["status"] == "error"
            if rep["layers"]["uid"]["enabled"]:
                assert (await k.value("import os; print(os.getuid())")) != 0

    asyncio.run(go())


def test_degraded_without_namespaces_uses_landlock(
    run_dir: Path, package_root: Path, listener: int
) -> None:
    sb = _started(run_dir=run_dir, bwrap_path=None, unshare_path=None)
    rep = sb.report()
    assert rep["isolation"] == "none"
    assert not rep["layers"]["bwrap"]["enabled"] and not rep["layers"]["unshare"]["enabled"]
    # The machines this runs on have Landlock (ABI 7); without it this fallback is untested.
    assert rep["layers"]["landlock"]["enabled"], rep["layers"]["landlock"]["reason"]

    async def go() -> None:
        async with kernel(sb, run_dir, package_root=package_root) as k:
            res = await k.run("print('hello')")
            assert res["stdout"].strip() == "hello"
            for target in ("/etc/pixell-owned", "/tmp/pixell-owned"):
                res = await k.run(f"open({target!r}, 'w')")
                assert res["status"] == "error", res
            res = await k.run("open('inside.txt', 'w').write('ok')")
            assert res["status"] == "ok", res
            res = await k.run(
                f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=3)"
            )
            assert res["status"] == "error"
            res = await k.run("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)")
            assert res["status"] == "error"

    asyncio.run(go())


def test_strict_refuses_what_it_cannot_guarantee(run_dir: Path) -> None:
    sb = Sandbox("strict", None, run_dir, bwrap_path=None, unshare_path=None)
    probe_rep = _started(run_dir=run_dir, bwrap_path=None, unshare_path=None).report()
    separated = probe_rep["layers"]["uid"]["enabled"]
    networked = probe_rep["layers"]["network_isolation"]["enabled"]
    if separated and networked:
        asyncio.run(sb.start())  # this host gives strict what it needs even then
    else:
        with pytest.raises(SandboxUnavailable, match="strict"):
            asyncio.run(sb.start())
    # And with the full stack strict starts.
    full = _started("best_effort", run_dir=run_dir).report()
    if full["isolation"] != "none" and full["layers"]["uid"]["enabled"]:
        asyncio.run(Sandbox("strict", None, run_dir).start())


def _spec_dir(tmp_path: Path, metadata: dict[str, Any]) -> Path:
    spec = tmp_path / "kernels" / "pixell-python"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    doc = {"argv": argv, "display_name": "x", "language": "python", "metadata": metadata}
    (spec / "kernel.json").write_text(json.dumps(doc))
    return tmp_path / "kernels"


def test_a_kernel_spec_that_bypasses_the_sandbox_is_refused(tmp_path: Path) -> None:
    """KERNELS_DIR may replace the built-in spec, never the provisioner that confines it."""
    from conftest import Server

    kernels = _spec_dir(tmp_path, {})
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERNELS_DIR": str(kernels)}
    with pytest.raises(RuntimeError, match="does not launch through the sandbox"):
        Server(tmp_path / "state", env=env, inherit_env=False).start()


def test_an_operator_kernel_spec_naming_the_provisioner_is_used(tmp_path: Path) -> None:
    from conftest import Server

    meta = {"kernel_provisioner": {"provisioner_name": "pixell-sandbox"}}
    kernels = _spec_dir(tmp_path, meta)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERNELS_DIR": str(kernels)}
    server = Server(tmp_path / "state", env=env, inherit_env=False).start()
    try:
        spec = server.client.get("/runtime/sandbox").json()["kernel_spec"]
        assert spec["source"] == str(kernels / "pixell-python")
        assert spec["provisioner"] == "pixell-sandbox"
    finally:
        server.stop()
