"""Package loading: a 30 MB APKG end to end, and server RSS growth during a 100 MB upload.

    python bench/bench_packages.py [--json out.json]

The original runtime aimed at loading under 5 s; it read uploads whole into
memory, so its RSS grew by the upload's size. Ours streams to disk.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, start_server  # noqa: E402

MiB = 1024 * 1024


def make_apkg(path: Path, megabytes: int, name: str) -> Path:
    """Incompressible content, so the archive is as large as its payload."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("agent.yaml", f"name: {name}\nversion: '1.0.0'\nentrypoint: main:handler\n")
        zf.writestr("main.py", "def handler(x):\n    return x\n")
        for i in range(megabytes):
            zf.writestr(f"data/blob{i:04d}.bin", os.urandom(MiB))
    return path


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def load_by_path(port: int, path: Path) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/runtime/packages/load",
        json.dumps({"path": str(path)}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(body)
    conn.request("DELETE", f"/runtime/packages/{json.loads(body)['package_id']}")
    conn.getresponse().read()
    return elapsed


def upload_streamed(port: int, path: Path) -> float:
    """Send the multipart body from disk in chunks: the client holds no copy either."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = len(head) + path.stat().st_size + len(tail)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    conn.putrequest("POST", "/runtime/packages/upload")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    conn.send(head)
    with open(path, "rb") as fh:
        while chunk := fh.read(256 * 1024):
            conn.send(chunk)
    conn.send(tail)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(body)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pkr-bench-pkg-") as d:
        small = make_apkg(Path(d) / "small.apkg", 30, "bench-thirty")
        big = make_apkg(Path(d) / "big.apkg", 100, "bench-hundred")
        sizes = (small.stat().st_size, big.stat().st_size)
        pids: list[int] = []
        with start_server(["--sandbox", "off"], pid_out=pids) as port:
            pid = pids[0]
            load_times = [load_by_path(port, small) for _ in range(args.repeat)]
            before = rss_kib(pid)
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kib(pid))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)
            sampler.start()
            up = upload_streamed(port, big)
            done.set()
            sampler.join()
    result = {
        "apkg_30mb_bytes": sizes[0],
        "apkg_100mb_bytes": sizes[1],
        "load_30mb_median_s": round(statistics.median(load_times), 3),
        "load_30mb_goal_s": 5.0,
        "upload_100mb_s": round(up, 3),
        "server_rss_before_mib": round(before / 1024, 1),
        "server_rss_peak_growth_mib": round((peak[0] - before) / 1024, 1),
    }
    return report(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
