"""Bad JSON bodies get a clear 4xx in the envelope and change nothing (issue 8, item 3).

One real server with both example packages loaded; every request goes over HTTP. "Changes
nothing" is checked where it can be seen: no session appears, no invocation is counted, and
the session that was there before still holds its state.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES, Client, Response, Server, serving

from pixell_kernel_runtime.packages.builder import build_all

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
GREET = "hello-handler@0.1.0/greet"
# The documented bounds of a JSON body (README, "Limits").
MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 1_000_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("bad-input")
    with serving(base / "state", build_all(EXAMPLES, base / "apkgs")) as server:
        yield server


@pytest.fixture
def client(srv: Server) -> Client:
    return srv.client


def post_raw(client: Client, path: str, body: bytes) -> Response:
    return client.request("POST", path, body, {"Content-Type": "application/json"})


def invoke_url(agent: str) -> str:
    return f"/runtime/agents/{quote(agent, safe='@')}/invoke"


def session_ids(client: Client) -> set[str]:
    resp = client.get("/runtime/sessions")
    assert resp.status == 200, resp
    return {s["session_id"] for s in resp.json()["sessions"]}


def invocations(client: Client) -> int:
    resp = client.get("/runtime/info")
    assert resp.status == 200, resp
    return resp.json()["total_invocations"]


def refused(resp: Response, status: int, kind: str, words: str) -> dict[str, Any]:
    """The envelope of a refusal: its status, kind, request id, and a message that says why."""
    assert resp.status == status, resp
    doc = resp.json()
    assert doc["error"] == kind, doc
    assert doc["request_id"] == resp.headers["x-request-id"], doc
    text = doc["message"] + " " + " ".join(d["msg"] for d in doc.get("details", []))
    assert words in text, doc
    return doc


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_in_every_json_body(client: Client, token: str) -> None:
    sid = f"nan-{token.strip('-').lower()}"
    before = invocations(client)
    # timeout_seconds: NaN used to switch the deadline off (min(nan, 600) is nan).
    bodies = [
        (
            invoke_url(CE),
            f'{{"input": {{"code": "1", "session_id": "{sid}", "timeout_seconds": {token}}}}}',
        ),
        (
            invoke_url(CE),
            f'{{"input": {{"code": "1", "session_id": "{sid}"}}, "context": {{"x": [{token}]}}}}',
        ),
        (invoke_url(GREET), f'{{"input": {{"name": {token}, "session_id": "{sid}"}}}}'),
        ("/runtime/packages/load", f'{{"path": "/nonexistent.apkg", "x": {token}}}'),
    ]
    for path, body in bodies:
        doc = refused(post_raw(client, path, body.encode()), 422, "ValidationError", token)
        assert doc["code"] == "validation_error", doc
        assert doc["details"][0]["loc"] == ["body"], doc
        assert doc["details"][0]["type"] == "value_error.number.not_finite", doc
    assert sid not in session_ids(client)
    assert invocations(client) == before


def test_nan_inside_a_handler_input_is_a_422_not_a_500(client: Client) -> None:
    sid = "handler-nan"
    before = invocations(client)
    body = f'{{"input": {{"name": {{"deep": [1, NaN]}}, "session_id": "{sid}"}}}}'
    refused(post_raw(client, invoke_url(GREET), body.encode()), 422, "ValidationError", "NaN")
    # The same call with a finite number runs: nothing about the session was spoiled.
    assert sid not in session_ids(client)
    assert invocations(client) == before
    ok = client.invoke(GREET, {"name": "ada", "session_id": sid})
    assert ok.status == 200, ok
    assert ok.json()["output"] == {"greeting": "Hello, ada!"}


def nested(depth: int) -> bytes:
    """A body whose ``input.deep`` makes the whole document exactly ``depth`` levels deep."""
    inner = depth - 2  # the body object and ``input`` are two levels
    return (
        b'{"input": {"code": "result = 1", "session_id": "deep", "deep": '
        + b"[" * inner
        + b"]" * inner
        + b"}}"
    )


def test_deeply_nested_bodies_are_refused_with_their_depth(client: Client) -> None:
    before = invocations(client)
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        doc = refused(
            post_raw(client, invoke_url(CE), nested(depth)), 422, "ValidationError", "deep"
        )
        assert doc["details"][0]["type"] == "value_error.json.depth", doc
        assert str(MAX_JSON_DEPTH) in doc["details"][0]["msg"], doc
    assert "deep" not in session_ids(client)
    assert invocations(client) == before
    # At the limit the body is an ordinary one.
    at_limit = post_raw(client, invoke_url(CE), nested(MAX_JSON_DEPTH))
    assert at_limit.status == 200, at_limit
    assert at_limit.json()["output"]["result"] == 1


def test_a_body_with_too_many_values_is_a_413(client: Client) -> None:
    sid = "many-values"
    before = invocations(client)
    body = (
        f'{{"input": {{"code": "1", "session_id": "{sid}", "v": ['.encode()
        + b",".join([b"0"] * (MAX_JSON_VALUES + 1))
        + b"]}}"
    )
    doc = refused(post_raw(client, invoke_url(CE), body), 413, "PayloadTooLarge", "values")
    assert doc["code"] == "json_too_large", doc
    assert str(MAX_JSON_VALUES) in doc["message"], doc
    assert sid not in session_ids(client)
    assert invocations(client) == before


def test_a_json_body_over_max_body_bytes_is_a_413_in_the_envelope(tmp_path: Path) -> None:
    """Over MAX_BODY_BYTES: a 413 with the envelope (tornado alone answers a bare 400 and
    closes), by Content-Length before the body is read, and for a chunked body as it arrives."""
    from conftest import stop_all

    server = Server(tmp_path / "state", ["--examples"], {"MAX_BODY_BYTES": "65536"}).start()
    try:
        path = "/runtime/agents/pixell-python-agent@0.1.0%2Fcode-executor/invoke"
        big = json.dumps({"input": {"code": "x = '" + "a" * 70000 + "'"}}).encode()
        resp = server.client.request("POST", path, big, {"Content-Type": "application/json"})
        assert resp.status == 413, resp
        body = resp.json()
        assert body["code"] == "body_too_large" and "65536" in body["message"], body
        # Chunked (no Content-Length): counted as it arrives.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for i in range(0, len(big), 8192):
                piece = big[i : i + 8192]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
            chunked = conn.getresponse()
            data = json.loads(chunked.read())
        finally:
            conn.close()
        assert chunked.status == 413 and data["code"] == "body_too_large", data
        # Under the cap, the same route works.
        small = server.client.invoke(
            "pixell-python-agent@0.1.0/code-executor", {"code": "1 + 1", "session_id": "s"}
        )
        assert small.status == 200 and small.json()["output"]["result"] == 2, small
        sessions = server.client.get("/runtime/sessions").json()["sessions"]
        assert [s["session_id"] for s in sessions] == ["s"]  # the refused calls made none
    finally:
        stop_all([server])
