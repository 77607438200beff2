"""Graceful shutdown: SIGTERM lets running calls and their streams finish, then stops clean."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Server, process_tree, wait_for

CE = "pixell-python-agent@0.1.0/code-executor"


def _stream(srv: Server, code: str, sid: str, out: list[Any], first: threading.Event) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    body = json.dumps({"input": {"code": code, "session_id": sid}}).encode()
    conn.request("POST", f"/runtime/agents/{CE}/invoke?stream=true", body=body)
    resp = conn.getresponse()
    lines = []
    while line := resp.readline():
        lines.append(line.decode())
        if line.startswith(b"event: stdout"):
            first.set()
    out.append("".join(lines))
    conn.close()


def test_sigterm_lets_running_calls_and_streams_finish_then_exits_clean(server_factory) -> None:
    srv = server_factory(["--examples"], env={"SHUTDOWN_GRACE_SECONDS": "30"})
    c = srv.client
    assert c.invoke(CE, {"code": "1", "session_id": "idle"}).status == 200
    plain: list[Any] = []
    streamed: list[Any] = []
    printed = threading.Event()
    code = "import time\nprint('start', flush=True)\ntime.sleep(2)\nprint('end')\n'finished'"
    t1 = threading.Thread(
        target=lambda: plain.append(c.invoke(CE, {"code": code, "session_id": "p"}))
    )
    t2 = threading.Thread(target=_stream, args=(srv, code, "s", streamed, printed))
    t1.start()
    t2.start()
    assert printed.wait(30), "the streamed call never started"
    assert wait_for(
        lambda: (
            c.get(f"/runtime/sessions/{CE.split('/')[0]}%3Ap").json().get("kernel_state") == "busy"
        ),
        timeout=30,
    )
    tree = process_tree(srv.proc.pid) - {srv.proc.pid}
    assert tree
    srv.proc.send_signal(signal.SIGTERM)
    # No new connections once the signal is in.
    assert wait_for(lambda: not _accepts(srv.port), timeout=10), "still accepting"
    rc = srv.proc.wait(60)
    t1.join(30)
    t2.join(30)
    assert rc == 0, srv.logs()[-3000:]
    assert plain and plain[0].status == 200, plain
    assert plain[0].json()["output"]["result"] == "finished", plain[0]
    assert streamed and "event: done" in streamed[0] and '"state": "done"' in streamed[0]
    assert "end\\n" in streamed[0]
    assert wait_for(lambda: not any(_alive(p) for p in tree), timeout=10)
    assert "shutting down: 2 calls running" in srv.logs()


def test_a_second_sigterm_does_not_wait(server_factory) -> None:
    srv = server_factory(["--examples"], env={"SHUTDOWN_GRACE_SECONDS": "120"})
    c = srv.client
    answers: list[Any] = []
    t = threading.Thread(
        target=lambda: answers.append(
            c.invoke(CE, {"code": "import time\ntime.sleep(100)", "session_id": "long"})
        )
    )
    t.start()
    assert wait_for(
        lambda: (
            c.get(f"/runtime/sessions/{CE.split('/')[0]}%3Along").status == 200
            and c.get(f"/runtime/sessions/{CE.split('/')[0]}%3Along").json()["kernel_state"]
            == "busy"
        ),
        timeout=30,
    )
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "shutting down: 1 calls running" in srv.logs(), timeout=10)
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(60)
    t.join(30)
    assert rc == 0, srv.logs()[-3000:]
    assert time.monotonic() - started < 60, "the second signal waited for the call"
    assert answers and answers[0].status == 503, answers
    assert answers[0].json()["code"] == "shutting_down", answers[0]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_no_stale_run_dir_after_shutdown(server_factory) -> None:
    srv = server_factory(["--examples"])
    assert srv.client.invoke(CE, {"code": "1", "session_id": "x"}).status == 200
    run_dirs = subprocess.run(
        ["ls", "/tmp"], capture_output=True, text=True, check=True
    ).stdout.split()
    mine = [d for d in run_dirs if d.startswith(f"pkr-{srv.proc.pid}-")]
    assert len(mine) == 1, mine
    assert srv.stop() == 0
    assert not (Path("/tmp") / mine[0]).exists()
