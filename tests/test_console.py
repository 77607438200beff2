"""A real `jupyter console` attached to a session's kernel shares its state with REST invokes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from conftest import minimal_env

SESSION = "pixell-python-agent@0.1.0:console"
AGENT = "pixell-python-agent@0.1.0/code-executor"


def _console(
    port: int, stdin: str, home: Path, session: str = SESSION
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pixell_kernel_runtime",
            "console",
            session,
            "--url",
            f"http://127.0.0.1:{port}",
            "--",
            "--simple-prompt",
            "--no-confirm-exit",
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        # Neither the developer's Jupyter config nor a PIXELL_RUNTIME_URL may steer it.
        env=minimal_env(home),
    )


def test_console_and_rest_share_one_kernel(server_factory, tmp_path: Path) -> None:
    srv = server_factory(["--examples"])
    c = srv.client
    answer = c.invoke(AGENT, {"code": "x = 41", "session_id": "console"})
    assert answer.status == 200 and answer.json()["output"]["status"] == "success", answer
    pid_before = c.get(f"/runtime/sessions/{quote(SESSION, safe='')}").json()["kernel_pid"]

    done = _console(srv.port, "print('from console', x + 1)\ny = 7\n", tmp_path / "home")
    assert done.returncode == 0, done.stderr
    assert "from console 42" in done.stdout, done.stdout

    # What the console defined is visible to the next REST call: the same kernel.
    answer = c.invoke(AGENT, {"code": "result = x + y", "session_id": "console"})
    assert answer.status == 200 and answer.json()["output"]["result"] == 48, answer
    assert answer.json()["output"]["session_restarted"] is False, answer
    assert c.get(f"/runtime/sessions/{quote(SESSION, safe='')}").json()["kernel_pid"] == pid_before


def test_console_unknown_session_says_so(server, tmp_path: Path) -> None:
    done = _console(server.port, "", tmp_path / "home", session="nope@1.0:none")
    assert done.returncode == 1
    assert "Session not found: nope@1.0:none" in done.stderr
