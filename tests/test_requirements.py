"""Requirements of the README that no other test pins down, each checked through REST against a
real server: the console script, settings from the environment (and the ``PIXELL_`` prefix),
session limits, upload cap, JSON logs, metrics, ``build``, per-session uids, the operator's
policy file, ``--die-with-parent`` and a raw ``/`` in an invoked agent id.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    EXAMPLES,
    Client,
    Server,
    free_port,
    make_apkg,
    manifest_yaml,
    minimal_env,
    process_tree,
    stop_all,
    wait_for,
)

from pixell_kernel_runtime import __version__

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
HELLO = "hello-handler@0.1.0"
GiB = 1 << 30


def ok(client: Client, code: str, sid: str, **extra: Any) -> Any:
    resp = client.invoke(CE, {"code": code, "session_id": sid, **extra})
    assert resp.status == 200, resp
    out = resp.json()["output"]
    assert out["status"] == "success", out
    return out["result"]


def output(client: Client, code: str, sid: str, **extra: Any) -> dict[str, Any]:
    resp = client.invoke(CE, {"code": code, "session_id": sid, **extra})
    assert resp.status == 200, resp
    return resp.json()["output"]


def sessions(client: Client) -> dict[str, dict[str, Any]]:
    resp = client.get("/runtime/sessions")
    assert resp.status == 200, resp
    return {s["id"]: s for s in resp.json()["sessions"]}


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                out.add(pid)
    return out


def console_script() -> str:
    """``pixell-kernel-runtime`` as a user's shell finds it (the editable install's script)."""
    found = shutil.which("pixell-kernel-runtime", path=minimal_env(Path("/nonexistent"))["PATH"])
    assert found == os.path.join(os.path.dirname(sys.executable), "pixell-kernel-runtime"), found
    return found


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start the console script with settings from ``env`` only (no flags), from ``tmp_path``."""
    started: list[Server] = []

    def start(env: dict[str, str], host: str, port: int, argv: list[str] | None = None) -> Server:
        srv = Server(tmp_path / "unused-state")
        srv.port, srv.client = port, Client(port, host)
        srv.log_path = tmp_path / f"script-{port}.log"
        srv.log = open(srv.log_path, "ab")  # noqa: SIM115 - closed by Server.stop
        srv.proc = subprocess.Popen(
            [console_script(), *(argv or [])],
            stdout=srv.log,
            stderr=subprocess.STDOUT,
            env={**minimal_env(tmp_path / "home"), **env},
            cwd=tmp_path,  # an unrelated directory: nothing may come from the checkout's cwd
        )
        started.append(srv)

        def up() -> bool:
            assert srv.proc is not None and srv.proc.poll() is None, srv.logs()
            with contextlib.suppress(OSError):
                return srv.client.get("/runtime/health", timeout=2).status == 200
            return False

        assert wait_for(up, 60, 0.1), srv.logs()
        return srv

    yield start
    stop_all(started)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("requirements") / "state", ["--examples"]).start()
    try:
        yield server
    finally:
        stop_all([server])


# ---- the console script and settings from the environment ----------------------------------


