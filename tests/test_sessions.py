"""End-to-end tests of sessions and the code executor against a real server process (no mocks).

The server is ``python -m pixell_kernel_runtime serve`` on a free loopback port with the default
kernel spec (sandbox launcher in front of ipykernel); every call goes over HTTP. Tests that do
not disturb each other share one server per module and keep apart by ``session_id``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import (
    EXAMPLES,
    Client,
    Response,
    Server,
    make_apkg,
    manifest_yaml,
    process_tree,
    serving,
    wait_for,
)

from pixell_kernel_runtime.packages.builder import build_all

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
HELLO = "hello-handler@0.1.0"
ANSI = re.compile(r"\x1b\[")
CONTRACT_KEYS = ["status", "result", "stdout", "stderr", "session_id"]


# ---- helpers ---------------------------------------------------------------------------------


def strict_json(resp: Response) -> Any:
    """The body as JSON, refusing NaN / Infinity tokens (invalid for strict clients)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token} in {resp.body[:300]!r}")

    return json.loads(resp.body, parse_constant=refuse)


def call(client: Client, code: str, sid: str, agent: str = CE, **extra: Any) -> dict[str, Any]:
    """Invoke the code executor; the whole answer (HTTP 200 asserted)."""
    resp = client.invoke(agent, {"code": code, "session_id": sid, **extra})
    assert resp.status == 200, resp
    return strict_json(resp)


def run(client: Client, code: str, sid: str, **extra: Any) -> dict[str, Any]:
    """Invoke the code executor; its ``output``."""
    return call(client, code, sid, **extra)["output"]


def ok(client: Client, code: str, sid: str, **extra: Any) -> Any:
    """Run ``code``, assert success, return ``result``."""
    out = run(client, code, sid, **extra)
    assert out["status"] == "success", out
    return out["result"]


def skey(package_id: str, session_id: str) -> str:
    return f"{package_id}:{session_id}"


def session_url(key: str, suffix: str = "") -> str:
    return f"/runtime/sessions/{quote(key, safe='')}{suffix}"


def get_session(client: Client, key: str) -> dict[str, Any]:
    resp = client.get(session_url(key))
    assert resp.status == 200, resp
    return resp.json()


def sessions(client: Client) -> dict[str, dict[str, Any]]:
    resp = client.get("/runtime/sessions")
    assert resp.status == 200, resp
    return {s["id"]: s for s in resp.json()["sessions"]}


def pid_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an unreaped orphan is gone for good)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def ns_pid(pid: int) -> int | None:
    """The pid that host process ``pid`` has in its innermost pid namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def ipykernel_pids() -> set[int]:
    res = subprocess.run(["pgrep", "-f", "ipykernel_launcher"], capture_output=True, text=True)
    return {int(p) for p in res.stdout.split()}


def delete_sessions(client: Client, keys: list[str]) -> None:
    for key in keys:
        assert client.delete(session_url(key)).status == 200


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with both example packages loaded, shared by the tests of this module."""
    base = tmp_path_factory.mktemp("sessions")
    with serving(base / "state", build_all(EXAMPLES, base / "apkgs")) as server:
        yield server


@pytest.fixture
def client(srv: Server) -> Client:
    return srv.client


# ---- the seed's flow and the contract's output -----------------------------------------------


def test_seed_curl_flow_verbatim(server: Server, example_apkgs: dict[str, Path]) -> None:
    client = server.client
    loaded = client.post_json(
        "/runtime/packages/load", {"path": str(example_apkgs["pixell-python-agent"])}
    )
    assert loaded.status == 200, loaded
    assert loaded.json()["status"] == "success"
    assert loaded.json()["package_id"] == PKG
    assert CE in loaded.json()["agents"]

    # The body exactly as the seed's curl -d sends it, to the path exactly as it is written.
    body = r"""{
    "input": {
      "code": "result = 2 + 2\nprint(f\"The answer is {result}\")",
      "session_id": "test-session"
    }
  }"""
    resp = client.request(
        "POST",
        "/runtime/agents/pixell-python-agent@0.1.0%2Fcode-executor/invoke",
        body.encode(),
        {"Content-Type": "application/json"},
    )
    assert resp.status == 200, resp
    answer = strict_json(resp)
    assert answer["agent_id"] == CE
    assert {"agent_id", "output", "duration_ms", "trace_id", "metadata"} <= set(answer)
    out = answer["output"]
    assert list(out)[:5] == CONTRACT_KEYS
    assert out["status"] == "success"
    assert out["result"] == 4 and type(out["result"]) is int
    assert out["stdout"] == "The answer is 4\n"
    assert out["stderr"] == ""
    assert out["session_id"] == "test-session"

    # The same session keeps its state for the next call.
    assert ok(client, "result * 10", "test-session") == 40


