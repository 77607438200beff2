"""A real jupyter_server with ``--gateway-url`` pointing at the runtime: its GatewayClient.

What JupyterLab does to reach an agent's session (``jupyter lab --gateway-url=...``): the test
talks only to jupyter_server (its token, its REST API, its channels websocket); jupyter_server
talks to the runtime as a Kernel Gateway client, with ``Authorization: token <t>``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Client, Server, free_port, minimal_env, stop_all, wait_for
from test_jupyter_api import KernelSocket

from pixell_kernel_runtime.auth import tokens as tokens_mod

AGENT = "pixell-python-agent@0.1.0/code-executor"
SESSION = "pixell-python-agent@0.1.0:gw"


class JupyterServer:
    """``python -m jupyter_server`` on a loopback port (with the extensions installed next to
    it, JupyterLab's among them: what ``jupyter lab --gateway-url`` runs), with its own config,
    data and runtime dirs and nothing of the developer's environment; stopped with bounded
    waits."""

    def __init__(self, root: Path, gateway_url: str, gateway_token: str) -> None:
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.log_path = root / "jupyter-server.log"
        env = minimal_env(root / "home")
        for name in ("config", "data", "runtime"):
            (root / name).mkdir()
            env[f"JUPYTER_{name.upper()}_DIR"] = str(root / name)
        (root / "notebooks").mkdir()
        self.args = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",
            f"--ServerApp.root_dir={root / 'notebooks'}",
            f"--IdentityProvider.token={self.token}",
            f"--gateway-url={gateway_url}",
            f"--GatewayClient.auth_token={gateway_token}",
        ]
        self.env = env
        self.client = Client(self.port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> JupyterServer:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd="/"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"jupyter server exited:\n{self.logs()}"
            try:
                if self.get("/api/status").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"jupyter server did not answer in {timeout}s:\n{self.logs()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}", "Content-Type": "application/json"}

    def get(self, path: str) -> Any:
        return self.client.get(path, headers=self.headers())

    def post(self, path: str, doc: Any) -> Any:
        return self.client.request("POST", path, json.dumps(doc).encode(), self.headers())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
                    raise AssertionError(
                        f"jupyter server ignored SIGTERM:\n{self.logs()}"
                    ) from None
        finally:
            if self.proc is not None and not self.log.closed:
                self.log.close()


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[Server, str, JupyterServer]]:
    tokens = tmp_path / "tokens.yaml"
    token = tokens_mod.create(
        tokens, tenant="acme", name="lab", scopes=["attach", "invoke", "sessions"]
    )
    runtime = Server(tmp_path / "state", ["--examples"], env={"AUTH_TOKENS_FILE": str(tokens)})
    runtime.start()
    jupyter: JupyterServer | None = None
    try:
        jupyter = JupyterServer(tmp_path / "jupyter", f"http://127.0.0.1:{runtime.port}", token)
        jupyter.start()
        yield runtime, token, jupyter
    finally:
        try:
            if jupyter is not None:
                jupyter.stop()
        finally:
            stop_all([runtime])
    assert token not in runtime.logs()


def test_jupyter_server_attaches_to_an_agent_session_through_its_gateway_client(
    both: tuple[Server, str, JupyterServer],
) -> None:
    runtime, token, jupyter = both
    headers = {"Authorization": f"Bearer {token}"}

    def invoke(code: str) -> dict[str, Any]:
        body = json.dumps({"input": {"code": code, "session_id": "gw"}}).encode()
        path = f"/runtime/agents/{quote(AGENT, safe='@')}/invoke"
        resp = runtime.client.request("POST", path, body, headers)
        assert resp.status == 200, resp
        return resp.json()["output"]

    assert invoke("x = 41")["status"] == "success"
    info = runtime.client.get(f"/runtime/sessions/{quote(SESSION, safe='')}", headers=headers)
    kid = info.json()["kernel_id"]

    # jupyter_server reads the runtime's kernelspecs: one per package.
    specs = jupyter.get("/api/kernelspecs")
    assert specs.status == 200, specs
    packages = {
        s["spec"]["metadata"]["pixell"]["package_id"] for s in specs.json()["kernelspecs"].values()
    }
    assert packages == {"pixell-python-agent@0.1.0", "hello-handler@0.1.0"}, specs.json()

    # Attach the way JupyterLab attaches to a running kernel: a session naming its id.
    body = {"kernel": {"id": kid}, "path": "agent.ipynb", "type": "notebook", "name": ""}
    made = jupyter.post("/api/sessions", body)
    assert made.status == 201, (made, jupyter.logs()[-3000:])
    assert made.json()["kernel"]["id"] == kid
    listed = jupyter.get("/api/kernels")
    assert listed.status == 200 and [k["id"] for k in listed.json()] == [kid], listed
    assert jupyter.get(f"/api/kernels/{kid}").json()["name"] == "pixell-python-agent.0.1.0"
    # Its model follows the runtime's (jupyter_server refreshes it when it lists kernels).
    assert wait_for(lambda: jupyter.get("/api/kernels").json()[0]["execution_state"] == "idle")

    async def notebook() -> None:
        url = f"ws://127.0.0.1:{jupyter.port}/api/kernels/{kid}/channels"
        ks = await KernelSocket.open(f"{url}?session_id={uuid.uuid4()}&token={jupyter.token}")
        got = await ks.run("print(x + 1)\ny = 7")
        assert got["reply"]["status"] == "ok" and got["stdout"] == "42\n", got
        assert (await asyncio.to_thread(invoke, "result = x + y"))["result"] == 48
        got = await ks.run("print(result * 2)")
        assert got["stdout"] == "96\n", got
        ks.close()

    asyncio.run(asyncio.wait_for(notebook(), 180))


def test_a_kernelspec_started_through_jupyter_server_is_a_fresh_session(
    both: tuple[Server, str, JupyterServer],
) -> None:
    runtime, token, jupyter = both
    headers = {"Authorization": f"Bearer {token}"}
    body = {
        "kernel": {"name": "pixell-python-agent.0.1.0"},
        "path": "new.ipynb",
        "type": "notebook",
    }
    made = jupyter.post("/api/sessions", body)
    assert made.status == 201, (made, jupyter.logs()[-3000:])
    kid = made.json()["kernel"]["id"]
    sessions = runtime.client.get("/runtime/sessions", headers=headers).json()["sessions"]
    [session] = [s for s in sessions if s["kernel_id"] == kid]
    assert session["package_id"] == "pixell-python-agent@0.1.0"
    assert session["session_id"].startswith("jupyter-"), session

    async def notebook() -> None:
        url = f"ws://127.0.0.1:{jupyter.port}/api/kernels/{kid}/channels"
        ks = await KernelSocket.open(f"{url}?session_id={uuid.uuid4()}&token={jupyter.token}")
        assert (await ks.run("z = 3\nprint(z)"))["stdout"] == "3\n"
        # A restart through jupyter_server reaches the runtime: the state is gone.
        resp = await asyncio.to_thread(jupyter.post, f"/api/kernels/{kid}/restart", {})
        assert resp.status == 200, resp
        got = await ks.run("print('z' in dir())")
        assert got["stdout"] == "False\n", got
        ks.close()

    asyncio.run(asyncio.wait_for(notebook(), 180))
    # Shutting the kernel down in jupyter_server closes the runtime's session.
    session_id = made.json()["id"]
    resp = jupyter.client.request("DELETE", f"/api/sessions/{session_id}", None, jupyter.headers())
    assert resp.status == 204, resp
    path = f"/runtime/sessions/{quote(session['id'], safe='')}"
    assert runtime.client.get(path, headers=headers).status == 404
