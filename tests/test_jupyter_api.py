"""The Jupyter Server kernels API over the session kernels, through a real server.

REST shapes and status codes as jupyter_server's clients expect them, and the channels websocket
with a real websocket client (tornado) in the legacy JSON protocol and in the v1 binary one
(framed with jupyter_server's own functions), sharing its kernel with REST invoke and taking
turns with it through the session's FIFO.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Response, Server, stop_all, wait_for
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from pixell_kernel_runtime.auth import tokens as tokens_mod

AGENT = "pixell-python-agent@0.1.0/code-executor"
PACKAGE = "pixell-python-agent@0.1.0"
V1 = "v1.kernel.websocket.jupyter.org"
PARTS = ("header", "parent_header", "metadata", "content")


# ---- a channels client ---------------------------------------------------------------------


class KernelSocket:
    """A Jupyter channels websocket client: sends requests, reads what comes, in order."""

    def __init__(self, conn: WebSocketClientConnection, v1: bool) -> None:
        self.conn = conn
        self.v1 = v1
        self.session = Session()

    @classmethod
    async def open(
        cls, url: str, *, v1: bool = False, headers: dict[str, str] | None = None
    ) -> KernelSocket:
        request = HTTPRequest(url, headers=headers or {}, request_timeout=60)
        conn = await websocket_connect(request, subprotocols=[V1] if v1 else None)
        assert conn.selected_subprotocol == (V1 if v1 else None)
        return cls(conn, v1)

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg = self.session.msg(msg_type, content)
        if self.v1:
            parts = [json.dumps(msg[k], default=json_default).encode() for k in PARTS]
            self.conn.write_message(serialize_msg_to_ws_v1(parts, channel), binary=True)
        else:
            self.conn.write_message(json.dumps({**msg, "channel": channel}, default=json_default))
        return msg["header"]["msg_id"]

    def execute(self, code: str, *, allow_stdin: bool = False, stop_on_error: bool = True) -> str:
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": stop_on_error,
        }
        return self.send("shell", "execute_request", content)

    async def recv(self, timeout: float = 60.0) -> tuple[str, dict[str, Any]]:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        assert raw is not None, "the server closed the websocket"
        if self.v1:
            assert isinstance(raw, bytes), raw
            channel, parts = deserialize_msg_from_ws_v1(raw)
            msg = {k: json.loads(p) for k, p in zip(PARTS, parts[:4], strict=True)}
            msg["msg_type"] = msg["header"]["msg_type"]
        else:
            assert isinstance(raw, str), raw
            msg = json.loads(raw)
            channel = msg.pop("channel")
        return channel, msg

    async def until(
        self, done: Callable[[str, dict[str, Any]], bool], timeout: float = 60.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Every message up to and including the first for which ``done`` holds."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            channel, msg = await self.recv(max(0.01, deadline - time.monotonic()))
            seen.append((channel, msg))
            if done(channel, msg):
                return seen

    async def finished(self, msg_id: str) -> dict[str, Any]:
        """Read until ``msg_id``'s reply and idle status are both in; what it produced."""
        got: dict[str, Any] = {"stdout": "", "reply": None, "idle": False, "types": []}

        def done(channel: str, msg: dict[str, Any]) -> bool:
            if msg["parent_header"].get("msg_id") == msg_id:
                if channel == "iopub":  # its order (across channels there is none)
                    got["types"].append(msg["msg_type"])
                if msg["msg_type"] == "stream":
                    got["stdout"] += msg["content"]["text"]
                if channel == "shell":
                    got["reply"] = msg["content"]
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    got["idle"] = True
            return got["reply"] is not None and got["idle"]

        await self.until(done)
        return got

    async def run(self, code: str) -> dict[str, Any]:
        return await self.finished(self.execute(code))

    def close(self) -> None:
        self.conn.close()


def is_(channel: str, msg_type: str, parent: str) -> Callable[[str, dict[str, Any]], bool]:
    def check(ch: str, msg: dict[str, Any]) -> bool:
        return (ch, msg["msg_type"], msg["parent_header"].get("msg_id")) == (
            channel,
            msg_type,
            parent,
        )

    return check


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``check`` (in a thread: it may block on HTTP) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("jupyter") / "state", ["--examples"]).start()
    try:
        yield server
    finally:
        stop_all([server])


