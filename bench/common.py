"""Start a real server for a benchmark, on a free loopback port, and stop it after."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(
    args: list[str], env: dict[str, str] | None = None, pid_out: list[int] | None = None
) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pkr-bench-") as state:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pixell_kernel_runtime",
                "serve",
                "--port",
                str(port),
                "--state-dir",
                state,
                "--log-level",
                "WARNING",
                *args,
            ],
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        if pid_out is not None:
            pid_out.append(proc.pid)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/runtime/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("server did not start") from None
                    time.sleep(0.1)
            yield port
        finally:
            proc.terminate()
            proc.wait(30)


def report(result: dict, json_path: Path | None) -> int:
    """Print the figures, and keep them in ``json_path`` when asked."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text)
    return 0
