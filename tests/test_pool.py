"""The warm pool and the session lifecycle: kernels ready ahead of demand, never recycled;
MAX_SESSIONS and the memory budget evict the least recently used idle session or refuse."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from urllib.parse import quote

from conftest import Server, process_tree, wait_for

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"


def _pool(srv: Server) -> dict[str, Any]:
    info = srv.client.get("/runtime/info")
    assert info.status == 200, info
    return info.json()["pool"]


def _run(srv: Server, code: str, sid: str) -> dict[str, Any]:
    answer = srv.client.invoke(CE, {"code": code, "session_id": sid})
    assert answer.status == 200, answer
    return answer.json()["output"]


def _session(srv: Server, sid: str) -> dict[str, Any]:
    got = srv.client.get(f"/runtime/sessions/{quote(f'{PKG}:{sid}', safe='')}")
    assert got.status == 200, got
    return got.json()


def _kernels(srv: Server) -> set[int]:
    """Kernel processes under the server (warm and in sessions): the launcher's inner stage
    runs the kernel in its own process (bwrap's processes around it say nothing of it)."""
    out = set()
    for pid in process_tree(srv.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if (
            not argv[0].endswith(b"bwrap")
            and b"--stage" in argv
            and argv[argv.index(b"--stage") + 1 : argv.index(b"--stage") + 2] == [b"inner"]
        ):
            out.add(pid)
    return out


def test_new_sessions_take_warm_kernels_that_are_never_recycled(server_factory) -> None:
    srv = server_factory(["--examples"], env={"POOL_SIZE": "1"})
    # One warm kernel per loaded package (two examples), started before any call.
    assert wait_for(lambda: _pool(srv)["ready"] == 2, timeout=60), _pool(srv)
    warm = _kernels(srv)
    assert len(warm) == 2, warm
    out = _run(srv, "x = 1\nimport os\nresult = os.getpid()", "a")
    assert out["status"] == "success" and out["session_restarted"] is False, out
    pool = _pool(srv)
    assert (pool["hits"], pool["misses"]) == (1, 0), pool
    # The session runs on a kernel that was warm before the call came.
    assert process_tree(_session(srv, "a")["kernel_pid"]) & warm, (warm, _session(srv, "a"))
    # The pool refills in the background, with a kernel of its own.
    assert wait_for(lambda: _pool(srv)["ready"] == 2, timeout=60), _pool(srv)
    refilled = _kernels(srv) - warm
    assert len(refilled) == 1, (warm, _kernels(srv))
    # The next session gets that fresh kernel: nothing of session a's state.
    b = _run(srv, "result = 'x' in globals()", "b")
    assert b["result"] is False, b
    # A session's kernel goes with the session; it never goes back to the pool.
    before = _kernels(srv)
    assert srv.client.delete(f"/runtime/sessions/{quote(f'{PKG}:a', safe='')}").status == 200
    assert wait_for(lambda: len(before - _kernels(srv)) == 1, timeout=30)
    assert _pool(srv)["ready"] <= 2


def test_warm_kernels_can_preload_heavy_imports_without_touching_the_namespace(
    server_factory,
) -> None:
    srv = server_factory(["--examples"], env={"POOL_SIZE": "1", "POOL_PRELOAD": "pandas"})
    assert wait_for(lambda: _pool(srv)["ready"] == 2, timeout=90), _pool(srv)
    out = _run(srv, "import sys\nresult = ['pandas' in sys.modules, 'pandas' in dir()]", "p")
    assert out["result"] == [True, False], out
    assert _pool(srv)["hits"] == 1


def test_past_max_sessions_the_lru_idle_session_goes_or_a_503_says_when(server_factory) -> None:
    lru = server_factory(["--examples"], env={"MAX_SESSIONS": "2"})

    def call(code: str, sid: str) -> None:
        # Activity counts from the kernel's status broadcasts too: wait until the watcher has
        # seen this call's busy and idle, so that the order of activity is the calls' order.
        before = time.time()
        assert _run(lru, code, sid)["status"] == "success"

        def seen() -> bool:
            got = _session(lru, sid)
            at = datetime.fromisoformat(got["last_activity"].replace("Z", "+00:00")).timestamp()
            return got["kernel_execution_state"] == "idle" and at >= before - 0.001

        assert wait_for(seen, timeout=10), _session(lru, sid)

    call("1", "s1")
    call("1", "s2")
    call("2", "s1")  # s2 is now the least recently used
    assert _run(lru, "3", "s3")["status"] == "success"
    ids = {s["session_id"] for s in lru.client.get("/runtime/sessions").json()["sessions"]}
    assert ids == {"s1", "s3"}, ids

    refuse = server_factory(["--examples"], env={"MAX_SESSIONS": "1", "SESSION_EVICTION": "refuse"})
    assert _run(refuse, "1", "only")["status"] == "success"
    full = refuse.client.invoke(CE, {"code": "1", "session_id": "second"})
    assert full.status == 503 and full.json()["code"] == "too_many_sessions", full
    assert full.headers["retry-after"] == "30", full.headers
    assert "MAX_SESSIONS" in full.json()["message"]


def test_the_memory_budget_evicts_or_refuses(server_factory, tmp_path) -> None:
    # What one idle kernel holds here (IPython versions differ by ~16 MiB): the budget is
    # room for two of them and a half, not three.
    probe = server_factory(["--examples"], state_dir=tmp_path / "probe")
    assert _run(probe, "1", "size")["status"] == "success"
    one = _session(probe, "size")["kernel_rss_bytes"]
    assert isinstance(one, int) and one > 20 * 1024 * 1024, one
    probe.stop()
    budget = {"KERNELS_MEMORY_BUDGET": str(int(one * 2.5))}
    srv = server_factory(["--examples"], env=budget, state_dir=tmp_path / "lru")
    for sid in ("m1", "m2"):
        assert _run(srv, "1", sid)["status"] == "success"
    assert _run(srv, "1", "m3")["status"] == "success"
    ids = {s["session_id"] for s in srv.client.get("/runtime/sessions").json()["sessions"]}
    assert "m1" not in ids and "m3" in ids, ids

    strict = server_factory(
        ["--examples"], env={**budget, "SESSION_EVICTION": "refuse"}, state_dir=tmp_path / "refuse"
    )
    for sid in ("m1", "m2"):
        assert _run(strict, "1", sid)["status"] == "success"
    full = strict.client.invoke(CE, {"code": "1", "session_id": "m3"})
    assert full.status == 503 and full.json()["code"] == "memory_budget", full
    assert "KERNELS_MEMORY_BUDGET" in full.json()["message"] and full.headers["retry-after"]


def test_sessions_show_the_seconds_left_before_culling(server_factory) -> None:
    srv = server_factory(["--examples"], env={"SESSION_IDLE_SECONDS": "600"})
    assert _run(srv, "1", "c")["status"] == "success"
    # None while the kernel still says busy (its idle status arrives a moment after the answer).
    assert wait_for(lambda: _session(srv, "c")["idle_seconds_left"] is not None, timeout=5)
    left = _session(srv, "c")["idle_seconds_left"]
    assert 590 < left <= 600, left
    listed = srv.client.get("/runtime/sessions").json()["sessions"]
    assert [s["idle_seconds_left"] for s in listed][0] <= left
