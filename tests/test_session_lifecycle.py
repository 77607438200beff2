"""A session's kernel over its life: restarts said once and always, death seen while idle,
reads that never restart, console activity that counts, typed 503s (issue 8, item 3).

Real servers on loopback, real sandboxed kernels, the example packages; a "console" is a
plain jupyter_client connected through the session's connection file, as `jupyter console
--existing` is. Order comes from events (an iopub status, a file the test creates, another
session being culled), never from sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES, Client, Server, serving, wait_for
from jupyter_client import BlockingKernelClient

from pixell_kernel_runtime.packages.builder import build_all

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
# A cell that ignores interrupts (C code holding the GIL): only a restart ends it.
DEAF = "sum(range(10**12))"


# ---- helpers ---------------------------------------------------------------------------------


def call(client: Client, code: str, sid: str, **extra: Any) -> dict[str, Any]:
    resp = client.invoke(CE, {"code": code, "session_id": sid, **extra})
    assert resp.status == 200, resp
    return resp.json()


def ok(client: Client, code: str, sid: str) -> Any:
    out = call(client, code, sid)["output"]
    assert out["status"] == "success", out
    return out["result"]


def url(sid: str, suffix: str = "") -> str:
    return f"/runtime/sessions/{quote(f'{PKG}:{sid}', safe='')}{suffix}"


def session(client: Client, sid: str) -> dict[str, Any]:
    resp = client.get(url(sid))
    assert resp.status == 200, resp
    return resp.json()


def listed(client: Client) -> dict[str, dict[str, Any]]:
    resp = client.get("/runtime/sessions")
    assert resp.status == 200, resp
    return {s["session_id"]: s for s in resp.json()["sessions"] if s["package_id"] == PKG}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def tree(pid: int) -> set[int]:
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in out or not alive(p):
            continue
        out.add(p)
        for task in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(OSError, ValueError):
                stack.extend(
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                )
    return out


@contextlib.contextmanager
def console(connection_file: str) -> Iterator[BlockingKernelClient]:
    """A second client on the session's kernel, as `jupyter console --existing` is."""
    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        yield kc
    finally:
        kc.stop_channels()


