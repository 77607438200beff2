"""A kernel that floods its output cannot grow the server's memory without bound.

Before the receive side was capped, three sessions printing 10 MB chunks in a loop grew the
server from 44 MB to 3.9 GB (libzmq queued up to 1000 whole messages per socket).
"""

from __future__ import annotations

import threading
import time

AGENT = "pixell-python-agent@0.1.0/code-executor"
# Hostile: the class's write, past the kernel-side output budget on the instance.
FLOOD = (
    "import sys\ns = 'x' * 10**7\nw = type(sys.stdout).write\n"
    "for i in range(120):\n    w(sys.stdout, s)\n    sys.stdout.flush()\n"
    "result = 1"
)
# Ordinary: a program that prints far more than an answer keeps.
PRINTS = "s = 'y' * 10**7\nfor i in range(50):\n    print(s)\nprint('end')\nresult = 5"


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}: not a live process")


def test_output_flood_keeps_server_memory_bounded(server_factory) -> None:
    srv = server_factory(["--examples"])
    pid = srv.proc.pid
    for i in range(2):  # kernels up first: their start is not what is measured
        warm = srv.client.invoke(AGENT, {"code": "1", "session_id": f"flood{i}"})
        assert warm.status == 200 and warm.json()["output"]["result"] == 1, warm
    before = _rss_mib(pid)
    peak = [before]
    answers: list = [None, None]
    done = threading.Event()

    def flood(i: int) -> None:
        answers[i] = srv.client.invoke(
            AGENT, {"code": FLOOD, "session_id": f"flood{i}", "timeout_seconds": 15}
        )

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    done.set()
    sampler.join()
    assert not any(w.is_alive() for w in workers), "a flooding call never answered"

    assert peak[0] - before < 400, f"server RSS grew by {peak[0] - before:.0f} MiB"
    for answer in answers:
        assert answer is not None and answer.status == 200, answer
        out = answer.json()["output"]
        # The flood ran to its end (the cell was not killed); what it printed was cut.
        assert out["status"] == "success" and out["result"] == 1, {**out, "stdout": "..."}
        # Marked as cut, with the totals: every one of the 120 x 10 MB writes was counted.
        assert out["truncated"] is True, {**out, "stdout": "..."}
        assert out["truncation"]["stdout"]["bytes_seen"] >= 120 * 10**7, out["truncation"]
        assert len(out["stdout"]) <= 1024 * 1024 + 64  # answers are cut at 1 MiB
    # Both sessions still work.
    for i in range(2):
        again = srv.client.invoke(AGENT, {"code": "result = 6 * 7", "session_id": f"flood{i}"})
        assert again.json()["output"]["result"] == 42, again
    health = srv.client.get("/runtime/health")
    assert health.status == 200 and health.json()["status"] == "healthy", health


def test_printing_past_the_budget_is_cut_at_the_source(server_factory) -> None:
    srv = server_factory(["--examples"])
    started = time.monotonic()
    answer = srv.client.invoke(AGENT, {"code": PRINTS, "session_id": "prints"})
    elapsed = time.monotonic() - started
    assert answer.status == 200, answer
    out = answer.json()["output"]
    assert out["status"] == "success" and out["result"] == 5, out
    assert "[output truncated by the runtime]" in out["stdout"]
    assert len(out["stdout"]) <= 1024 * 1024 + 64
    assert elapsed < 20, f"500 MB of prints took {elapsed:.1f}s: not cut at the source"
    # The budget is per call: the next call prints normally.
    again = srv.client.invoke(AGENT, {"code": "print('hello')", "session_id": "prints"})
    assert again.status == 200, again
    assert again.json()["output"]["stdout"] == "hello\n", again


def test_a_streamed_flood_costs_the_server_bounded_memory(server_factory) -> None:
    """The same hostile flood read as SSE: the stream carries what the caps keep, no more."""
    import http.client
    import json

    srv = server_factory(["--examples"])
    pid = srv.proc.pid
    warm = srv.client.invoke(AGENT, {"code": "1", "session_id": "sflood"})
    assert warm.status == 200, warm
    before = _rss_mib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=180)
    body = {"input": {"code": FLOOD, "session_id": "sflood", "timeout_seconds": 15}}
    conn.request("POST", f"/runtime/agents/{AGENT}/invoke?stream=true", json.dumps(body))
    resp = conn.getresponse()
    streamed, last = 0, None
    try:
        while line := resp.readline():
            streamed += len(line)
            if line.startswith(b"data: "):
                last = line
    finally:
        done.set()
        sampler.join()
        conn.close()
    assert peak[0] - before < 400, f"server RSS grew by {peak[0] - before:.0f} MiB"
    # 1.2 GB was written; the stream carried the kept MiB (and the final answer's copy).
    assert streamed < 4 * 1024 * 1024, streamed
    assert last is not None
    final = json.loads(last[6:])
    assert final["state"] == "done" and final["output"]["truncated"] is True, final["state"]
    assert final["output"]["truncation"]["stdout"]["bytes_seen"] >= 120 * 10**7