def test_state_persists_across_calls(client: Client) -> None:
    sid = "state"
    assert ok(client, "x = 10\nitems = [1, 2, 3]", sid) is None
    assert ok(client, "x + sum(items)", sid) == 16
    # A comprehension and a closure over session variables (an exec with separate globals and
    # locals gets both wrong).
    assert ok(client, "result = [x * i for i in items]", sid) == [10, 20, 30]
    assert ok(client, "result = {k: x + k for k in items}", sid) == {"1": 11, "2": 12, "3": 13}
    ok(client, "def make_adder(n):\n    return lambda v: v + n + x\nadd5 = make_adder(5)", sid)
    assert ok(client, "add5(1)", sid) == 16
    ok(client, "x = 100", sid)
    assert ok(client, "add5(1)", sid) == 106  # the closure sees the session's current x
    # Functions, classes and imports persist.
    ok(
        client,
        "import math\nclass Circle:\n    def __init__(self, r):\n        self.r = r\n"
        "    def area(self):\n        return math.pi * self.r ** 2\ndef double(v):\n"
        "    return 2 * v",
        sid,
    )
    assert ok(client, "result = round(Circle(double(1)).area(), 4)", sid) == 12.5664
    assert ok(client, "math.sqrt(16)", sid) == 4.0
    # Magics: %timeit, %%capture (its captured output persists), %who.
    out = run(client, "%timeit -n1 -r1 double(3)", sid)
    assert out["status"] == "success", out
    assert "per loop" in out["stdout"]
    out = run(client, "%%capture captured\nprint('kept for later')", sid)
    assert out["status"] == "success", out
    assert out["stdout"] == "" and out["result"] is None  # not the `result` of a past call
    assert ok(client, "captured.stdout", sid) == "kept for later\n"
    out = run(client, "%who", sid)
    assert out["status"] == "success", out
    for name in ("Circle", "add5", "captured", "double", "items", "make_adder", "math", "x"):
        assert name in out["stdout"].split(), out["stdout"]


def test_pandas_analysis_across_calls(client: Client) -> None:
    sid = "pandas"
    out = run(
        client,
        "import numpy as np\nimport pandas as pd\n"
        "sales = pd.DataFrame({'region': ['n', 's', 'n', 'e'], 'units': [3, 5, 7, 9],"
        " 'price': [1.5, 2.0, 2.5, 3.0]})\n"
        "big = pd.DataFrame({'i': np.arange(1000), 'half': np.arange(1000) / 2})\n"
        "print(len(sales))",
        sid,
    )
    assert out["status"] == "success", out
    assert out["stdout"] == "4\n"

    described = ok(client, "result = sales.describe()", sid)
    assert described["type"] == "dataframe"
    assert described["columns"] == ["units", "price"]
    assert described["shape"] == [8, 2]
    assert described["truncated"] is False
    assert described["dtypes"] == {"units": "float64", "price": "float64"}
    assert described["index"] == ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    assert described["data"][0] == [4.0, 4.0]
    assert described["data"][1] == [6.0, 2.25]

    grouped = ok(client, "result = sales.groupby('region')['units'].sum()", sid)
    assert grouped["type"] == "series"
    assert dict(zip(grouped["index"], grouped["data"], strict=True)) == {"e": 9, "n": 10, "s": 5}

    frame = ok(client, "result = sales", sid)
    assert frame["type"] == "dataframe"
    assert frame["columns"] == ["region", "units", "price"]
    assert frame["shape"] == [4, 3]
    assert frame["dtypes"]["units"] == "int64" and frame["dtypes"]["price"] == "float64"
    # Strings are "object" columns before pandas 3, "str" from 3 on (the kernel's pandas is
    # this interpreter's).
    pandas_major = int(importlib.metadata.version("pandas").split(".")[0])
    assert frame["dtypes"]["region"] == ("str" if pandas_major >= 3 else "object"), frame
    assert frame["data"][1] == ["s", 5, 2.0]
    assert frame["truncated"] is False

    large = ok(client, "result = big", sid)
    assert large["type"] == "dataframe"
    assert large["shape"] == [1000, 2]
    assert large["truncated"] is True
    assert 0 < len(large["data"]) < 1000
    assert large["data"][3] == [3, 1.5]


