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

    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
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
        inherit_env: bool = True,
    ) -> None:
        self.port = free_port()
        self.state_dir = state_dir
        self.args = args or []
        self.env = env or {}
        # False: ``env`` is the server's whole environment (nothing of the test run's leaks in).
        self.inherit_env = inherit_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"server-{self.port}.log"
        self.client = Client(self.port)

    def start(self, timeout: float = 60.0) -> Server:
        env = {**(os.environ if self.inherit_env else {}), **self.env}
        env.pop("PORT", None)
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
            self.log.close()


@contextlib.contextmanager
def serving(state_dir: Path, apkgs: list[Path]) -> Iterator[Server]:
    """A server with ``apkgs`` loaded by path, stopped on exit (for module-scoped fixtures)."""
    server = Server(state_dir).start()
    try:
        for apkg in apkgs:
            assert server.client.load(apkg).status == 200
        yield server
    finally:
        server.stop()


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
    for srv in servers:
        srv.stop()


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
