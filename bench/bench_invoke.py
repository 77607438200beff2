"""Warm invoke round trip of ``1+1`` through HTTP, against a raw jupyter_client execute.

Both are measured in the same run on the same machine, and reported as a ratio
(the machines here are shared and noisy; absolute figures mean little).
Goal (issue 3): p50 ratio <= 1.5, and throughput over 8 parallel sessions.

    python bench/bench_invoke.py [--n 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, start_server  # noqa: E402

AGENT = "/runtime/agents/pixell-python-agent@0.1.0%2Fcode-executor/invoke"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def raw_baseline(n: int) -> list[float]:
    """Execute ``1+1`` on a plain ipc ipykernel and wait for reply and idle, as a client must."""
    with tempfile.TemporaryDirectory(prefix="pkrb-", dir="/tmp") as d:
        km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=f"{d}/s")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        times = []
        try:
            for i in range(n + 20):
                t0 = time.perf_counter()
                # jupyter_client's own round trip: reply and iopub idle, outputs gathered.
                await kc.execute_interactive("1+1", output_hook=lambda msg: None, timeout=10)
                if i >= 20:
                    times.append(time.perf_counter() - t0)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    return times


def invoke(conn: http.client.HTTPConnection, session: str, code: str = "1+1") -> dict:
    body = json.dumps({"input": {"code": code, "session_id": session}})
    conn.request("POST", AGENT, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200 or data["output"]["status"] != "success":
        raise RuntimeError(f"invoke failed: {resp.status} {data}")
    return data


def http_invokes(port: int, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(20):
        invoke(conn, "bench")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        invoke(conn, "bench")
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


def throughput(port: int, sessions: int, seconds: float) -> float:
    counts = [0] * sessions
    window = {"stop": 0.0}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        invoke(conn, f"tp-{i}")  # start the kernel outside the window
        barrier.wait()
        while time.monotonic() < window["stop"]:
            invoke(conn, f"tp-{i}")
            counts[i] += 1
        conn.close()

    # The window opens once every session's kernel is up.
    barrier = threading.Barrier(
        sessions, action=lambda: window.update(stop=time.monotonic() + seconds)
    )
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    raw = asyncio.run(raw_baseline(args.n))
    with start_server(["--examples"]) as port:
        ours = http_invokes(port, args.n)
        tput = throughput(port, args.sessions, args.seconds)
        single = 1.0 / statistics.median(ours)
    result = {
        "raw_p50_ms": round(1000 * statistics.median(raw), 3),
        "raw_p95_ms": round(1000 * pct(raw, 0.95), 3),
        "invoke_p50_ms": round(1000 * statistics.median(ours), 3),
        "invoke_p95_ms": round(1000 * pct(ours, 0.95), 3),
        "p50_ratio": round(statistics.median(ours) / statistics.median(raw), 3),
        "goal_p50_ratio": 1.5,
        "throughput_8_sessions_per_s": round(tput, 1),
        "throughput_1_session_per_s": round(single, 1),
    }
    return report(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