def test_json_conversion_and_figures(client: Client) -> None:
    sid = "json"
    resp = client.invoke(
        CE,
        {
            "code": "import math\nimport numpy as np\n"
            "result = {'nan': float('nan'), 'np_nan': np.float64('nan'), 'i64': np.int64(7),"
            " 'f64': np.float64(2.5), 'inf': math.inf, 'ninf': -np.inf, 'b': np.bool_(True),"
            " 'arr': np.array([1.0, np.nan, 3.0]), 'nested': [np.int32(1), {'x': np.nan}]}",
            "session_id": sid,
        },
    )
    assert resp.status == 200, resp
    result = strict_json(resp)["output"]["result"]
    assert result == {
        "nan": None,
        "np_nan": None,
        "i64": 7,
        "f64": 2.5,
        "inf": None,
        "ninf": None,
        "b": True,
        "arr": [1.0, None, 3.0],
        "nested": [1, {"x": None}],
    }
    assert type(result["i64"]) is int and type(result["f64"]) is float
    # Bare scalars as the result, too.
    assert ok(client, "result = np.float64('nan')", sid) is None
    assert ok(client, "result = np.int64(2) ** 40", sid) == 2**40

    out = run(
        client,
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2, 3], [3, 1, 2])\n"
        "plt.show()",
        sid,
    )
    assert out["status"] == "success", out
    pngs = [o["data"]["image/png"] for o in out["outputs"] if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, out["outputs"]
    assert isinstance(pngs[0], str)
    assert base64.b64decode(pngs[0], validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_result_rule_and_call_metadata(client: Client) -> None:
    sid = "rule"
    first = run(client, "result = [1]", sid)
    assert first["result"] == [1]
    count = first["execution_count"]
    assert isinstance(count, int) and count >= 1
    assert isinstance(first["duration_ms"], int | float) and first["duration_ms"] > 0

    second = run(client, "y = 1", sid)
    assert second["result"] is None  # `result` was not bound by this call: not the stale [1]
    assert second["execution_count"] == count + 1
    assert ok(client, "result = result", sid) == [1]  # rebinding the same object counts
    assert ok(client, "y + 41", sid) == 42  # else the last expression's value
    assert ok(client, "result = 'bound'\n'expression'", sid) == "bound"  # `result` wins
    assert ok(client, "result = None\n5", sid) is None  # bound to None is still bound
    assert ok(client, "z = 3", sid) is None
    # A cell magic runs its body as a nested cell: the rule still holds.
    assert ok(client, "result = 'stale'", sid) == "stale"
    out = run(client, "%%capture cap\nprint('hidden')", sid)
    assert out["status"] == "success" and out["result"] is None, out
    assert ok(client, "%%capture\nresult = 9", sid) == 9
    assert ok(client, "def f():\n    result = 1\n    return result\nf()", sid) == 1
    previous = run(client, "result", sid)
    assert previous["result"] == 9  # the local in f() did not rebind it

    meta = call(client, "z * 2", sid)
    assert meta["output"]["result"] == 6
    assert meta["output"]["execution_count"] == previous["execution_count"] + 1
    assert meta["metadata"]["execution_count"] == meta["output"]["execution_count"]
    assert meta["duration_ms"] >= meta["output"]["duration_ms"] > 0


def test_exception_is_a_normal_answer(client: Client) -> None:
    sid = "exc"
    ok(client, "kept = 'still here'", sid)
    resp = client.invoke(
        CE,
        {
            "code": "def boom():\n    raise ValueError('bad input\\nsecond line')\n"
            "print('before')\nboom()",
            "session_id": sid,
        },
    )
    assert resp.status == 200, resp
    out = strict_json(resp)["output"]
    assert list(out)[:5] == ["status", "error", "stdout", "stderr", "session_id"]
    assert "result" not in out
    assert out["status"] == "error"
    assert out["error"] == "ValueError: bad input"
    assert "\n" not in out["error"]
    assert out["stdout"] == "before\n"
    exc = out["exception"]
    assert set(exc) >= {"ename", "evalue", "traceback"}
    assert exc["ename"] == "ValueError"
    assert exc["evalue"] == "bad input\nsecond line"
    assert "boom()" in exc["traceback"] and "ValueError" in exc["traceback"]
    assert not ANSI.search(exc["traceback"]), exc["traceback"]
    assert isinstance(out["execution_count"], int)
    assert out["duration_ms"] > 0
    # A syntax error is one line too.
    out = run(client, "def broken(:\n    pass", sid)
    assert out["status"] == "error" and out["error"].startswith("SyntaxError"), out
    assert "\n" not in out["error"]
    assert ok(client, "kept", sid) == "still here"


def test_system_exit_does_not_end_the_session(client: Client) -> None:
    sid = "sysexit"
    ok(client, "survivor = 42", sid)
    pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    for code in (
        "raise SystemExit",
        "raise SystemExit(3)",
        "import sys\nsys.exit('bye')",
    ):
        out = run(client, code, sid)
        assert out["status"] == "error", (code, out)
        assert out["exception"]["ename"] == "SystemExit", (code, out)
        assert out["session_restarted"] is False
    run(client, "exit()", sid)  # IPython's exit() neither
    assert ok(client, "survivor", sid) == 42
    assert get_session(client, skey(PKG, sid))["kernel_pid"] == pid
    assert get_session(client, skey(PKG, sid))["restarts"] == 0


def test_os_exit_is_reported_promptly_and_the_session_restarts(client: Client) -> None:
    sid = "osexit"
    ok(client, "doomed = 1", sid)
    old_pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    started = time.monotonic()
    answer = call(client, "import os\nos._exit(1)", sid, timeout_seconds=30)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    out = answer["output"]
    assert out["status"] == "error"
    assert "died" in out["error"] and re.search(r"\bcode 1\b", out["error"]), out["error"]
    assert out["state_lost"] is True
    assert out["kernel_exit"]["exit_code"] == 1 and out["kernel_exit"]["signal"] is None
    assert wait_for(lambda: not pid_alive(old_pid)), old_pid

    nxt = call(client, "'doomed' in globals()", sid)
    assert nxt["output"]["status"] == "success"
    assert nxt["output"]["result"] is False  # a fresh kernel
    assert nxt["output"]["session_restarted"] is True
    assert nxt["metadata"]["session_restarted"] is True
    assert "code 1" in nxt["metadata"]["restart_reason"]
    assert nxt["output"]["execution_count"] == 1
    info = get_session(client, skey(PKG, sid))
    assert info["kernel_pid"] != old_pid and info["restarts"] == 1
    # Reported once: the call after that is an ordinary one.
    assert call(client, "1", sid)["output"]["session_restarted"] is False


def test_sigkill_of_the_kernel_reports_the_signal(client: Client) -> None:
    sid = "sigkill"
    ok(client, "here = True", sid)
    out = run(client, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", sid)
    assert out["status"] == "error"
    assert "SIGKILL" in out["error"], out
    assert out["kernel_exit"]["signal"] == signal.SIGKILL
    assert out["kernel_exit"]["signal_name"] == "SIGKILL"
    nxt = call(client, "'here' in globals()", sid)
    assert nxt["output"]["result"] is False
    assert nxt["output"]["session_restarted"] is True
    assert "SIGKILL" in nxt["metadata"]["restart_reason"]


def test_kernel_killed_while_idle_is_noticed(client: Client) -> None:
    sid = "idle-kill"
    ok(client, "v = 1", sid)
    pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    tree = process_tree(pid)
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert wait_for(lambda: not any(pid_alive(p) for p in tree))
    nxt = call(client, "'v' in globals()", sid)
    assert nxt["output"]["status"] == "success"
    assert nxt["output"]["result"] is False
    assert nxt["output"]["session_restarted"] is True
    assert nxt["metadata"]["session_restarted"] is True
    assert get_session(client, skey(PKG, sid))["kernel_pid"] != pid


def test_infinite_loop_times_out_and_the_session_answers(client: Client) -> None:
    sid = "spin"
    ok(client, "n = 7", sid)
    started = time.monotonic()
    out = run(client, "while True:\n    pass", sid, timeout_seconds=2)
    elapsed = time.monotonic() - started
    assert out["status"] == "error"
    assert out["error"] == "timeout"
    assert out["timeout_seconds"] == 2
    assert 2 <= elapsed < 8, elapsed
    # A pure-Python loop takes the interrupt between bytecodes: the kernel and its state stay.
    assert out["state_lost"] is False, out
    assert out["exception"]["ename"] == "KeyboardInterrupt", out
    pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    after = run(client, "n", sid)
    assert after["status"] == "success" and after["result"] == 7, after
    assert after["session_restarted"] is False, after
    info = get_session(client, skey(PKG, sid))
    assert info["kernel_pid"] == pid and info["restarts"] == 0, info


def test_interrupted_sleep_keeps_state(client: Client) -> None:
    sid = "sleepy"
    ok(client, "import time\nkeep = 'yes'", sid)
    started = time.monotonic()
    out = run(client, "while True:\n    time.sleep(0.05)", sid, timeout_seconds=2)
    assert time.monotonic() - started < 6
    assert out["status"] == "error" and out["error"] == "timeout", out
    assert out["state_lost"] is False
    assert out["exception"]["ename"] == "KeyboardInterrupt"
    assert ok(client, "keep", sid) == "yes"


def test_a_kernel_idle_without_a_reply_is_not_restarted(client: Client) -> None:
    """An interrupt that lands in ipykernel's own code around a cell (a second SIGINT while the
    first one's traceback is shown; seen in CI with ten busy sessions on two cores) is
    swallowed by ipykernel, which goes idle without a reply. That is an interrupted call on a
    live kernel, not a stuck one to restart. The first cell arranges the same for the next
    one: a KeyboardInterrupt from IPython's transform_cell, which runs before the cell."""
    sid = "no-reply"
    arrange = (
        "keep = 'yes'\nip = get_ipython()\n"
        "def _once(cell):\n    del ip.transform_cell\n    raise KeyboardInterrupt\n"
        "ip.transform_cell = _once"
    )
    ok(client, arrange, sid)
    pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    out = run(client, "1", sid, timeout_seconds=2)
    assert out["status"] == "error" and out["error"] == "timeout", out
    assert out["state_lost"] is False, out
    assert out["exception"]["ename"] == "KeyboardInterrupt", out
    assert ok(client, "keep", sid) == "yes"
    info = get_session(client, skey(PKG, sid))
    assert info["kernel_pid"] == pid and info["restarts"] == 0, info


def test_cell_that_ignores_interrupts_restarts_the_kernel(client: Client) -> None:
    sid = "c-level"
    ok(client, "lost = 1", sid)
    pid = get_session(client, skey(PKG, sid))["kernel_pid"]
    started = time.monotonic()
    out = run(client, "sum(range(10**12))", sid, timeout_seconds=2)
    elapsed = time.monotonic() - started
    assert out["status"] == "error"
    assert out["error"] == "timeout"
    assert out["state_lost"] is True
    assert "restarted" in out["detail"]
    assert elapsed < 20, elapsed
    assert wait_for(lambda: not pid_alive(pid))
    after = run(client, "lost", sid)
    assert after["status"] == "error" and after["exception"]["ename"] == "NameError", after
    info = get_session(client, skey(PKG, sid))
    assert info["kernel_pid"] != pid and info["restarts"] == 1
    assert ok(client, "6 * 7", sid) == 42


def test_invoke_refusals(client: Client) -> None:
    private = client.invoke(f"{PKG}/ml-runner", {"code": "1"})
    assert private.status == 404, private
    assert private.json()["message"] == f"Agent not found: {PKG}/ml-runner"
    unknown = client.invoke("nope@9.9.9/x", {"code": "1"})
    assert unknown.status == 404
    assert unknown.json()["message"] == "Agent not found: nope@9.9.9/x"

    path = f"/runtime/agents/{quote(CE, safe='@')}/invoke"
    for bad_input in ([1, 2], "print(1)", 5):
        resp = client.post_json(path, {"input": bad_input})
        assert resp.status == 422, resp
        doc = resp.json()
        assert doc["error"] == "ValidationError" and doc["message"] == "Invalid request data"
        assert doc["details"][0]["loc"] == ["body", "input"]
    for bad in ({"session_id": "x"}, {"code": 5}, {}):
        resp = client.post_json(path, {"input": bad})
        assert resp.status == 422, resp
        assert resp.json()["details"][0]["loc"] == ["body", "input", "code"]
    resp = client.post_json(path, {"input": {"code": "1", "timeout_seconds": -1}})
    assert resp.status == 422, resp
    assert resp.json()["details"][0]["loc"] == ["body", "input", "timeout_seconds"], resp
    # None of these created a session.
    assert not [k for k in sessions(client) if k.endswith(":x")]


def test_sessions_are_keyed_by_package_and_session_id(client: Client) -> None:
    ok(client, "marker = 'code'", "shared")
    counted = client.invoke(f"{HELLO}/count", {"session_id": "shared"})
    assert counted.status == 200, counted
    assert counted.json()["output"] == {"count": 1}  # no state leaked in from the other package
    listed = sessions(client)
    code_s, hello_s = listed[skey(PKG, "shared")], listed[skey(HELLO, "shared")]
    assert code_s["session_id"] == hello_s["session_id"] == "shared"
    assert code_s["package_id"] == PKG and hello_s["package_id"] == HELLO
    assert code_s["kernel_pid"] != hello_s["kernel_pid"]
    assert ok(client, "marker", "shared") == "code"

    # No session_id: the session is "default", and it persists as well.
    resp = client.invoke(CE, {"code": "default_var = 5"})
    assert resp.status == 200 and resp.json()["output"]["status"] == "success", resp
    assert resp.json()["output"]["session_id"] == "default"
    assert resp.json()["metadata"]["session_id"] == "default"
    assert skey(PKG, "default") in sessions(client)
    assert client.invoke(CE, {"code": "default_var"}).json()["output"]["result"] == 5
    # context.session_id is accepted too.
    resp = client.post_json(
        f"/runtime/agents/{quote(CE, safe='@')}/invoke",
        {"input": {"code": "marker"}, "context": {"session_id": "shared"}},
    )
    assert resp.status == 200 and resp.json()["output"]["result"] == "code", resp


def test_sessions_run_in_parallel(client: Client) -> None:
    """Parallel means the cells' running times overlap: each records when it ran (the kernels
    share the host's clock), and every one started before any one ended."""
    sids = [f"par-{i}" for i in range(4)]
    cell = "t0 = time.time()\ntime.sleep(1.5)\n[t0, time.time()]"
    with ThreadPoolExecutor(len(sids)) as pool:
        assert all(r is None for r in pool.map(lambda s: ok(client, "import time", s), sids))
        outs = list(pool.map(lambda s: run(client, cell, s), sids))
    spans = [o["result"] for o in outs]
    assert all(end - start >= 1.5 for start, end in spans), spans
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    delete_sessions(client, [skey(PKG, s) for s in sids])


def busy_sessions(client: Client, sids: list[str]) -> list[dict[str, Any]]:
    listed = sessions(client)
    return [listed[skey(PKG, s)] for s in sids]


def test_health_stays_fast_while_sessions_burn_cpu(client: Client) -> None:
    sids = [f"cpu-{i}" for i in range(10)]
    with ThreadPoolExecutor(len(sids)) as pool:
        list(pool.map(lambda s: ok(client, "1", s), sids))  # kernels started
        started = time.monotonic()
        futures = [
            pool.submit(run, client, "sum(i * i for i in range(10**8))", s, timeout_seconds=3)
            for s in sids
        ]
        # The load is on while we probe: every session's cell is running.
        assert wait_for(
            lambda: all(s["kernel_state"] == "busy" for s in busy_sessions(client, sids)), 10
        ), busy_sessions(client, sids)
        assert not any(f.done() for f in futures)
        # The server answers while every kernel burns CPU (each probe within its own 10 s
        # timeout; how fast is bench/'s business).
        for _ in range(9):
            resp = client.get("/runtime/health", timeout=10)
            assert resp.status == 200 and resp.json()["status"] == "healthy"
        assert not all(f.done() for f in futures)
        outs = [f.result(timeout=60) for f in futures]
        wall = time.monotonic() - started
    for out in outs:
        # 10**8 squares take seconds of a whole core; ten sessions share two cores for 3 s.
        assert out["status"] == "error" and out["error"] == "timeout", out
        assert out["state_lost"] is False, out  # a Python loop takes the interrupt
    assert wall < 60, wall  # the 3 s deadlines fired, long before the calls' own timeouts
    delete_sessions(client, [skey(PKG, s) for s in sids])


def test_one_session_runs_calls_in_arrival_order(client: Client) -> None:
    sid = "order"
    ok(client, "import time\norder = []\nspans = []", sid)
    cell = "t0 = time.monotonic()\n{body}\norder.append({i})\nspans.append((t0, time.monotonic()))"
    with ThreadPoolExecutor(6) as pool:
        # The first call holds the session until every other call has been queued.
        futures = [pool.submit(run, client, cell.format(body="time.sleep(5)", i=0), sid)]
        assert wait_for(lambda: get_session(client, skey(PKG, sid))["kernel_state"] == "busy")
        for i in range(1, 6):
            futures.append(pool.submit(run, client, cell.format(body="time.sleep(0.05)", i=i), sid))
            # Call i has arrived (it waits in the queue) before call i + 1 is sent.
            assert wait_for(lambda i=i: get_session(client, skey(PKG, sid))["queued"] == i, 10)
        outs = [f.result(timeout=30) for f in futures]
    assert all(o["status"] == "success" for o in outs), outs
    assert ok(client, "order", sid) == [0, 1, 2, 3, 4, 5]
    spans = ok(client, "spans", sid)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # no overlap


def test_queue_overflow_answers_429(server_factory: Any, example_apkgs: dict[str, Path]) -> None:
    server = server_factory(env={"SESSION_QUEUE_SIZE": "2"})
    client = server.client
    assert client.load(example_apkgs["pixell-python-agent"]).status == 200
    ok(client, "import time", "busy")
    ok(client, "1", "other")
    with ThreadPoolExecutor(8) as pool:
        slow = pool.submit(run, client, "time.sleep(2.5)\n'slow'", "busy")
        assert wait_for(lambda: get_session(client, skey(PKG, "busy"))["kernel_state"] == "busy")
        burst = [
            pool.submit(client.invoke, CE, {"code": "'q'", "session_id": "busy"}) for _ in range(5)
        ]
        resps = [f.result(timeout=30) for f in burst]
        # Another session is not held up by the full queue.
        t0 = time.monotonic()
        assert ok(client, "'free'", "other") == "free"
        assert time.monotonic() - t0 < 1.5
        assert slow.result(timeout=30)["result"] == "slow"
    statuses = sorted(r.status for r in resps)
    assert statuses == [200, 200, 429, 429, 429], resps
    for r in resps:
        if r.status == 429:
            doc = r.json()
            assert doc["error"] == "TooManyRequests"
            assert "queued" in doc["message"] and "limit is 2" in doc["message"], doc
            assert "busy" in doc["message"]
        else:
            assert r.json()["output"]["result"] == "q"
    assert ok(client, "'after'", "busy") == "after"


# ---- the sessions API ------------------------------------------------------------------------


def test_sessions_api(client: Client) -> None:
    sid = "api"
    key = skey(PKG, sid)
    ok(
        client,
        "import pandas as pd\nframe = pd.DataFrame({'a': range(50), 'b': [0.5] * 50})\n"
        "numbers = [1, 2, 3]\ncount = 7\n_private = 1",
        sid,
    )
    before = time.time()
    ok(client, "import time", sid)

    listed = sessions(client)[key]
    assert listed["session_id"] == sid and listed["package_id"] == PKG
    assert listed["kernel_state"] == "idle"
    assert listed["executions"] == 2
    assert listed["restarts"] == 0 and listed["queued"] == 0, listed
    assert listed["kernel_rss_bytes"] > 10 * 1024 * 1024
    created = datetime.fromisoformat(listed["created"].replace("Z", "+00:00")).timestamp()
    last_used = datetime.fromisoformat(listed["last_used"].replace("Z", "+00:00")).timestamp()
    assert created <= last_used and last_used >= before - 1
    one = get_session(client, key)
    assert one["id"] == key and one["kernel_pid"] == listed["kernel_pid"]
    missing = client.get(session_url(skey(PKG, "no-such-session")))
    assert missing.status == 404 and missing.json()["error"] == "NotFound"

    resp = client.get(session_url(key, "/variables"))
    assert resp.status == 200, resp
    variables = {v["name"]: v for v in resp.json()["variables"]}
    assert "frame" in variables and "numbers" in variables and "count" in variables
    assert "_private" not in variables and "In" not in variables and "pd" not in variables
    assert variables["frame"]["type"].endswith("DataFrame")
    assert variables["frame"]["shape"] == [50, 2]
    assert variables["frame"]["size_bytes"] >= 50 * 2 * 8
    assert variables["numbers"]["type"] == "list" and variables["numbers"]["length"] == 3
    assert variables["numbers"]["size_bytes"] > 0
    assert variables["count"]["type"] == "int" and variables["count"]["size_bytes"] > 0

    # Interrupt a sleeping call from another thread: it ends at once, the state stays.
    holder: dict[str, Any] = {}

    started_marker = Path(ok(client, "import os\nos.getcwd()", sid)) / "sleeper-started"

    def sleeper() -> None:
        t0 = time.monotonic()
        holder["out"] = run(client, "open('sleeper-started', 'w').close()\ntime.sleep(30)", sid)
        holder["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=sleeper)
    thread.start()
    # The cell itself says it is running: the interrupt lands inside it, not before it.
    assert wait_for(started_marker.exists, 15)
    resp = client.post_json(session_url(key, "/interrupt"), {})
    assert resp.status == 200, resp
    thread.join(15)
    assert not thread.is_alive()
    assert holder["elapsed"] < 10
    assert holder["out"]["status"] == "error"
    assert holder["out"]["exception"]["ename"] == "KeyboardInterrupt"
    assert ok(client, "count", sid) == 7

    # Restart: a fresh process, the state is gone.
    pid = get_session(client, key)["kernel_pid"]
    resp = client.post_json(session_url(key, "/restart"), {})
    assert resp.status == 200, resp
    assert get_session(client, key)["kernel_pid"] != pid
    assert wait_for(lambda: not pid_alive(pid))
    out = run(client, "count", sid)
    assert out["status"] == "error" and out["exception"]["ename"] == "NameError", out

    # Delete: the kernel's processes and its working directory are gone.
    work = Path(ok(client, "import os\nos.getcwd()", sid))
    assert work.is_dir()
    pid = get_session(client, key)["kernel_pid"]
    tree = process_tree(pid)
    assert pid in tree and all(pid_alive(p) for p in tree)
    resp = client.delete(session_url(key))
    assert resp.status == 200, resp
    assert client.get(session_url(key)).status == 404
    assert key not in sessions(client)
    assert wait_for(lambda: not any(pid_alive(p) for p in tree)), [
        (p, cmdline(p)) for p in tree if pid_alive(p)
    ]
    assert not work.exists()
    for route in ("", "/variables"):
        assert client.get(session_url(key, route)).status == 404
    for route in ("/interrupt", "/restart"):
        assert client.post_json(session_url(key, route), {}).status == 404
    assert client.delete(session_url(key)).status == 404
    # The same session_id later starts from scratch.
    assert ok(client, "'count' in globals()", sid) is False


def test_deleting_a_session_during_a_call_answers_that_call(client: Client) -> None:
    sid = "delete-busy"
    key = skey(PKG, sid)
    ok(client, "import time", sid)
    pid = get_session(client, key)["kernel_pid"]
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.invoke, CE, {"code": "time.sleep(20)", "session_id": sid})
        assert wait_for(lambda: get_session(client, key)["kernel_state"] == "busy")
        queued = pool.submit(client.invoke, CE, {"code": "1", "session_id": sid})
        assert wait_for(lambda: get_session(client, key)["queued"] == 1)
        t0 = time.monotonic()
        assert client.delete(session_url(key)).status == 200
        answers = [running.result(timeout=30), queued.result(timeout=30)]
        assert time.monotonic() - t0 < 10
    for resp in answers:
        assert resp.status == 404, resp  # never a 500
        assert resp.json()["code"] == "session_closed"
    assert wait_for(lambda: not pid_alive(pid))


def orphan_kernels(server: Server) -> set[int]:
    """Kernel processes below the server that belong to no listed session."""
    assert server.proc is not None
    owned: set[int] = set()
    for s in sessions(server.client).values():
        if s["kernel_pid"]:
            owned |= process_tree(s["kernel_pid"])
    below = process_tree(server.proc.pid) - {server.proc.pid}
    return {p for p in below - owned if "ipykernel_launcher" in cmdline(p)}


def test_deleting_a_session_while_its_kernel_starts(srv: Server, client: Client) -> None:
    sid = "delete-starting"
    key = skey(PKG, sid)
    assert not orphan_kernels(srv)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.invoke, CE, {"code": "'never'", "session_id": sid})
        assert wait_for(lambda: key in sessions(client), 5, 0.01)
        assert get_session(client, key)["kernel_pid"] is None  # still starting
        assert client.delete(session_url(key)).status == 200
        resp = first.result(timeout=60)
    assert resp.status == 404, resp
    assert resp.json()["code"] == "session_closed"
    assert key not in sessions(client)
    # The kernel that was starting did not outlive its session.
    assert wait_for(lambda: not orphan_kernels(srv)), [cmdline(p) for p in orphan_kernels(srv)]


def test_unloading_a_package_shuts_its_sessions_down(client: Client, tmp_path: Path) -> None:
    apkg = make_apkg(
        tmp_path / "unload-me.apkg",
        {
            "agent.yaml": manifest_yaml("unload-me", entrypoint="main:handler"),
            "main.py": "import os\n\ndef handler(data):\n    return {'pid': os.getpid()}\n",
        },
    )
    assert client.load(apkg).status == 200
    ok(client, "bystander = 1", "bystander")
    agent = "unload-me@0.1.0/default"
    pids_seen = []
    for sid in ("u1", "u2"):
        resp = client.invoke(agent, {"session_id": sid})
        assert resp.status == 200 and resp.json()["metadata"].get("error") is not True, resp
        pids_seen.append(resp.json()["output"]["pid"])
    listed = sessions(client)
    keys = [skey("unload-me@0.1.0", s) for s in ("u1", "u2")]
    trees = [process_tree(listed[k]["kernel_pid"]) for k in keys]
    assert all(pid_alive(p) for tree in trees for p in tree)
    # Each handler ran in its own session's kernel: the pid it saw (in its pid namespace) is
    # that of a process in that session's tree, and of no other.
    for tree, resp in zip(trees, pids_seen, strict=True):
        owners = [p for p in tree if ns_pid(p) == resp]
        assert len(owners) == 1, (resp, {p: ns_pid(p) for p in tree})
    assert not trees[0] & trees[1]
    resp = client.delete("/runtime/packages/unload-me@0.1.0")
    assert resp.status == 200, resp
    after = sessions(client)
    assert not [k for k in after if k.startswith("unload-me@")]
    assert ok(client, "bystander", "bystander") == 1  # other packages' sessions untouched
    assert wait_for(lambda: not any(pid_alive(p) for tree in trees for p in tree))
    resp = client.invoke(agent, {"session_id": "u1"})
    assert resp.status == 404 and resp.json()["message"] == f"Agent not found: {agent}"


def test_info_counts_invocations_and_sessions(client: Client) -> None:
    before = client.get("/runtime/info").json()
    for i in range(3):
        ok(client, f"{i}", "info")
    greeted = client.invoke(f"{HELLO}/greet", {"session_id": "info"})
    assert greeted.status == 200 and greeted.json()["output"] == {"greeting": "Hello, world!"}
    assert client.invoke(f"{PKG}/ml-runner", {"code": "1"}).status == 404
    assert client.invoke("nope@1.0.0/x", {"code": "1"}).status == 404
    after = client.get("/runtime/info").json()
    assert after["total_invocations"] - before["total_invocations"] == 4
    listed = sessions(client)
    assert after["sessions"]["total"] == len(listed)
    assert after["sessions"]["active"] == sum(1 for s in listed.values() if s["kernel_pid"])
    assert after["sessions"]["created"] >= before["sessions"]["created"] + 1


# ---- package isolation -----------------------------------------------------------------------


def _clash_package(path: Path, name: str) -> Path:
    handler = (
        "import sys\n\nMARK = {mark!r}\n\n\n"
        "def handler(data):\n"
        "    return {{'mark': MARK, 'file': __file__, 'path': list(sys.path)}}\n"
    )
    doc = {
        "version": "0.1.0",
        "sub_agents": [
            {"name": "top", "description": "main:handler", "endpoint": "main:handler"},
            {"name": "nested", "description": "src.main:handler", "endpoint": "src.main:handler"},
        ],
    }
    return make_apkg(
        path,
        {
            "agent.yaml": manifest_yaml(name, entrypoint="main:handler", metadata=doc),
            "main.py": handler.format(mark=f"{name}/main"),
            "src/__init__.py": "",
            "src/main.py": handler.format(mark=f"{name}/src.main"),
        },
    )


def test_packages_with_the_same_module_names_stay_apart(client: Client, tmp_path: Path) -> None:
    for name in ("clash-a", "clash-b"):
        assert client.load(_clash_package(tmp_path / f"{name}.apkg", name)).status == 200
    got: dict[tuple[str, str], dict[str, Any]] = {}
    # Interleaved, in one session_id, so that any sharing would show.
    for export in ("top", "nested"):
        for name in ("clash-a", "clash-b", "clash-a"):
            resp = client.invoke(f"{name}@0.1.0/{export}", {"session_id": "same"})
            assert resp.status == 200, resp
            assert resp.json()["metadata"].get("error") is not True, resp.json()
            out = resp.json()["output"]
            assert out["mark"] == f"{name}/{'main' if export == 'top' else 'src.main'}", out
            got[(name, export)] = out
    roots = {name: str(Path(got[(name, "top")]["file"]).parent) for name in ("clash-a", "clash-b")}
    assert roots["clash-a"] != roots["clash-b"]
    for name, other in (("clash-a", "clash-b"), ("clash-b", "clash-a")):
        assert str(Path(got[(name, "nested")]["file"]).parent.parent) == roots[name]
        for export in ("top", "nested"):
            path = got[(name, export)]["path"]
            assert roots[name] in path
            assert not [p for p in path if p.startswith(roots[other])], path
    listed = sessions(client)
    pids = {listed[skey(f"{n}@0.1.0", "same")]["kernel_pid"] for n in ("clash-a", "clash-b")}
    assert len(pids) == 2


# ---- shutdown --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_no_kernel_survives_the_server(
    server_factory: Any, example_apkgs: dict[str, Path], sig: int
) -> None:
    # A grace shorter than the running call: it is cancelled (tests/test_shutdown.py has the
    # call that finishes within it).
    server = server_factory(env={"SHUTDOWN_GRACE_SECONDS": "1"})
    client = server.client
    for apkg in example_apkgs.values():
        assert client.load(apkg).status == 200
    ok(client, "x = 1", "s1")
    ok(client, "import time", "s2")
    counted = client.invoke(f"{HELLO}/count", {"session_id": "s3"})
    assert counted.status == 200 and counted.json()["output"] == {"count": 1}, counted
    listed = sessions(client)
    assert len(listed) == 3
    tree: set[int] = set()
    for s in listed.values():
        tree |= process_tree(s["kernel_pid"])
    assert len(tree) >= 3 and all(pid_alive(p) for p in tree)
    connection_files = {
        m.group(1) for p in tree for m in [re.search(r"-f (\S+connection\.json)", cmdline(p))] if m
    }
    assert len(connection_files) == 3, [cmdline(p) for p in tree]
    assert ipykernel_pids() & tree  # pgrep sees the kernels while the server runs

    # A call still running when the signal arrives must not keep anything alive either.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.invoke, CE, {"code": "time.sleep(30)", "session_id": "s2"})
        assert wait_for(lambda: get_session(client, skey(PKG, "s2"))["kernel_state"] == "busy")
        rc = server.stop(sig)
        # Past the grace, shutting down ends the running call first, and answers it so.
        answer = pending.result(timeout=30)
    assert rc == 0, server.logs()[-3000:]
    assert answer.status == 503 and answer.json()["code"] == "shutting_down", answer
    assert wait_for(lambda: not any(pid_alive(p) for p in tree)), [
        (p, cmdline(p)) for p in tree if pid_alive(p)
    ]
    left = ipykernel_pids()
    assert not left & tree
    assert not [p for p in left if any(f in cmdline(p) for f in connection_files)]