def test_console_script_serves_with_host_port_and_cache_dir_from_env(
    launch: Callable[..., Server], tmp_path: Path, example_apkgs: dict[str, Path]
) -> None:
    done = subprocess.run(
        [console_script(), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == __version__, done
    port, cache, state = free_port(), tmp_path / "cache", tmp_path / "state"
    env = {"HOST": "127.0.0.2", "PORT": str(port), "STATE_DIR": str(state)}
    srv = launch({**env, "PACKAGE_CACHE_DIR": str(cache)}, "127.0.0.2", port)
    # HOST: bound to 127.0.0.2 only, not to the default 127.0.0.1.
    with pytest.raises(ConnectionRefusedError):
        Client(port).get("/runtime/health", timeout=5)
    resp = srv.client.load(example_apkgs["pixell-python-agent"])
    assert resp.status == 200, resp
    # PACKAGE_CACHE_DIR: the store is there, not under STATE_DIR.
    assert (cache / "ids" / PKG).is_symlink()
    assert (cache / "ids" / PKG / "pkg" / "agent.yaml").is_file()
    assert not (state / "packages").exists()
    assert ok(srv.client, "result = 2 + 2", "s") == 4


def test_settings_take_the_pixell_prefix(
    launch: Callable[..., Server], tmp_path: Path, example_apkgs: dict[str, Path]
) -> None:
    port, cache = free_port(), tmp_path / "pcache"
    env = {
        "PIXELL_HOST": "127.0.0.3",
        "PIXELL_PORT": str(port),
        "PIXELL_STATE_DIR": str(tmp_path / "pstate"),
        "PIXELL_PACKAGE_CACHE_DIR": str(cache),
        "PIXELL_MAX_UPLOAD_BYTES": "20000",
    }
    srv = launch(env, "127.0.0.3", port)
    with pytest.raises(ConnectionRefusedError):
        Client(port).get("/runtime/health", timeout=5)
    assert srv.client.load(example_apkgs["hello-handler"]).status == 200
    assert (cache / "ids" / HELLO).is_symlink()
    assert not (tmp_path / "pstate" / "packages").exists()
    big = make_apkg(
        tmp_path / "big.apkg", {"agent.yaml": manifest_yaml(), "x.bin": os.urandom(30000)}
    )
    resp = srv.client.upload("/runtime/packages/upload", big)
    assert resp.status == 413 and resp.json()["code"] == "upload_too_large", resp
    assert "the limit is 20000" in resp.json()["message"]


def test_upload_size_cap_answers_413_and_keeps_nothing(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    srv = server_factory(env={"MAX_UPLOAD_BYTES": "16384"})
    handler = "def handler(d):\n    return d\n"
    small = make_apkg(tmp_path / "small.apkg", {"agent.yaml": manifest_yaml(), "main.py": handler})
    files = {"agent.yaml": manifest_yaml("too-big"), "main.py": handler, "x.bin": os.urandom(40000)}
    big = make_apkg(tmp_path / "big.apkg", files)
    assert small.stat().st_size < 16384 < big.stat().st_size
    resp = srv.client.upload("/runtime/packages/upload", big)
    assert resp.status == 413, resp
    body = resp.json()
    assert body["error"] == "PayloadTooLarge" and body["code"] == "upload_too_large", body
    assert "the limit is 16384" in body["message"], body
    assert srv.client.get("/runtime/packages/too-big@0.1.0").status == 404
    assert not any((srv.state_dir / "packages" / ".incoming").iterdir())
    resp = srv.client.upload("/runtime/packages/upload", small)
    assert resp.status == 200 and resp.json()["package_id"] == "tiny-agent@0.1.0", resp


# ---- sessions: eviction, culling, the timeout cap --------------------------------------------


def test_max_sessions_evicts_the_least_recently_used(
    server_factory: Callable[..., Server], example_apkgs: dict[str, Path]
) -> None:
    srv = server_factory(env={"MAX_SESSIONS": "2"})
    c = srv.client
    assert c.load(example_apkgs["pixell-python-agent"]).status == 200
    ok(c, "kept = 'one'", "one")
    ok(c, "kept = 'two'", "two")
    ok(c, "kept", "one")  # "two" is now the least recently used
    two = process_tree(sessions(c)[f"{PKG}:two"]["kernel_pid"])
    ok(c, "kept = 'three'", "three")
    assert set(sessions(c)) == {f"{PKG}:one", f"{PKG}:three"}
    assert wait_for(lambda: not alive(two), 15), alive(two)
    assert ok(c, "kept", "one") == "one"
    # "two" comes back as a new session (evicting "three", now the least recently used).
    assert ok(c, "'kept' in globals()", "two") is False
    assert set(sessions(c)) == {f"{PKG}:one", f"{PKG}:two"}


def test_idle_sessions_are_culled_and_busy_ones_are_not(
    server_factory: Callable[..., Server], example_apkgs: dict[str, Path]
) -> None:
    srv = server_factory(env={"SESSION_IDLE_SECONDS": "2"})
    c = srv.client
    assert c.load(example_apkgs["pixell-python-agent"]).status == 200
    ok(c, "import time", "idle")
    ok(c, "import time", "busy")
    tree = process_tree(sessions(c)[f"{PKG}:idle"]["kernel_pid"])
    # A call running past the idle limit is not cut: it answers, its session is still there.
    assert ok(c, "time.sleep(6)\nresult = 'awake'", "busy") == "awake"
    assert f"{PKG}:busy" in sessions(c)
    assert f"{PKG}:idle" not in sessions(c)
    assert wait_for(lambda: not alive(tree), 15), alive(tree)
    assert wait_for(lambda: not sessions(c), 30), sessions(c)


def test_max_timeout_seconds_caps_the_deadline(
    server_factory: Callable[..., Server], example_apkgs: dict[str, Path]
) -> None:
    env = {"MAX_TIMEOUT_SECONDS": "2", "DEFAULT_TIMEOUT_SECONDS": "1"}
    srv = server_factory(env=env)
    c = srv.client
    assert c.load(example_apkgs["pixell-python-agent"]).status == 200
    ok(c, "import time\nkept = 7", "t")
    asked = output(c, "time.sleep(60)\nresult = 'finished'", "t", timeout_seconds=100)
    assert asked["status"] == "error" and asked["error"] == "timeout", asked
    assert asked["timeout_seconds"] == 2, asked
    assert asked["state_lost"] is False and asked["exception"]["ename"] == "KeyboardInterrupt"
    default = output(c, "time.sleep(60)", "t")
    assert default["error"] == "timeout" and default["timeout_seconds"] == 1, default
    assert ok(c, "kept", "t") == 7


# ---- logs and metrics ------------------------------------------------------------------------


def test_log_format_json_gives_one_json_object_a_line(
    server_factory: Callable[..., Server],
) -> None:
    srv = server_factory(["--log-format", "json", "--examples"])
    mine = "json-log-check-1"
    assert srv.client.get("/runtime/health", headers={"X-Request-ID": mine}).status == 200
    assert ok(srv.client, "1 + 1", "log") == 2
    assert srv.client.get("/no/such/route").status == 404
    assert srv.stop() == 0
    lines = [line for line in srv.logs().splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    records = []
    for line in lines:
        doc = json.loads(line)  # every line, not only the access log
        assert isinstance(doc, dict) and {"event", "level", "timestamp"} <= set(doc), doc
        records.append(doc)
    access = [r for r in records if r.get("request_id") == mine]
    assert len(access) == 1, records
    assert access[0]["method"] == "GET" and access[0]["path"] == "/runtime/health", access
    assert access[0]["status"] == 200 and access[0]["level"] == "info", access
    assert any(r.get("path", "").endswith("/invoke") and r["method"] == "POST" for r in records)
    assert any("listening on http://127.0.0.1" in r["event"] for r in records), records


def _metrics(client: Client) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of /metrics."""
    resp = client.get("/metrics")
    assert resp.status == 200, resp
    out: dict[str, float] = {}
    for line in resp.body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_count_invocations_kernel_starts_and_deaths(
    server_factory: Callable[..., Server],
) -> None:
    srv = server_factory(["--examples"])
    c = srv.client
    before = _metrics(c)
    assert ok(c, "1", "m1") == 1
    assert ok(c, "2", "m1") == 2
    assert output(c, "1 / 0", "m1")["status"] == "error"
    greet = c.invoke(f"{HELLO}/greet", {"session_id": "m2"})
    assert greet.status == 200 and greet.json()["output"] == {"greeting": "Hello, world!"}
    died = output(c, "import os\nos._exit(3)", "m1")
    assert died["status"] == "error" and died["kernel_exit"]["exit_code"] == 3, died
    assert ok(c, "3", "m1") == 3  # on a new kernel
    after = _metrics(c)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    code = 'agent="pixell-python-agent@0.1.0/code-executor"'
    assert delta(f'pixell_invocations_total{{{code},status="success"}}') == 3
    assert delta(f'pixell_invocations_total{{{code},status="error"}}') == 2
    assert delta(f'pixell_invocations_total{{agent="{HELLO}/greet",status="success"}}') == 1
    assert delta('pixell_kernel_starts_total{reason="new"}') == 2
    assert delta('pixell_kernel_starts_total{reason="restart"}') == 1
    assert delta("pixell_kernel_start_seconds_count") == 3
    # os._exit(3): the process exited (not a signal, not the memory limit).
    assert delta('pixell_kernel_deaths_total{reason="exit"}') == 1
    route = 'route="/runtime/agents/{id}/invoke"'
    assert delta(f'pixell_http_requests_total{{method="POST",{route},status="200"}}') == 6
    assert delta('pixell_invoke_duration_seconds_count{kind="code-executor"}') == 5
    assert after["pixell_packages_loaded"] == 2
    assert after["pixell_sessions_active"] == 2
    assert after['pixell_sessions{state="idle"}'] == 2
    assert after["pixell_queue_depth"] == 0
    assert after['pixell_package_loads_total{result="installed"}'] == 2


# ---- build, a raw slash, uids ----------------------------------------------------------------


def test_build_command_makes_an_apkg_that_loads_and_runs(srv: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "hello-handler", src / "hello-handler")
    doc = yaml.safe_load((src / "hello-handler" / "agent.yaml").read_text())
    doc["name"] = "built-hello"
    (src / "hello-handler" / "agent.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    done = subprocess.run(
        [console_script(), "build", str(src / "hello-handler"), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=minimal_env(tmp_path / "home"),
        timeout=120,
    )
    assert done.returncode == 0, done
    assert [p.name for p in out.iterdir()] == ["built-hello-0.1.0.apkg"]
    loaded = srv.client.load(out / "built-hello-0.1.0.apkg")
    assert loaded.status == 200 and loaded.json()["package_id"] == "built-hello@0.1.0", loaded
    answer = srv.client.invoke("built-hello@0.1.0/greet", {"name": "Ada"})
    assert answer.status == 200 and answer.json()["output"] == {"greeting": "Hello, Ada!"}, answer


def test_invoke_with_a_raw_slash_in_the_agent_id(srv: Server) -> None:
    body = json.dumps({"input": {"code": "result = 6 * 7", "session_id": "raw"}}).encode()
    headers = {"Content-Type": "application/json"}
    resp = srv.client.request("POST", f"/runtime/agents/{CE}/invoke", body, headers)
    assert resp.status == 200, resp
    assert resp.json()["agent_id"] == CE and resp.json()["output"]["result"] == 42, resp
    body = json.dumps({"input": {"name": "Raw"}}).encode()
    resp = srv.client.request("POST", f"/runtime/agents/{HELLO}/greet/invoke", body, headers)
    assert resp.status == 200, resp
    assert resp.json()["agent_id"] == f"{HELLO}/greet"
    assert resp.json()["output"] == {"greeting": "Hello, Raw!"}, resp


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_every_session_gets_a_uid_of_its_own(srv: Server) -> None:
    layer = srv.client.get("/runtime/sandbox").json()["layers"]["uid"]
    # This host (and CI) runs the server as root with bwrap: a real uid per session.
    assert layer["enabled"] is True and layer["gid_only"] is False, layer
    start, end = layer["range"]
    sids = ["uid-a", "uid-b", "uid-c"]
    with ThreadPoolExecutor(3) as pool:
        facts = list(pool.map(lambda s: ok(srv.client, "import os\nos.getuid()", s), sids))
    assert len(set(facts)) == 3 and all(start <= u <= end for u in facts), facts
    listed = sessions(srv.client)
    for sid, uid in zip(sids, facts, strict=True):
        tree = process_tree(listed[f"{PKG}:{sid}"]["kernel_pid"])
        # The host sees the same: the session's kernel process runs under its uid.
        assert uid in {_uid_of(p) for p in alive(tree)}, (sid, uid)


# ---- the operator's policy file --------------------------------------------------------------

FACTS = """
import errno, os, resource, socket


def _err(exc):
    return errno.errorcode.get(exc.errno, repr(exc))


def facts(data):
    out = {"uid": os.getuid(), "data_limit": resource.getrlimit(resource.RLIMIT_DATA)[0]}
    try:
        with socket.create_connection(("127.0.0.1", data["port"]), timeout=3):
            out["net"] = "connected"
    except OSError as exc:
        out["net"] = _err(exc)
    try:
        with open(data["file"]) as fh:
            out["read"] = fh.read()
    except OSError as exc:
        out["read"] = _err(exc)
    try:
        with open(data["file"], "a") as fh:
            fh.write("changed")
        out["write"] = "written"
    except OSError as exc:
        out["write"] = _err(exc)
    return out
"""


def _policy_package(base: Path, name: str) -> Path:
    manifest = manifest_yaml(name, entrypoint="main:facts", resource_tier=2)
    return make_apkg(base / f"{name}.apkg", {"agent.yaml": manifest, "main.py": FACTS})


def test_operator_policy_sets_tiers_network_and_data_dirs(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shared = data / "shared.txt"
    shared.write_text("operator data\n")
    shared.chmod(0o666)  # only the read-only bind may stop a write
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "default": {"tier": "small", "network": False},
                "packages": {
                    "tiered": {
                        "tier": "small",
                        "max_tier": "medium",
                        "network": True,
                        "data_dirs": [str(data)],
                    }
                },
            }
        )
    )
    srv = server_factory(env={"SANDBOX_CONFIG": str(policy)})
    for name in ("tiered", "plain"):
        assert srv.client.load(_policy_package(tmp_path, name)).status == 200
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)
    inp = {"port": listener.getsockname()[1], "file": str(shared)}

    def facts(name: str, sid: str, **extra: Any) -> dict[str, Any]:
        resp = srv.client.invoke(f"{name}@0.1.0/default", {**inp, "session_id": sid, **extra})
        assert resp.status == 200 and resp.json()["metadata"].get("error") is not True, resp
        return resp.json()["output"]

    with listener:
        tiered = facts("tiered", "a")
        accepted, _ = listener.accept()  # the allowed connection really arrived
        accepted.close()
        lowered = facts("tiered", "b", resource_tier=0)
        plain = facts("plain", "a")
    # The manifest asks for large (2): the operator's max_tier caps it at medium; a request
    # may lower it; a package without a rule stays at the default's small.
    assert 2 * GiB < tiered["data_limit"] <= 4 * GiB, tiered
    assert 1 * GiB <= lowered["data_limit"] < 2 * GiB, lowered
    assert 1 * GiB <= plain["data_limit"] < 2 * GiB, plain
    # Network only where the operator allows it.
    assert tiered["net"] == lowered["net"] == "connected", (tiered, lowered)
    assert plain["net"] != "connected", plain
    # data_dirs: bound read-only for the package that has them, absent for the other.
    assert tiered["read"] == "operator data\n" and tiered["write"] == "EROFS", tiered
    assert plain["read"] == "ENOENT" and plain["write"] in ("ENOENT", "EROFS"), plain
    assert shared.read_text() == "operator data\n"
    assert len({tiered["uid"], lowered["uid"], plain["uid"]}) == 3


# ---- --die-with-parent ----------------------------------------------------------------------


def _cleanup_after_sigkill(server_pid: int, run_dir: str) -> None:
    """What the SIGKILLed server could not remove: its session mounts, cgroups and run dir."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    for point in sorted((p for p in points if p.startswith(run_dir + "/")), key=len, reverse=True):
        libc.umount2(point.encode(), 2)  # MNT_DETACH
    for base in Path("/sys/fs/cgroup").iterdir():
        for d in base.glob(f"pkr-{server_pid}-*"):
            with contextlib.suppress(OSError):
                d.rmdir()
    shutil.rmtree(run_dir, ignore_errors=True)


def test_kernels_die_with_a_sigkilled_server(
    server_factory: Callable[..., Server], example_apkgs: dict[str, Path]
) -> None:
    srv = server_factory()
    for apkg in example_apkgs.values():
        assert srv.client.load(apkg).status == 200
    ok(srv.client, "import time", "k1")
    greet = srv.client.invoke(f"{HELLO}/greet", {"session_id": "k2"})
    assert greet.status == 200, greet
    listed = sessions(srv.client)
    run_dir = str(Path(listed[f"{PKG}:k1"]["connection_file"]).parents[2])
    with ThreadPoolExecutor(1) as pool:  # one kernel busy in a cell when the server dies
        busy = pool.submit(srv.client.invoke, CE, {"code": "time.sleep(60)", "session_id": "k1"})
        assert wait_for(lambda: sessions(srv.client)[f"{PKG}:k1"]["kernel_state"] == "busy")
        kernels = srv.descendants()
        assert len(kernels) >= 4 and alive(kernels) == kernels, kernels
        assert srv.proc is not None
        server_pid = srv.proc.pid
        try:
            assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
            with pytest.raises(OSError):  # the connection dies with the server
                busy.result(timeout=30)
            assert wait_for(lambda: not alive(kernels), 20), [
                (p, Path(f"/proc/{p}/cmdline").read_bytes()[:100]) for p in alive(kernels)
            ]
            # What the dead server left (its run dir, session tmpfs mounts, cgroups) is swept
            # by the next server that starts.
            with open("/proc/self/mountinfo") as fh:
                assert any(line.split()[4].startswith(run_dir + "/") for line in fh)
            server_factory(state_dir=srv.state_dir.parent / "state-next")
            assert not os.path.exists(run_dir)
            with open("/proc/self/mountinfo") as fh:
                left = [ln.split()[4] for ln in fh if ln.split()[4].startswith(run_dir + "/")]
            assert left == [], left
            cgroups = [
                d for b in Path("/sys/fs/cgroup").iterdir() for d in b.glob(f"pkr-{server_pid}-*")
            ]
            assert cgroups == [], cgroups
        finally:
            for pid in alive(kernels):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            _cleanup_after_sigkill(server_pid, run_dir)