def ws_url(srv: Server, kernel_id: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{srv.port}/api/kernels/{kernel_id}/channels{query}"


def invoke(srv: Server, code: str, session_id: str) -> dict[str, Any]:
    resp = srv.client.invoke(AGENT, {"code": code, "session_id": session_id})
    assert resp.status == 200, resp
    return resp.json()["output"]


def session_of(srv: Server, session_id: str) -> dict[str, Any]:
    resp = srv.client.get(f"/runtime/sessions/{quote(f'{PACKAGE}:{session_id}', safe='')}")
    assert resp.status == 200, resp
    return resp.json()


def assert_envelope(resp: Response, status: int, code: str | None = None) -> None:
    assert resp.status == status, resp
    body = resp.json()
    assert {"error", "message", "code", "request_id"} <= set(body), body
    if code is not None:
        assert body["code"] == code, body


KERNEL_NAME = re.compile(r"^[\w.\-%]+$")
UUID_SHAPE = re.compile(r"^\w+-\w+-\w+-\w+-\w+$")


def assert_kernel_model(model: dict[str, Any]) -> None:
    assert {"id", "name", "last_activity", "execution_state", "connections"} <= set(model)
    assert UUID_SHAPE.match(model["id"]) and str(uuid.UUID(model["id"])) == model["id"]
    datetime.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")  # exactly this format
    assert model["execution_state"] in ("starting", "idle", "busy", "dead"), model
    assert isinstance(model["connections"], int)


# ---- REST ------------------------------------------------------------------------------------


def test_api_version_and_kernelspecs(srv: Server) -> None:
    c = srv.client
    resp = c.get("/api")
    assert resp.status == 200 and isinstance(resp.json()["version"], str), resp
    specs = c.get("/api/kernelspecs").json()
    names = list(specs["kernelspecs"])
    packages = sorted(p["id"] for p in c.get("/runtime/packages").json()["packages"])
    assert len(names) == len(packages) == 2, specs
    assert specs["default"] == names[0]
    ids = []
    for name, spec in specs["kernelspecs"].items():
        assert KERNEL_NAME.match(name), name
        assert spec["name"] == name
        assert spec["spec"]["language"] == "python" and spec["spec"]["argv"] == []
        assert isinstance(spec["spec"]["display_name"], str) and spec["spec"]["display_name"]
        ids.append(spec["spec"]["metadata"]["pixell"]["package_id"])
        one = c.get(f"/api/kernelspecs/{quote(name, safe='')}")
        assert one.status == 200 and one.json() == spec, one
        logo = c.get(spec["resources"]["logo-64x64"])
        assert logo.status == 200 and logo.headers["content-type"] == "image/png", logo
        assert logo.body.startswith(b"\x89PNG"), logo
    assert sorted(ids) == packages
    assert_envelope(c.get("/api/kernelspecs/no-such.1.0"), 404, "kernelspec_not_found")
    assert_envelope(c.get(f"/kernelspecs/{names[0]}/kernel.js"), 404, "no_resource")
    assert_envelope(c.get(f"/kernelspecs/{names[0]}/..%2F..%2Fetc%2Fpasswd"), 404)


def test_kernel_lifecycle_with_jupyter_status_codes(srv: Server) -> None:
    c = srv.client
    name = next(
        n
        for n, s in c.get("/api/kernelspecs").json()["kernelspecs"].items()
        if s["spec"]["metadata"]["pixell"]["package_id"] == PACKAGE
    )
    resp = c.post_json("/api/kernels", {"name": name, "env": {"KERNEL_USERNAME": "ada"}})
    assert resp.status == 201, resp
    model = resp.json()
    assert_kernel_model(model)
    assert model["name"] == name
    kid = model["id"]
    assert wait_for(lambda: c.get(f"/api/kernels/{kid}").json()["execution_state"] == "idle")
    assert resp.headers["location"] == f"/api/kernels/{kid}"
    # A fresh session of that package, named for the Jupyter API.
    session_id = model["pixell"]["session_id"]
    assert re.fullmatch(r"jupyter-[0-9a-f]{8}", session_id), model
    assert session_of(srv, session_id)["kernel_id"] == kid
    assert kid in [k["id"] for k in c.get("/api/kernels").json()]
    assert c.get(f"/api/kernels/{kid}").json()["id"] == kid
    invoke(srv, "state = 1", session_id)
    resp = c.request("POST", f"/api/kernels/{kid}/interrupt", b"{}")
    assert resp.status == 204 and resp.body == b"", resp
    resp = c.request("POST", f"/api/kernels/{kid}/restart", b"{}")
    assert resp.status == 200, resp
    assert_kernel_model(resp.json())
    assert resp.json()["id"] == kid  # stable for the session's life
    assert invoke(srv, "result = 'state' in dir()", session_id)["result"] is False
    resp = c.delete(f"/api/kernels/{kid}")
    assert resp.status == 204 and resp.body == b"", resp
    assert_envelope(c.get(f"/api/kernels/{kid}"), 404, "kernel_not_found")
    assert_envelope(c.delete(f"/api/kernels/{kid}"), 404, "kernel_not_found")
    assert kid not in [k["id"] for k in c.get("/api/kernels").json()]
    # Ids that are not UUID-shaped reach no kernel route at all.
    assert_envelope(c.get("/api/kernels/not-a-kernel"), 404)
    assert_envelope(
        c.post_json("/api/kernels", {"name": "no-such.1.0"}), 404, "kernelspec_not_found"
    )
    assert_envelope(c.post_json("/api/kernels", {"name": name, "env": {"A": 1}}), 422)
    bad = {"name": name, "env": {"KERNEL_PIXELL_SESSION_ID": "../x"}}
    assert_envelope(c.post_json("/api/kernels", bad), 422)


def test_a_kernel_env_names_the_session_to_join(srv: Server) -> None:
    invoke(srv, "joined = 5", "named")
    kid = session_of(srv, "named")["kernel_id"]
    name = next(k["name"] for k in srv.client.get("/api/kernels").json() if k["id"] == kid)
    body = {"name": name, "env": {"KERNEL_PIXELL_SESSION_ID": "named"}}
    resp = srv.client.post_json("/api/kernels", body)
    assert resp.status == 201 and resp.json()["id"] == kid, resp


# ---- the channels websocket --------------------------------------------------------------


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_channels_share_the_kernel_with_rest_invoke(srv: Server, v1: bool) -> None:
    sid = f"shared-{int(v1)}"
    invoke(srv, "x = 41", sid)
    kid = session_of(srv, sid)["kernel_id"]
    executions = session_of(srv, sid)["executions"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid, "?session_id=abc"), v1=v1)
        assert srv.client.get(f"/api/kernels/{kid}").json()["connections"] == 1
        info = ks.send("shell", "kernel_info_request", {})
        seen = await ks.until(is_("shell", "kernel_info_reply", info))
        assert seen[-1][1]["content"]["language_info"]["name"] == "python"
        got = await ks.run("print(x + 1)\ny = 7")
        assert got["reply"]["status"] == "ok" and got["stdout"] == "42\n", got
        assert got["types"] == ["status", "execute_input", "stream", "status"], got
        # The reverse: REST invoke reads what the notebook defined.
        assert (await asyncio.to_thread(invoke, srv, "result = x + y", sid))["result"] == 48
        got = await ks.run("print(result)")
        assert got["stdout"] == "48\n", got
        ks.close()
        await eventually(lambda: srv.client.get(f"/api/kernels/{kid}").json()["connections"] == 0)

    run(scenario())
    # Two notebook cells and one REST call since: each one an execution of the session.
    assert session_of(srv, sid)["executions"] == executions + 3


