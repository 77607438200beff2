"""End-to-end tests of handler agents (``module:function`` exports) run inside session kernels.

The example hello-handler and a small package built here are loaded into one real server
process; every call goes over HTTP.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
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
    serving,
    wait_for,
)

from pixell_kernel_runtime.packages.builder import build_all

HELLO = "hello-handler@0.1.0"
QUIRKY = "quirky@0.1.0"
ANSI = re.compile(r"\x1b\[")

QUIRKY_MAIN = """
import asyncio
import math
import os
import time

import numpy as np

calls = []


def fail(data):
    print("about to fail")
    raise ValueError("handler failed\\nwith detail")


async def fail_async(data):
    await asyncio.sleep(0)
    raise KeyError("missing")


def numbers(data):
    return {
        "nan": float("nan"),
        "inf": math.inf,
        "i64": np.int64(7),
        "f64": np.float64(1.5),
        "arr": np.array([1.0, np.nan]),
        "nested": {"deep": [np.float32(0.5), -math.inf]},
    }


def add(data):
    calls.append("sync")
    return {"sum": data["a"] + data["b"], "calls": list(calls)}


async def add_async(data):
    await asyncio.sleep(0.01)
    calls.append("async")
    return {"sum": data["a"] + data["b"], "calls": list(calls)}


def nothing(data):
    return None


def spin(data):
    while True:
        pass


def busy(data):
    open("busy-started", "w").close()  # in the session's work dir: the test waits for it
    while True:
        time.sleep(0.01)


def cwd(data):
    return os.getcwd()


def die(data):
    os._exit(3)
