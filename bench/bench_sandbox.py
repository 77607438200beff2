"""What the sandbox costs: a new session's first invoke (kernel start + first execute) and a
warm invoke, sandboxed (best_effort, every layer this host allows) against ``--sandbox off``,
both measured in the same run. Goal (issue 4): start ratio <= 1.2, warm overhead unchanged.

    python bench/bench_sandbox.py [--sessions 8] [--warm 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, start_server  # noqa: E402

AGENT = "/runtime/agents/pixell-python-agent@0.1.0%2Fcode-executor/invoke"


def invoke(conn: http.client.HTTPConnection, session: str) -> None:
    conn.request(
        "POST",
        AGENT,
        json.dumps({"input": {"code": "1+1", "session_id": session}}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200 or data["output"]["status"] != "success":
        raise RuntimeError(f"invoke failed: {resp.status} {data}")


def measure(mode: str, sessions: int, warm: int) -> dict[str, list[float]]:
    starts, warms = [], []
    with start_server(["--examples", "--sandbox", mode]) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        invoke(conn, "warmup")  # imports and caches warmed once per server
        for i in range(sessions):
            t0 = time.perf_counter()
            invoke(conn, f"s{i}")
            starts.append(time.perf_counter() - t0)
            conn.request("DELETE", f"/runtime/sessions/pixell-python-agent%400.1.0%3As{i}")
            conn.getresponse().read()
        for _ in range(20):
            invoke(conn, "warm")
        for _ in range(warm):
            t0 = time.perf_counter()
            invoke(conn, "warm")
            warms.append(time.perf_counter() - t0)
        conn.close()
    return {"start": starts, "warm": warms}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # Interleave the two modes so that machine noise hits both alike.
    runs: dict[str, dict[str, list[float]]] = {
        "off": {"start": [], "warm": []},
        "best_effort": {"start": [], "warm": []},
    }
    for _ in range(2):
        for mode in ("off", "best_effort"):
            got = measure(mode, args.sessions // 2 or 1, args.warm // 2 or 1)
            for key in got:
                runs[mode][key] += got[key]
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
    result = {
        "start_first_execute_off_ms": round(1000 * med["off"]["start"], 1),
        "start_first_execute_sandboxed_ms": round(1000 * med["best_effort"]["start"], 1),
        "start_ratio": round(med["best_effort"]["start"] / med["off"]["start"], 3),
        "goal_start_ratio": 1.2,
        "warm_p50_off_ms": round(1000 * med["off"]["warm"], 3),
        "warm_p50_sandboxed_ms": round(1000 * med["best_effort"]["warm"], 3),
        "warm_ratio": round(med["best_effort"]["warm"] / med["off"]["warm"], 3),
    }
    return report(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