def test_a_rest_invoke_waits_for_the_running_cell(srv: Server) -> None:
    invoke(srv, "answer = None", "fifo")
    kid = session_of(srv, "fifo")["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid))
        cell = ks.execute("answer = input('go? ')", allow_stdin=True)
        # The cell runs (it asks for input) and holds the session's turn.
        await ks.until(is_("stdin", "input_request", cell))
        rest = asyncio.ensure_future(asyncio.to_thread(invoke, srv, "result = answer * 2", "fifo"))
        await eventually(lambda: session_of(srv, "fifo")["queued"] == 1)
        assert not rest.done()
        ks.send("stdin", "input_reply", {"value": "ok"})
        got = await ks.finished(cell)
        assert got["reply"]["status"] == "ok", got
        assert (await rest)["result"] == "okok"  # it ran after the cell, on its state
        ks.close()

    run(scenario())


def test_a_cell_keeps_its_turn_after_its_websocket_closes(srv: Server) -> None:
    invoke(srv, "import time", "left")
    kid = session_of(srv, "left")["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid))
        cell = ks.execute("ran = False\nwhile True: time.sleep(0.01)")
        await ks.until(is_("iopub", "execute_input", cell))
        ks.close()
        await eventually(lambda: srv.client.get(f"/api/kernels/{kid}").json()["connections"] == 0)
        rest = asyncio.ensure_future(asyncio.to_thread(invoke, srv, "result = ran", "left"))
        await eventually(lambda: session_of(srv, "left")["queued"] == 1)
        assert not rest.done()
        resp = await asyncio.to_thread(srv.client.request, "POST", f"/api/kernels/{kid}/interrupt")
        assert resp.status == 204, resp
        assert (await rest)["result"] is False  # the interrupted cell ended, then REST ran

    run(scenario())


def test_a_cell_left_waiting_for_input_is_interrupted_when_its_client_leaves(srv: Server) -> None:
    invoke(srv, "pass", "asked")
    kid = session_of(srv, "asked")["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid))
        cell = ks.execute("typed = input()", allow_stdin=True)
        await ks.until(is_("stdin", "input_request", cell))
        ks.close()
        out = await asyncio.to_thread(invoke, srv, "result = 'typed' in dir()", "asked")
        assert out["result"] is False

    run(scenario())


def test_cells_queued_behind_a_failed_cell_are_aborted(srv: Server) -> None:
    invoke(srv, "pass", "abort")
    kid = session_of(srv, "abort")["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid), v1=True)
        first = ks.execute("raise ValueError('boom')")
        second = ks.execute("after = 1")
        failed = await ks.finished(first)
        assert failed["reply"]["status"] == "error" and failed["reply"]["ename"] == "ValueError"
        aborted = await ks.finished(second)
        assert aborted["reply"]["status"] == "aborted", aborted
        # A cell sent after the failure was seen runs again.
        assert (await ks.run("print('after' in dir())"))["stdout"] == "False\n"
        ks.close()

    run(scenario())


def status_is(state: str) -> Callable[[str, dict[str, Any]], bool]:
    def check(channel: str, msg: dict[str, Any]) -> bool:
        return msg["msg_type"] == "status" and msg["content"]["execution_state"] == state

    return check


def test_a_websocket_follows_a_restart_through_the_rest_api(srv: Server) -> None:
    invoke(srv, "kept = 1", "restarted")
    kid = session_of(srv, "restarted")["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid))
        assert (await ks.run("print(kept)"))["stdout"] == "1\n"
        path = f"/api/kernels/{kid}/restart"
        resp = await asyncio.to_thread(srv.client.request, "POST", path, b"{}")
        assert resp.status == 200, resp
        await ks.until(status_is("restarting"))
        await ks.until(status_is("idle"))
        got = await ks.run("print('kept' in dir())")
        assert got["reply"]["status"] == "ok" and got["stdout"] == "False\n", got
        ks.close()

    run(scenario())


def test_a_kernel_that_dies_under_a_cell_is_started_again(srv: Server) -> None:
    invoke(srv, "before = 1", "died")
    before = session_of(srv, "died")
    kid = before["kernel_id"]

    async def scenario() -> None:
        ks = await KernelSocket.open(ws_url(srv, kid))
        ks.execute("import os\nos._exit(3)")  # its own output may die with it
        await ks.until(status_is("restarting"))
        await ks.until(status_is("idle"))
        got = await ks.run("print('before' in dir())")
        assert got["reply"]["status"] == "ok" and got["stdout"] == "False\n", got
        ks.close()

    run(scenario())
    after = session_of(srv, "died")
    assert after["kernel_id"] == kid and after["restarts"] == before["restarts"] + 1, after
    assert invoke(srv, "result = 2", "died")["result"] == 2


# ---- auth and tenancy -------------------------------------------------------------------


def test_attach_scope_tokens_and_tenancy(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    full = tokens_mod.create(
        tokens, tenant="acme", name="ada", scopes=["attach", "invoke", "sessions"]
    )
    plain = tokens_mod.create(tokens, tenant="acme", name="bob", scopes=["invoke", "sessions"])
    other = tokens_mod.create(tokens, tenant="globex", name="eve", scopes=["attach"])
    server = Server(tmp_path / "state", ["--examples"], env={"AUTH_TOKENS_FILE": str(tokens)})
    server.start()
    try:
        c = server.client

        def auth(token: str, scheme: str = "Bearer") -> dict[str, str]:
            return {"Authorization": f"{scheme} {token}"}

        assert_envelope(c.get("/api/kernels"), 401, "unauthorized")
        assert_envelope(c.get("/api/kernels", headers=auth(plain)), 403, "forbidden")
        assert_envelope(c.get("/api/kernelspecs", headers=auth(plain)), 403, "forbidden")
        body = json.dumps({"input": {"code": "x = 41", "session_id": "s1"}}).encode()
        path = f"/runtime/agents/{quote(AGENT, safe='@')}/invoke"
        assert c.request("POST", path, body, auth(full)).status == 200
        # Jupyter's own scheme, as the gateway client sends it.
        listed = c.get("/api/kernels", headers=auth(full, "token"))
        assert listed.status == 200 and len(listed.json()) == 1, listed
        kid = listed.json()[0]["id"]
        assert c.get("/api/kernels", headers=auth(other)).json() == []
        assert_envelope(c.get(f"/api/kernels/{kid}", headers=auth(other)), 404, "kernel_not_found")

        async def sockets() -> None:
            for token, status in ((plain, 403), (other, 404), ("nope", 401)):
                with pytest.raises(HTTPClientError) as refused:
                    await KernelSocket.open(ws_url(server, kid), headers=auth(token))
                assert refused.value.code == status
            ks = await KernelSocket.open(ws_url(server, kid, f"?token={full}"))
            assert (await ks.run("print(x + 1)"))["stdout"] == "42\n"
            ks.close()

        run(sockets())
    finally:
        stop_all([server])
    assert full not in server.logs()