def wait_busy(kc: BlockingKernelClient, msg_id: str, timeout: float = 30.0) -> None:
    """Until the kernel broadcasts that it is busy with ``msg_id``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if (
            msg["msg_type"] == "status"
            and msg["parent_header"].get("msg_id") == msg_id
            and msg["content"]["execution_state"] == "busy"
        ):
            return
    raise AssertionError(f"the kernel never said it was busy with {msg_id}")


def reply(kc: BlockingKernelClient, msg_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_shell_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise AssertionError(f"no execute_reply for {msg_id}")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("lifecycle")
    with serving(base / "state", build_all(EXAMPLES, base / "apkgs")) as server:
        yield server


@pytest.fixture
def client(srv: Server) -> Client:
    return srv.client


@pytest.fixture
def examples(tmp_path: Path) -> list[Path]:
    return build_all(EXAMPLES, tmp_path / "apkgs")


def load_all(server: Server, apkgs: list[Path]) -> None:
    for apkg in apkgs:
        resp = server.client.load(apkg)
        assert resp.status == 200, resp


# ---- session_restarted means one thing ------------------------------------------------------


def test_a_timeout_restart_is_reported_by_the_next_call(client: Client) -> None:
    sid = "timeout-restart"
    ok(client, "x = 1", sid)
    pid = session(client, sid)["kernel_pid"]
    timed_out = call(client, DEAF, sid, timeout_seconds=2)
    out = timed_out["output"]
    assert out["error"] == "timeout" and out["state_lost"] is True, out
    # That call itself ran on the kernel the previous call ran on.
    assert out["session_restarted"] is False
    assert timed_out["metadata"]["session_restarted"] is False

    nxt = call(client, "'x' in globals()", sid)
    assert nxt["output"]["result"] is False  # another kernel ...
    assert nxt["output"]["session_restarted"] is True  # ... and the answer says so
    assert nxt["metadata"]["session_restarted"] is True
    assert "timeout" in nxt["metadata"]["restart_reason"], nxt["metadata"]
    info = session(client, sid)
    assert info["kernel_pid"] != pid and info["restarts"] == 1
    # Said once: the next call runs on the kernel this one ran on.
    again = call(client, "1", sid)
    assert again["output"]["session_restarted"] is False
    assert "restart_reason" not in again["metadata"]


def test_an_api_restart_is_reported_by_the_next_call(client: Client) -> None:
    sid = "api-restart"
    ok(client, "y = 1", sid)
    resp = client.post_json(url(sid, "/restart"), {})
    assert resp.status == 200, resp
    assert session(client, sid)["restarts"] == 1
    nxt = call(client, "'y' in globals()", sid)
    assert nxt["output"]["result"] is False
    assert nxt["output"]["session_restarted"] is True
    assert "restart" in nxt["metadata"]["restart_reason"], nxt["metadata"]
    assert call(client, "1", sid)["output"]["session_restarted"] is False


# ---- death while idle ------------------------------------------------------------------------


def test_a_kernel_that_dies_while_idle_shows_dead_without_a_call(client: Client) -> None:
    sid = "idle-death"
    ok(client, "v = 1", sid)
    pid = session(client, sid)["kernel_pid"]
    victims = tree(pid)
    assert pid in victims
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert wait_for(lambda: listed(client)[sid]["kernel_state"] == "dead", timeout=20), listed(
        client
    )[sid]
    info = session(client, sid)
    assert info["kernel_pid"] is None and info["restarts"] == 1, info
    nxt = call(client, "'v' in globals()", sid)
    assert nxt["output"]["result"] is False
    assert nxt["output"]["session_restarted"] is True
    assert "SIGKILL" in nxt["metadata"]["restart_reason"], nxt["metadata"]
    assert session(client, sid)["kernel_state"] == "idle"


# ---- a read never restarts -------------------------------------------------------------------


def test_reading_variables_never_interrupts_nor_restarts_a_busy_kernel(client: Client) -> None:
    sid = "variables-busy"
    work = Path(ok(client, "import os\nkept = 'yes'\nos.getcwd()", sid))
    go = work / "go"
    info = session(client, sid)
    with console(info["connection_file"]) as kc:
        # A console's cell that ignores interrupts (the read's deadline used to interrupt it,
        # then restart the kernel) and ends when the test says so.
        cell = (
            "import os, signal, time\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            f"while not os.path.exists({str(go)!r}):\n"
            "    time.sleep(0.05)\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "finished = True"
        )
        msg_id = kc.execute(cell)
        wait_busy(kc, msg_id)
        resp = client.get(url(sid, "/variables"))
        assert resp.status == 409, resp
        assert resp.json()["code"] == "kernel_busy", resp.json()
        after = session(client, sid)
        assert after["kernel_pid"] == info["kernel_pid"] and after["restarts"] == 0, after
        assert after["kernel_execution_state"] == "busy", after
        go.touch()
        done = reply(kc, msg_id)
        assert done["content"]["status"] == "ok", done["content"]
    nxt = call(client, "result = kept + str(finished)", sid)
    assert nxt["output"]["result"] == "yesTrue"  # the same kernel, its state whole
    assert nxt["output"]["session_restarted"] is False
    assert session(client, sid)["kernel_pid"] == info["kernel_pid"]


# ---- culling counts console activity ---------------------------------------------------------


def test_a_session_used_from_a_console_is_not_culled_mid_cell(
    server_factory: Any, examples: list[Path]
) -> None:
    server = server_factory(env={"SESSION_IDLE_SECONDS": "2"})
    load_all(server, examples)
    c = server.client
    work = Path(ok(c, "import os\nos.getcwd()", "console-busy"))
    go = work / "go"
    info = session(c, "console-busy")
    with console(info["connection_file"]) as kc:
        cell = (
            f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\nz = 3"
        )
        msg_id = kc.execute(cell)
        wait_busy(kc, msg_id)
        # A REST-only session used after the console's last REST call: once the culler has
        # removed it, it has had every chance to remove the console's session too.
        ok(c, "1", "rest-idle")
        assert wait_for(lambda: "rest-idle" not in listed(c), timeout=60)
        assert "console-busy" in listed(c)
        assert session(c, "console-busy")["kernel_pid"] == info["kernel_pid"]
        go.touch()
        done = reply(kc, msg_id)
        assert done["content"]["status"] == "ok", done["content"]
    assert ok(c, "z", "console-busy") == 3  # the same kernel, its state kept
    # Idle for real now: culled.
    assert wait_for(lambda: "console-busy" not in listed(c), timeout=60)


# ---- typed 503s ------------------------------------------------------------------------------

# A kernel spec whose kernel fails to start once for each `fail-next-start` file in its
# working directory (the session's, kept across restarts): a restart that cannot start a kernel.
FLAKY_KERNEL = (
    "import os, sys\n"
    "if os.path.exists('fail-next-start'):\n"
    "    os.remove('fail-next-start')\n"
    "    sys.exit(7)\n"
    "from ipykernel import kernelapp\n"
    "kernelapp.launch_new_instance()\n"
)


def flaky_kernels(tmp_path: Path) -> Path:
    spec = tmp_path / "kernels" / "pixell-python"
    spec.mkdir(parents=True)
    doc = {
        "argv": [sys.executable, "-c", FLAKY_KERNEL, "-f", "{connection_file}"],
        "display_name": "flaky",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"kernel_provisioner": {"provisioner_name": "pixell-sandbox", "config": {}}},
    }
    (spec / "kernel.json").write_text(json.dumps(doc))
    return spec.parent


def test_a_restart_that_cannot_start_a_kernel_is_a_503(
    server_factory: Any, examples: list[Path], tmp_path: Path
) -> None:
    server = server_factory(env={"KERNELS_DIR": str(flaky_kernels(tmp_path))})
    load_all(server, examples)
    c = server.client
    sid = "flaky"
    ok(c, "x = 1\nopen('fail-next-start', 'w').close()", sid)

    resp = c.post_json(url(sid, "/restart"), {})
    assert resp.status == 503, resp
    doc = resp.json()
    assert doc["error"] == "ServiceUnavailable" and doc["code"] == "kernel_start_failed", doc
    assert "restart" in doc["message"], doc
    info = session(c, sid)
    assert info["kernel_state"] == "dead" and info["restarts"] == 1, info
    nxt = call(c, "'x' in globals()", sid)
    assert nxt["output"]["result"] is False
    assert nxt["output"]["session_restarted"] is True
    assert "restart" in nxt["metadata"]["restart_reason"], nxt["metadata"]

    # The restart after a timeout goes the same way.
    ok(c, "open('fail-next-start', 'w').close()", sid)
    resp = c.invoke(CE, {"code": DEAF, "session_id": sid, "timeout_seconds": 2})
    assert resp.status == 503, resp
    doc = resp.json()
    assert doc["code"] == "kernel_start_failed" and "timeout" in doc["message"], doc
    info = session(c, sid)
    assert info["kernel_state"] == "dead" and info["restarts"] == 2, info
    nxt = call(c, "1", sid)
    assert nxt["output"]["result"] == 1
    assert nxt["output"]["session_restarted"] is True


def test_no_free_sandbox_uid_is_a_503_that_changes_nothing(
    server_factory: Any, examples: list[Path], tmp_path: Path
) -> None:
    # Two uids: the sandbox probe's and one session's. A range of this test's own.
    start = 900_000 + (os.getpid() % 5000) * 2
    config = tmp_path / "sandbox.json"
    config.write_text(json.dumps({"uids": {"start": start, "count": 2}}))
    server = server_factory(env={"SANDBOX_CONFIG": str(config)})
    layers = server.client.get("/runtime/sandbox").json()["layers"]
    assert layers["uid"]["enabled"] is True, layers["uid"]  # this host runs kernels as root
    load_all(server, examples)
    c = server.client
    ok(c, "a = 1", "first")
    resp = c.invoke(CE, {"code": "1", "session_id": "second"})
    assert resp.status == 503, resp
    doc = resp.json()
    assert doc["code"] == "sandbox_unavailable" and "uid" in doc["message"], doc
    assert set(listed(c)) == {"first"}
    assert ok(c, "a", "first") == 1
    # Its uid back, the next session gets it.
    assert c.delete(url("first")).status == 200
    assert ok(c, "2", "second") == 2


# ---- start-up ------------------------------------------------------------------------------


def test_a_bad_sandbox_config_leaves_no_run_dir(tmp_path: Path) -> None:
    config = tmp_path / "sandbox.json"
    config.write_text(json.dumps({"bogus": 1}))
    server = Server(tmp_path / "state", env={"SANDBOX_CONFIG": str(config)})
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            server.start()
    finally:
        server.stop()
    logs = server.logs()
    assert "unknown keys ['bogus']" in logs, logs
    made = re.findall(r"run dir (/tmp/pkr-[A-Za-z0-9_]+)", logs)
    assert len(made) == 1, logs
    assert not Path(made[0]).exists()
