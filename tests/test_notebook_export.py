"""GET /runtime/sessions/{id}/notebook: a session's executions as a valid .ipynb, replayable.

A real server and sandboxed kernels make the records (REST invokes: prints, a DataFrame, a
figure, an HTML display, an error; handler calls); the export is read as a user saves it,
validated with nbformat, and executed again with nbclient on a plain local kernel, which must
reproduce the outputs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import nbformat
import pytest
from conftest import EXAMPLES, Client, Server, stop_all, wait_for
from jwks_server import assert_forbidden, create_token, request
from nbclient import NotebookClient
from tornado.websocket import websocket_connect

from pixell_kernel_runtime.api.session_openapi import NOTEBOOK

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
HELLO = "hello-handler@0.1.0"

CELLS = [
    "x = 2\nprint('hello', x)\nimport sys\nprint('to stderr', file=sys.stderr)",
    "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})\ndf",
    "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))\nprint('after')",
    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 4, 9])\nplt.show()",
    "def boom():\n    raise ValueError('bad value')\nboom()",
    "x * 21",
]


def _path(session: str, tail: str = "/notebook") -> str:
    return f"/runtime/sessions/{quote(session, safe='')}{tail}"


def _invoke(c: Client, agent: str, input_: dict[str, Any]) -> dict[str, Any]:
    resp = c.invoke(agent, input_)
    assert resp.status == 200, resp
    return resp.json()


def _export(c: Client, session: str) -> nbformat.NotebookNode:
    resp = c.get(_path(session))
    assert resp.status == 200, resp
    assert resp.headers["content-type"] == "application/x-ipynb+json", resp.headers
    name = session.replace("@", "-").replace(":", "-")
    assert resp.headers["content-disposition"] == f'attachment; filename="{name}.ipynb"'
    nb = nbformat.reads(resp.body.decode("utf-8"), as_version=4)
    nbformat.validate(nb)
    jsonschema.validate(resp.json(), NOTEBOOK)  # as the OpenAPI document says
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
    return nb


def _replay(nb: nbformat.NotebookNode, cwd: Path | None = None) -> nbformat.NotebookNode:
    """Run the export top to bottom on a plain local kernel (no runtime helpers in it)."""
    copy = nbformat.from_dict(nb)
    resources = {"metadata": {"path": str(cwd)}} if cwd else {}
    NotebookClient(copy, kernel_name="python3", timeout=120, resources=resources).execute()
    return copy


def _shape(output: dict[str, Any]) -> tuple[Any, ...]:
    """What a replay must reproduce of an output (images by type only: bytes may differ)."""
    kind = output["output_type"]
    if kind == "stream":
        return kind, output["name"], output["text"]
    if kind == "error":
        return kind, output["ename"], output["evalue"]
    data = dict(output["data"])
    for mime in ("image/png", "image/jpeg", "image/svg+xml"):
        if mime in data:
            data[mime] = "<image>"
    data.pop("application/json", None)  # a handler's JSON value; a replay shows its repr
    return kind, sorted(data.items())


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("export") / "state", ["--examples"]).start()
    try:
        yield server
    finally:
        stop_all([server])


def test_code_cells_export_validate_and_replay(srv: Server) -> None:
    c = srv.client
    answers = [_invoke(c, CE, {"code": code, "session_id": "nb"}) for code in CELLS]
    assert [a["output"]["status"] for a in answers] == ["success"] * 4 + ["error", "success"]
    nb = _export(c, f"{PKG}:nb")

    meta = nb.metadata
    # The package's kernelspec, as the Jupyter kernels API names it (what JupyterLab opens).
    specs = c.get("/api/kernelspecs").json()["kernelspecs"]
    spec = specs[meta.kernelspec["name"]]["spec"]
    assert spec["metadata"]["pixell"]["package_id"] == PKG
    assert meta.kernelspec == {
        "name": meta.kernelspec["name"],
        "display_name": spec["display_name"],
        "language": "python",
    }
    assert meta.language_info["name"] == "python"
    assert meta.pixell["session"] == f"{PKG}:nb" and meta.pixell["package_id"] == PKG
    assert meta.pixell["executions"] == len(CELLS) and "exported_at" in meta.pixell
    assert "executions_expired" not in meta.pixell

    cells = nb.cells
    assert [cell.source for cell in cells] == CELLS
    assert [cell.execution_count for cell in cells] == list(range(1, len(CELLS) + 1))
    ids = [a["metadata"]["execution_id"] for a in answers]
    assert [cell.metadata.pixell["execution_id"] for cell in cells] == ids
    assert [_shape(o) for o in cells[0].outputs] == [
        ("stream", "stdout", "hello 2\n"),
        ("stream", "stderr", "to stderr\n"),
    ]
    (table,) = cells[1].outputs
    assert table.output_type == "execute_result" and table.execution_count == 2
    assert "<table" in table.data["text/html"] and "text/plain" in table.data
    assert [o.output_type for o in cells[2].outputs] == ["display_data", "stream"]
    assert cells[2].outputs[0].data["text/html"] == "<b>bold</b>"
    (figure,) = cells[3].outputs
    assert figure.output_type == "display_data" and figure.data["image/png"]
    (error,) = cells[4].outputs
    assert (error.output_type, error.ename, error.evalue) == ("error", "ValueError", "bad value")
    assert any("boom()" in line for line in error.traceback), error.traceback
    assert cells[4].metadata.tags == ["raises-exception"]
    assert cells[4].metadata.pixell["state"] == "error"
    assert [_shape(o) for o in cells[5].outputs] == [("execute_result", [("text/plain", "42")])]

    # Plain Python that runs anywhere, and reproduces what the session showed.
    replayed = _replay(nb)
    for before, after in zip(cells, replayed.cells, strict=True):
        assert [_shape(o) for o in after.outputs] == [_shape(o) for o in before.outputs], (
            before.source
        )
        assert after.execution_count == before.execution_count


async def _run_on_channels(port: int, kernel_id: str, code: str) -> None:
    """One cell through /api/kernels/{id}/channels (the Jupyter protocol's JSON form), as
    JupyterLab sends it; returns once its execute_reply came."""
    url = f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?session_id=export-test"
    ws = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "test",
        "session": "export-test",
        "date": "2026-01-01T00:00:00.000Z",
        "version": "5.3",
    }
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    message = {"header": header, "parent_header": {}, "metadata": {}, "content": content}
    await ws.write_message(json.dumps({**message, "channel": "shell", "buffers": []}))
    try:
        while True:
            reply = json.loads(await asyncio.wait_for(ws.read_message(), 60))
            if reply["msg_type"] == "execute_reply":
                assert reply["parent_header"]["msg_id"] == msg_id, reply
                assert reply["content"]["status"] == "ok", reply
                return
    finally:
        ws.close()


def test_notebook_cells_from_the_channels_are_exported(srv: Server) -> None:
    """Cells JupyterLab ran in the session sit between the REST calls, in run order."""
    c = srv.client
    _invoke(c, CE, {"code": "v = 5", "session_id": "mixed"})
    kernel_id = c.get(_path(f"{PKG}:mixed", "")).json()["kernel_id"]
    asyncio.run(_run_on_channels(srv.port, kernel_id, "print('nb', v * 2)\nv + 1"))
    _invoke(c, CE, {"code": "v * 3", "session_id": "mixed"})
    nb = _export(c, f"{PKG}:mixed")
    kinds = [cell.metadata.pixell["kind"] for cell in nb.cells]
    assert kinds == ["code-executor", "notebook", "code-executor"]
    notebook_cell = nb.cells[1]
    assert notebook_cell.source == "print('nb', v * 2)\nv + 1"
    assert notebook_cell.execution_count == 2
    assert [_shape(o) for o in notebook_cell.outputs] == [
        ("stream", "stdout", "nb 10\n"),
        ("execute_result", [("text/plain", "6")]),
    ]
    replayed = _replay(nb)
    assert [[_shape(o) for o in cell.outputs] for cell in replayed.cells] == [
        [_shape(o) for o in cell.outputs] for cell in nb.cells
    ]


def test_handler_calls_export_as_calls_that_replay(srv: Server) -> None:
    c = srv.client
    greet = _invoke(c, f"{HELLO}/greet", {"name": "Ada", "session_id": "h"})
    assert greet["output"] == {"greeting": "Hello, Ada!"}, greet
    for _ in range(2):
        _invoke(c, f"{HELLO}/count", {"session_id": "h"})
    echo = _invoke(c, f"{HELLO}/echo-async", {"x": [1, "two", None], "session_id": "h"})
    nb = _export(c, f"{HELLO}:h")
    spec = c.get("/api/kernelspecs").json()["kernelspecs"][nb.metadata.kernelspec["name"]]
    assert spec["spec"]["metadata"]["pixell"]["package_id"] == HELLO
    greet_cell, count1, count2, echo_cell = nb.cells
    assert "from src.main import greet\n" in greet_cell.source
    assert "greet({'name': 'Ada', 'session_id': 'h'})" in greet_cell.source
    assert "from src.main import echo_async\n" in echo_cell.source
    assert greet_cell.outputs[0] == {
        "output_type": "stream",
        "name": "stdout",
        "text": "greeting Ada\n",
    }
    assert greet_cell.outputs[1].data["application/json"] == {"greeting": "Hello, Ada!"}
    assert count2.outputs[0].data["application/json"] == {"count": 2}
    assert echo_cell.outputs[0].data["application/json"] == echo["output"]
    assert all(cell.execution_count is None for cell in nb.cells)
    assert count1.metadata.pixell["agent_id"] == f"{HELLO}/count"

    # In a kernel that can import the package (its folder), the calls give the same answers:
    # the module's counter counts again, the coroutine is awaited.
    replayed = _replay(nb, cwd=EXAMPLES / "hello-handler")
    for before, after in zip(nb.cells, replayed.cells, strict=True):
        assert [_shape(o) for o in after.outputs] == [_shape(o) for o in before.outputs], (
            before.source
        )


def test_export_bounds_gaps_expiry_and_running(server_factory) -> None:
    """A log that dropped events falls back to the answer's output; expired records are
    counted; a running call is left out."""
    srv = server_factory(
        ["--examples"], env={"EXECUTIONS_KEEP_COUNT": "3", "EXECUTION_LOG_EVENTS": "4"}
    )
    c = srv.client
    session = f"{PKG}:bounds"
    for n in range(3):
        _invoke(c, CE, {"code": f"print({n})", "session_id": "bounds"})
    chatty = "for i in range(30):\n    print(i, flush=True)\n1 / 0"
    gapped = _invoke(c, CE, {"code": chatty, "session_id": "bounds"})
    assert gapped["output"]["status"] == "error", gapped

    done: list[Any] = []
    slow = threading.Thread(
        target=lambda: done.append(
            c.invoke(CE, {"code": "import time\ntime.sleep(60)", "session_id": "bounds"})
        )
    )
    slow.start()
    try:
        assert wait_for(
            lambda: c.get(_path(session, "")).json()["kernel_execution_state"] == "busy", 30
        )
        nb = _export(c, session)
    finally:
        assert c.request("POST", _path(session, "/interrupt")).status == 200
        slow.join(60)
    assert done and done[0].status == 200, done

    pixell = nb.metadata.pixell
    assert pixell["executions_expired"] == 1 and pixell["running_left_out"] == 1, pixell
    assert [cell.source for cell in nb.cells] == ["print(1)", "print(2)", chatty]
    last = nb.cells[-1]
    assert last.metadata.pixell["outputs_from"] == "answer"
    stream, error = last.outputs
    assert stream.text == "".join(f"{i}\n" for i in range(30))
    assert (error.ename, last.metadata.tags) == ("ZeroDivisionError", ["raises-exception"])


def test_export_needs_sessions_and_stays_in_its_tenant(server_factory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    owner = create_token(tokens, "acme", "owner", "invoke", "sessions")
    runner = create_token(tokens, "acme", "runner", "invoke")
    other = create_token(tokens, "globex", "other", "sessions")
    srv = server_factory(["--examples"], env={"AUTH_TOKENS_FILE": str(tokens)})
    invoke = f"/runtime/agents/{quote(CE, safe='@')}/invoke"
    body = {"input": {"code": "secret = 1", "session_id": "mine"}}
    assert request(srv.port, "POST", invoke, owner, body=body).status == 200
    path = _path(f"{PKG}:mine")
    assert request(srv.port, "GET", path).status == 401
    assert_forbidden(request(srv.port, "GET", path, runner), "sessions")
    resp = request(srv.port, "GET", path, other)
    assert resp.status == 404 and resp.json()["code"] == "session_not_found", resp
    resp = request(srv.port, "GET", path, owner)
    assert resp.status == 200, resp
    assert nbformat.reads(resp.body.decode(), as_version=4).cells[0].source == "secret = 1"