"""

QUIRKY_EXPORTS = [
    "fail",
    "fail_async",
    "numbers",
    "add",
    "add_async",
    "nothing",
    "spin",
    "busy",
    "die",
    "cwd",
]


def strict_json(resp: Response) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token} in {resp.body[:300]!r}")

    return json.loads(resp.body, parse_constant=refuse)


def invoke(client: Client, agent: str, input_: dict[str, Any]) -> dict[str, Any]:
    resp = client.invoke(agent, input_)
    assert resp.status == 200, resp
    return strict_json(resp)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("handlers")
    quirky = make_apkg(
        base / "quirky.apkg",
        {
            "agent.yaml": manifest_yaml(
                "quirky",
                entrypoint="main:add",
                metadata={
                    "version": "0.1.0",
                    "sub_agents": [
                        {"name": n.replace("_", "-"), "description": n, "endpoint": f"main:{n}"}
                        for n in QUIRKY_EXPORTS
                    ],
                },
            ),
            "main.py": QUIRKY_MAIN,
        },
    )
    with serving(base / "state", [*build_all(EXAMPLES, base / "apkgs"), quirky]) as server:
        yield server


@pytest.fixture
def client(srv: Server) -> Client:
    return srv.client


def test_greet_prints_to_metadata_and_returns_its_value(client: Client) -> None:
    answer = invoke(client, f"{HELLO}/greet", {"name": "Ada", "session_id": "g"})
    assert answer["agent_id"] == f"{HELLO}/greet"
    assert answer["output"] == {"greeting": "Hello, Ada!"}
    meta = answer["metadata"]
    assert meta["stdout"] == "greeting Ada\n"
    assert meta["stderr"] == ""
    assert meta["kind"] == "handler"
    assert meta["session_id"] == "g"
    assert meta.get("error") is not True
    # No session_id: the default session.
    answer = invoke(client, f"{HELLO}/greet", {})
    assert answer["output"] == {"greeting": "Hello, world!"}
    assert answer["metadata"]["session_id"] == "default"


def test_count_keeps_module_state_per_session(client: Client) -> None:
    agent = f"{HELLO}/count"
    assert [invoke(client, agent, {"session_id": "c1"})["output"] for _ in range(3)] == [
        {"count": 1},
        {"count": 2},
        {"count": 3},
    ]
    assert invoke(client, agent, {"session_id": "c1", "step": 10})["output"] == {"count": 13}
    assert invoke(client, agent, {"session_id": "c2"})["output"] == {"count": 1}
    assert invoke(client, agent, {"session_id": "c1"})["output"] == {"count": 14}
    assert invoke(client, agent, {"session_id": "c2"})["output"] == {"count": 2}


def test_echo_async_awaits_the_coroutine(client: Client) -> None:
    payload = {"session_id": "e", "x": [1, None, "z"], "nested": {"k": True}}
    answer = invoke(client, f"{HELLO}/echo-async", payload)
    assert answer["output"] == {"echo": payload}
    assert answer["metadata"].get("error") is not True


def test_sync_and_async_handlers_share_the_session(client: Client) -> None:
    sid = "pair"
    first = invoke(client, f"{QUIRKY}/add", {"a": 2, "b": 3, "session_id": sid})["output"]
    assert first == {"sum": 5, "calls": ["sync"]}
    second = invoke(client, f"{QUIRKY}/add-async", {"a": 4, "b": 5, "session_id": sid})["output"]
    assert second == {"sum": 9, "calls": ["sync", "async"]}
    other = invoke(client, f"{QUIRKY}/add-async", {"a": 1, "b": 1, "session_id": "pair-2"})
    assert other["output"] == {"sum": 2, "calls": ["async"]}
    assert invoke(client, f"{QUIRKY}/nothing", {"session_id": sid})["output"] is None


def test_handler_exceptions_are_error_answers(client: Client) -> None:
    sid = "fails"
    invoke(client, f"{QUIRKY}/add", {"a": 1, "b": 1, "session_id": sid})
    answer = invoke(client, f"{QUIRKY}/fail", {"session_id": sid})
    out = answer["output"]
    assert list(out)[:3] == ["status", "error", "exception"]
    assert out["status"] == "error"
    assert out["error"] == "ValueError: handler failed"
    assert out["exception"]["ename"] == "ValueError"
    assert out["exception"]["evalue"] == "handler failed\nwith detail"
    # The traceback reaches into the package's own source: the frame and the raising line.
    tb = out["exception"]["traceback"]
    assert "main.py:" in tb and "in fail(data)" in tb, tb
    assert 'raise ValueError("handler failed' in tb, tb
    assert not ANSI.search(tb)
    assert answer["metadata"]["error"] is True
    assert answer["metadata"]["stdout"] == "about to fail\n"

    answer = invoke(client, f"{QUIRKY}/fail-async", {"session_id": sid})
    assert answer["output"]["status"] == "error"
    assert answer["output"]["error"] == "KeyError: 'missing'"
    assert answer["output"]["exception"]["ename"] == "KeyError"
    assert answer["metadata"]["error"] is True
    # The session (and the module's state) is still there.
    after = invoke(client, f"{QUIRKY}/add", {"a": 1, "b": 2, "session_id": sid})
    assert after["output"] == {"sum": 3, "calls": ["sync", "sync"]}
    assert after["metadata"].get("error") is not True
    assert after["metadata"]["session_restarted"] is False


def test_handler_bad_input_is_an_error_answer(client: Client) -> None:
    answer = invoke(client, f"{QUIRKY}/add", {"a": 1, "session_id": "bad"})
    assert answer["output"]["status"] == "error"
    assert answer["output"]["error"] == "KeyError: 'b'"
    assert answer["metadata"]["error"] is True


def test_handler_return_values_are_converted_to_json(client: Client) -> None:
    answer = invoke(client, f"{QUIRKY}/numbers", {"session_id": "json"})
    assert answer["output"] == {
        "nan": None,
        "inf": None,
        "i64": 7,
        "f64": 1.5,
        "arr": [1.0, None],
        "nested": {"deep": [0.5, None]},
    }
    assert type(answer["output"]["i64"]) is int


def test_a_busy_handler_can_be_interrupted(client: Client) -> None:
    sid = "interrupt-me"
    key = f"{QUIRKY}:{sid}"
    invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    marker = Path(invoke(client, f"{QUIRKY}/cwd", {"session_id": sid})["output"]) / "busy-started"
    holder: dict[str, Any] = {}

    def spinner() -> None:
        t0 = time.monotonic()
        holder["answer"] = invoke(client, f"{QUIRKY}/busy", {"session_id": sid})
        holder["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=spinner)
    thread.start()
    url = f"/runtime/sessions/{quote(key, safe='')}"
    assert wait_for(lambda: client.get(url).json()["kernel_state"] == "busy")
    # The handler itself says it is running: the interrupt lands inside it.
    assert wait_for(marker.exists, 15)
    resp = client.post_json(f"{url}/interrupt", {})
    assert resp.status == 200, resp
    thread.join(15)
    assert not thread.is_alive()
    assert holder["elapsed"] < 10
    out = holder["answer"]["output"]
    assert out["status"] == "error" and out["exception"]["ename"] == "KeyboardInterrupt", out
    assert holder["answer"]["metadata"]["error"] is True
    kept = invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    assert kept["output"]["calls"] == ["sync", "sync"]  # the same kernel, its state intact
    assert client.get(url).json()["restarts"] == 0


def test_handler_timeout_and_death(client: Client) -> None:
    sid = "rough"
    invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    started = time.monotonic()
    answer = invoke(client, f"{QUIRKY}/busy", {"session_id": sid, "timeout_seconds": 2})
    assert time.monotonic() - started < 8
    assert answer["output"]["status"] == "error"
    assert answer["output"]["error"] == "timeout"
    # A synchronous handler takes the interrupt: the kernel and its module state stay.
    assert answer["output"]["state_lost"] is False
    assert answer["output"]["exception"]["ename"] == "KeyboardInterrupt"
    assert answer["metadata"]["error"] is True
    kept = invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    assert kept["output"]["calls"] == ["sync", "sync"]
    # A pure-Python spin takes the interrupt too: the same kernel, its module state kept.
    answer = invoke(client, f"{QUIRKY}/spin", {"session_id": sid, "timeout_seconds": 2})
    assert answer["output"]["error"] == "timeout"
    assert answer["output"]["state_lost"] is False, answer
    assert answer["output"]["exception"]["ename"] == "KeyboardInterrupt", answer
    after = invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    assert after["output"]["calls"] == ["sync", "sync", "sync"], after
    assert after["metadata"]["session_restarted"] is False, after

    started = time.monotonic()
    answer = invoke(client, f"{QUIRKY}/die", {"session_id": sid, "timeout_seconds": 30})
    assert time.monotonic() - started < 10
    assert answer["output"]["status"] == "error"
    assert "died" in answer["output"]["error"] and "code 3" in answer["output"]["error"]
    assert answer["metadata"]["error"] is True
    fresh = invoke(client, f"{QUIRKY}/add", {"a": 0, "b": 0, "session_id": sid})
    assert fresh["output"]["calls"] == ["sync"]  # a new kernel, the module imported anew
    assert fresh["metadata"]["session_restarted"] is True
