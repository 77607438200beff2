"""A real `jupyter console` attached to a session's kernel shares its state with REST invokes.

Piped (stdin, ``--simple-prompt``) and through a pseudo-terminal, as a user types: the full
prompt_toolkit front-end, left with ``exit`` / ``quit()`` (the kernel lives on: the kernel-side
``ask_exit`` payload says ``keepkernel``). The connection info comes from
``GET /runtime/sessions/{id}/connection`` (attach scope), built from the runtime's memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
from conftest import Client, Server, minimal_env, stop_all
from jwks_server import assert_forbidden, create_token, request

from pixell_kernel_runtime.api.session_openapi import CONNECTION_ANSWER

PKG = "pixell-python-agent@0.1.0"
SESSION = f"{PKG}:console"
AGENT = f"{PKG}/code-executor"
SOCKETS = ("shell", "iopub", "stdin", "control", "hb")


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


def _path(session: str, tail: str = "") -> str:
    return f"/runtime/sessions/{quote(session, safe='')}{tail}"


def _ok(c: Client, code: str, sid: str) -> dict[str, Any]:
    answer = c.invoke(AGENT, {"code": code, "session_id": sid})
    assert answer.status == 200, answer
    out = answer.json()["output"]
    assert out["status"] == "success", out
    return out


def _session(c: Client, session: str) -> dict[str, Any]:
    resp = c.get(_path(session))
    assert resp.status == 200, resp
    return resp.json()


class Terminal:
    """A program on a pseudo-terminal; every read is bounded by a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        # prompt_toolkit lays its prompt out by the window size: give it a real one.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.output = b""
        self.mark = 0  # expect() looks only at what came after the last match

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed its side
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, needle: bytes, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output[self.mark :]:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.5)) and self.proc.poll() is not None):
                raise AssertionError(f"{needle!r} not seen; the terminal showed:\n{self.tail()}")
        self.mark = self.output.index(needle, self.mark) + len(needle)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        """The program's exit code; what it prints meanwhile is read (a full pty blocks it)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"still running after {timeout}s:\n{self.tail()}")
            self._read(0.1)
        while self._read(0.05):
            pass
        return self.proc.returncode

    def tail(self) -> str:
        return self.output[-3000:].decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def _terminal_env(home: Path, **extra: str) -> dict[str, str]:
    return {**minimal_env(home), "TERM": "xterm-256color", **extra}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("console") / "state", ["--examples"]).start()
    try:
        yield server
    finally:
        stop_all([server])


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


def test_connection_is_what_the_kernel_listens_on(srv: Server) -> None:
    c = srv.client
    _ok(c, "here = 1", "conn")
    session = f"{PKG}:conn"
    summary = _session(c, session)
    resp = c.get(_path(session, "/connection"))
    assert resp.status == 200, resp
    body = resp.json()
    jsonschema.validate(body, CONNECTION_ANSWER)  # as the OpenAPI document says
    assert body["id"] == session and body["kernel_id"] == summary["kernel_id"]
    info = body["connection"]
    assert info["transport"] == "ipc" and info["signature_scheme"] == "hmac-sha256"
    assert info["kernel_name"] == "pixell-python"
    assert len(info["key"]) >= 32
    # The same as the connection file the server wrote for the kernel (read here only to
    # compare: the runtime answers from its kernel manager, never from a file).
    written = json.loads(Path(summary["connection_file"]).read_text())
    assert {k: written[k] for k in info} == info
    for name in SOCKETS:
        path = body["paths"][name]
        assert path == f"{info['ip']}-{info[f'{name}_port']}"
        assert stat.S_ISSOCK(os.stat(path).st_mode), path

    # A session whose kernel died has nothing to attach to until it gets a new kernel.
    dead = c.invoke(AGENT, {"code": "import os; os._exit(3)", "session_id": "conn"})
    assert dead.status == 200 and dead.json()["output"]["status"] == "error", dead
    resp = c.get(_path(session, "/connection"))
    assert resp.status == 409 and resp.json()["code"] == "no_kernel", resp
    assert c.get(_path(f"{PKG}:nope", "/connection")).status == 404


def test_connection_needs_attach_and_stays_in_its_tenant(server_factory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    owner = create_token(tokens, "acme", "owner", "invoke", "sessions", "attach")
    viewer = create_token(tokens, "acme", "viewer", "sessions")
    other = create_token(tokens, "globex", "other", "sessions", "attach")
    srv = server_factory(["--examples"], env={"AUTH_TOKENS_FILE": str(tokens)})
    invoke = f"/runtime/agents/{quote(AGENT, safe='@')}/invoke"
    body = {"input": {"code": "a = 1", "session_id": "tenancy"}}
    assert request(srv.port, "POST", invoke, owner, body=body).status == 200
    path = _path(f"{PKG}:tenancy", "/connection")
    assert request(srv.port, "GET", path).status == 401
    assert_forbidden(request(srv.port, "GET", path, viewer), "attach")
    resp = request(srv.port, "GET", path, other)
    assert resp.status == 404 and resp.json()["code"] == "session_not_found", resp
    resp = request(srv.port, "GET", path, owner)
    assert resp.status == 200 and resp.json()["connection"]["transport"] == "ipc", resp


def test_jupyter_console_existing_through_a_pty(srv: Server, tmp_path: Path) -> None:
    c = srv.client
    session = f"{PKG}:pty"
    _ok(c, "shared = 21", "pty")
    pid = _session(c, session)["kernel_pid"]
    resp = c.get(_path(session, "/connection"))
    assert resp.status == 200, resp
    conn_file = tmp_path / "kernel.json"
    conn_file.write_text(json.dumps(resp.json()["connection"]))
    conn_file.chmod(0o600)

    term = Terminal(
        [sys.executable, "-m", "jupyter_console", "--existing", str(conn_file)],
        _terminal_env(tmp_path / "home"),
    )
    try:
        term.expect(b"In [")
        term.send("print('from-rest', shared * 2); typed = 'in the console'\r")
        term.expect(b"from-rest 42")
        term.expect(b"In [")
        term.send("exit\r")
        assert term.wait() == 0, term.tail()
    finally:
        term.close()
    # jupyter console's own words when the kernel asks it to leave and keep the kernel.
    assert b"keeping kernel alive" in term.output, term.tail()
    assert b"Shutting down kernel" not in term.output, term.tail()

    out = _ok(c, "result = typed + ' ' + str(shared)", "pty")
    assert out["result"] == "in the console 21", out
    assert out["session_restarted"] is False, out
    assert _session(c, session)["kernel_pid"] == pid


def test_pixell_console_through_a_pty(srv: Server, tmp_path: Path) -> None:
    c = srv.client
    session = f"{PKG}:cli"
    # A session whose kernel died: the command starts a new one (POST .../restart) first.
    dead = c.invoke(AGENT, {"code": "import os; os._exit(1)", "session_id": "cli"})
    assert dead.status == 200 and dead.json()["output"]["status"] == "error", dead
    assert c.get(_path(session, "/connection")).status == 409
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    term = Terminal(
        [
            sys.executable,
            "-m",
            "pixell_kernel_runtime",
            "console",
            session,
            "--url",
            f"http://127.0.0.1:{srv.port}",
        ],
        _terminal_env(tmp_path / "home", TMPDIR=str(tmp)),
    )
    try:
        term.expect(b"In [")
        # The connection file it wrote: private, in a private folder.
        (folder,) = list(tmp.iterdir())
        assert folder.name.startswith("pixell-console-")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        (conn_file,) = list(folder.iterdir())
        assert stat.S_IMODE(conn_file.stat().st_mode) == 0o600
        term.send("from_console = 6 * 7; print('defined', from_console)\r")
        term.expect(b"defined 42")
        term.expect(b"In [")
        term.send("quit()\r")
        assert term.wait() == 0, term.tail()
    finally:
        term.close()
    assert b"keeping kernel alive" in term.output, term.tail()
    assert list(tmp.iterdir()) == [], "the connection file outlived the console"

    pid = _session(c, session)["kernel_pid"]
    out = _ok(c, "result = from_console", "cli")
    assert out["result"] == 42, out
    assert _session(c, session)["kernel_pid"] == pid


def test_pixell_console_hung_up_still_removes_its_connection_file(
    srv: Server, tmp_path: Path
) -> None:
    """The terminal goes away (SIGHUP) or the command is killed (SIGTERM): the console ends
    with it, and the file holding the kernel's key does not stay behind."""
    _ok(srv.client, "pass", "hangup")
    for sig in (signal.SIGHUP, signal.SIGTERM):
        tmp = tmp_path / f"tmp-{sig.name}"
        tmp.mkdir()
        term = Terminal(
            [
                sys.executable,
                "-m",
                "pixell_kernel_runtime",
                "console",
                f"{PKG}:hangup",
                "--url",
                f"http://127.0.0.1:{srv.port}",
            ],
            _terminal_env(tmp_path / "home", TMPDIR=str(tmp)),
        )
        try:
            term.expect(b"In [")
            assert len(list(tmp.iterdir())) == 1
            term.proc.send_signal(sig)
            assert term.wait() == 128 + sig, term.tail()
        finally:
            term.close()
        assert list(tmp.iterdir()) == [], sig
    assert _ok(srv.client, "result = 'still here'", "hangup")["result"] == "still here"
