"""Shared fixtures: a real server process on a free loopback port, an HTTP client, APKG makers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from pixell_kernel_runtime.bundled import examples_dir

REPO = Path(__file__).resolve().parent.parent
# The example agents are package data: the same folder `--examples` builds.
EXAMPLES = examples_dir()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; say which."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:500]!r}>"


class Client:
    """A plain HTTP client over http.client: what any existing client would send."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)

    def post_json(self, path: str, doc: Any, **kw: Any) -> Response:
        return self.request(
            "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}, **kw
        )

    def upload(
        self, path: str, file: Path, fields: dict[str, str] | None = None, name: str = "file"
    ) -> Response:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for key, value in (fields or {}).items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{file.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + file.read_bytes()
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request(
            "POST",
            path,
            b"".join(parts),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    def load(self, apkg: Path, **extra: Any) -> Response:
        return self.post_json("/runtime/packages/load", {"path": str(apkg), **extra})

    def invoke(self, agent_id: str, input_: dict[str, Any], **kw: Any) -> Response:
        return self.post_json(
            f"/runtime/agents/{quote(agent_id, safe='@')}/invoke", {"input": input_}, **kw
        )


class Server:
    """``python -m pixell_kernel_runtime`` as a child process, as a user would run it."""

    def __init__(
        self,
        state_dir: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        *,
        inherit_env: bool = False,
    ) -> None:
        self.port = free_port()
        self.state_dir = state_dir
        self.args = args or []
        self.env = env or {}
        # False (the default): the server gets minimal_env() plus ``env`` and nothing of the
        # test run's environment (a developer's PACKAGE_CACHE_DIR, RUN_DIR or SANDBOX_* would
        # otherwise change what the test sees, and their run dir be removed at exit).
        self.inherit_env = inherit_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"server-{self.port}.log"
        self.client = Client(self.port)

    def start(self, timeout: float = 60.0) -> Server:
        if self.inherit_env:
            env = {k: v for k, v in os.environ.items() if k != "PORT"}
        else:
            env = minimal_env(self.state_dir.parent / "home")
        # Any free metrics port (the log says which): test servers must not race for 9090.
        env["METRICS_PORT"] = "0"
        # No warm kernels unless a test asks (tests/test_pool.py): a hundred servers each
        # starting kernels nobody uses would only slow the suite.
        env["POOL_SIZE"] = "0"
        env.update(self.env)
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pixell_kernel_runtime",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
                *self.args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.client.get("/runtime/health", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; a server that ignores ``sig`` is killed and the
        call fails. The log is closed whatever happens."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored signal {sig}:\n{self.logs()}") from None
        finally:
            if self.proc is not None and not self.log.closed:
                self.log.close()

    def descendants(self) -> set[int]:
        """The server's live descendants (its kernels and their children), read from /proc."""
        return process_tree(self.proc.pid) - {self.proc.pid} if self.proc else set()


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its live descendants, read from /proc."""
    out: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in out:
            continue
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        out.add(p)
        for tid in tids:
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text()
                stack.extend(int(c) for c in children.split())
    return out


def minimal_env(home: Path) -> dict[str, str]:
    """What a test server starts with: a fixed PATH (this interpreter's bin dir first, for the
    console script), its own HOME, a UTF-8 locale. Nothing of the developer's environment."""
    home.mkdir(parents=True, exist_ok=True)
    path = f"{os.path.dirname(sys.executable)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
    return {"PATH": f"{path}:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def stop_all(servers: list[Server]) -> None:
    """Stop every server, even when one fails to stop; kill what any of them left running.

    Raises (after all are stopped) if a server failed to stop or left processes behind."""
    problems: list[str] = []
    for srv in servers:
        tree = {pid: _started(pid) for pid in srv.descendants()}
        try:
            srv.stop()
        except BaseException as exc:  # noqa: BLE001 - the others must still be stopped
            problems.append(f"port {srv.port}: {exc!r}")
        # Kernels are the server's to end; whatever it left is killed here and reported.
        wait_for(lambda t=tree: not _alive(t), 10.0)
        left = _alive(tree)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"port {srv.port}: processes outlived the server: {sorted(left)}")
    if problems:
        raise AssertionError("teardown: " + "; ".join(problems))


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _started(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _alive(tree: dict[int, str]) -> set[int]:
    """The processes of ``tree`` (pid -> start time) that still run: not zombies, and not
    another process that got a recycled pid."""
    out = set()
    for pid, started in tree.items():
        fields = _stat(pid)
        if fields and fields[0] not in ("Z", "X") and fields[19] == started:
            out.add(pid)
    return out


@contextlib.contextmanager
def serving(state_dir: Path, apkgs: list[Path]) -> Iterator[Server]:
    """A server with ``apkgs`` loaded by path, stopped on exit (for module-scoped fixtures)."""
    server = Server(state_dir).start()
    try:
        for apkg in apkgs:
            resp = server.client.load(apkg)
            assert resp.status == 200, resp
        yield server
    finally:
        stop_all([server])


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> Server:
        srv = Server(state_dir or tmp_path / "state", args, env)
        servers.append(srv)
        return srv.start()

    yield make
    stop_all(servers)


@pytest.fixture
def server(server_factory: Any) -> Server:
    return server_factory()


@pytest.fixture
def client(server: Server) -> Client:
    return server.client


def make_apkg(
    path: Path, files: dict[str, bytes | str], *, infos: list[zipfile.ZipInfo] | None = None
) -> Path:
    """Write a ZIP with ``files`` (name -> content) and any raw ZipInfo entries given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info in infos or []:
            zf.writestr(info, b"x")
    return path


def manifest_yaml(name: str = "tiny-agent", version: str = "0.1.0", **extra: Any) -> str:
    import yaml

    doc: dict[str, Any] = {
        "name": name,
        "display_name": name,
        "description": "a test agent",
        "author": "tests",
        "license": "MIT",
        "entrypoint": "main:handler",
        "metadata": {"version": version},
    }
    doc.update(extra)
    return yaml.safe_dump(doc)


@pytest.fixture
def example_apkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pixell_kernel_runtime.packages.builder import build_all

    out = tmp_path_factory.mktemp("examples")
    return {p.name.rsplit("-", 1)[0]: p for p in build_all(EXAMPLES, out)}
