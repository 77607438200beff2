"""Executions as records: SSE as the kernel produces, detach and resume, cancel, websocket.

Every client here is a real one: SSE is read line by line off a raw HTTP response as bytes
arrive (no buffering client), the websocket is tornado's client.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import tornado.websocket
from conftest import Server, wait_for

CE = "pixell-python-agent@0.1.0/code-executor"
STREAM_EXECUTOR = "pixell-python-agent@0.1.0/stream-executor"


def _path(agent: str) -> str:
    return f"/runtime/agents/{quote(agent, safe='@')}/invoke"


@dataclass
class Sse:
    """One SSE response, read as it arrives."""

    status: int
    headers: dict[str, str]
    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: int = 0

    def next(self) -> dict[str, Any] | None:
        """The next event (id, event, data, at); None at the end of the stream."""
        ident, kind, data = None, None, []
        while True:
            line = self.resp.readline()  # chunked: the response decodes it
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith(":"):
                self.comments += 1
            elif text.startswith("id: "):
                ident = int(text[4:])
            elif text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: "):
                data.append(text[6:])
            elif text == "" and kind is not None:
                event = {
                    "id": ident,
                    "event": kind,
                    "data": json.loads("\n".join(data)),
                    "at": time.monotonic(),
                }
                self.events.append(event)
                return event

    def rest(self) -> list[dict[str, Any]]:
        got = []
        while (event := self.next()) is not None:
            got.append(event)
        return got

    def close(self) -> None:
        self.conn.close()


def sse(
    srv: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> Sse:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    raw = json.dumps(body).encode() if body is not None else None
    conn.request(
        method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    return Sse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, conn, resp)


def stream_invoke(srv: Server, agent: str, input_: dict[str, Any], **headers: str) -> Sse:
    return sse(
        srv, "POST", _path(agent), {"input": input_}, {"Accept": "text/event-stream", **headers}
    )


def stdout_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["event"] == "stdout")


def execution(srv: Server, execution_id: str) -> dict[str, Any]:
    got = srv.client.get(f"/runtime/executions/{execution_id}")
    assert got.status == 200, got
    return got.json()


COUNT = "import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep({pause})\n"


def test_sse_events_arrive_while_the_cell_runs_and_end_with_the_plain_answer(
    server_factory,
) -> None:
    srv = server_factory(["--examples"])
    code = "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')\n6 * 7"
    stream = stream_invoke(srv, CE, {"code": code, "session_id": "sse"})
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    execution_id = stream.headers["x-execution-id"]
    events = stream.rest()
    kinds = [e["event"] for e in events]
    assert kinds == ["status", "status", "stdout", "stdout", "result", "done"], kinds
    assert [e["data"]["state"] for e in events[:2]] == ["queued", "running"]
    assert [e["id"] for e in events] == list(range(1, 7))
    first, done = events[2], events[-1]
    assert first["data"] == {"text": "first\n"}
    # The first line was read while the cell still slept, not at its end.
    assert done["at"] - first["at"] > 1.5, (first, done)
    assert events[4]["data"]["data"] == {"text/plain": "42"}
    # done carries exactly what a plain invoke answers, and what the record keeps.
    answer = done["data"]
    assert answer["state"] == "done" and answer["execution_id"] == execution_id
    assert answer["output"]["stdout"] == "first\nsecond\n" and answer["output"]["result"] == 42
    kept = execution(srv, execution_id)
    assert kept["state"] == "done"
    assert {k: v for k, v in answer.items() if k not in ("state", "execution_id")} == kept["answer"]
    plain = srv.client.invoke(CE, {"code": code.replace("time.sleep(2)", ""), "session_id": "sse"})
    assert plain.status == 200, plain
    assert set(plain.json()) == set(kept["answer"])
    assert set(plain.json()["output"]) == set(answer["output"])
    assert plain.headers["x-execution-id"] == plain.json()["metadata"]["execution_id"]


def test_a_client_that_disconnects_resumes_with_last_event_id_missing_and_repeating_nothing(
    server_factory,
) -> None:
    srv = server_factory(["--examples"])
    stream = stream_invoke(srv, CE, {"code": COUNT.format(n=10, pause=0.2), "session_id": "r"})
    execution_id = stream.headers["x-execution-id"]
    while stream.next() is not None and stdout_of(stream.events).count("\n") < 3:
        pass
    seen = list(stream.events)
    stream.close()  # drops the connection mid-run
    assert execution(srv, execution_id)["state"] == "running"  # not cancelled by the drop
    last = seen[-1]["id"]
    resumed = sse(
        srv,
        "GET",
        f"/runtime/executions/{execution_id}/events",
        headers={"Last-Event-ID": str(last)},
    )
    assert resumed.status == 200, resumed.resp.read()
    rest = resumed.rest()
    assert [e["id"] for e in seen + rest] == list(range(1, len(seen) + len(rest) + 1))
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["state"] == "done"
    assert stdout_of(seen + rest) == "".join(f"{i}\n" for i in range(10))
    # A replay from the start (no Last-Event-ID) is the whole log, the same events.
    replay = sse(srv, "GET", f"/runtime/executions/{execution_id}/events").rest()
    assert [(e["id"], e["event"], e["data"]) for e in replay] == [
        (e["id"], e["event"], e["data"]) for e in seen + rest
    ]
    after = sse(srv, "GET", f"/runtime/executions/{execution_id}/events?after={last}").rest()
    assert [e["id"] for e in after] == [e["id"] for e in rest]


def test_bad_last_event_id_is_a_422_and_unknown_executions_a_404(server_factory) -> None:
    srv = server_factory(["--examples"])
    answer = srv.client.invoke(CE, {"code": "1", "session_id": "v"})
    execution_id = answer.json()["metadata"]["execution_id"]
    bad = srv.client.get(
        f"/runtime/executions/{execution_id}/events", headers={"Last-Event-ID": "x1"}
    )
    assert bad.status == 422 and "Last-Event-ID" in bad.json()["details"][0]["loc"], bad
    missing = srv.client.get("/runtime/executions/no-such-id")
    assert missing.status == 404 and missing.json()["code"] == "execution_not_found", missing
    assert srv.client.post_json("/runtime/executions/no-such-id/cancel", {}).status == 404


def test_finished_executions_expire_with_a_message_that_says_so(server_factory) -> None:
    srv = server_factory(["--examples"], env={"EXECUTIONS_KEEP_COUNT": "1"})
    first = srv.client.invoke(CE, {"code": "1", "session_id": "e"}).json()["metadata"]
    second = srv.client.invoke(CE, {"code": "2", "session_id": "e"}).json()["metadata"]
    assert execution(srv, second["execution_id"])["state"] == "done"
    gone = srv.client.get(f"/runtime/executions/{first['execution_id']}")
    assert gone.status == 404 and gone.json()["code"] == "execution_expired", gone
    assert "expired" in gone.json()["message"] and "EXECUTIONS_KEEP_COUNT" in gone.json()["message"]


def test_cancel_interrupts_a_running_call_and_takes_a_queued_one_out(server_factory) -> None:
    srv = server_factory(["--examples"])
    c = srv.client
    assert c.invoke(CE, {"code": "kept = 1", "session_id": "c"}).status == 200
    code = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)"
    stream = stream_invoke(srv, CE, {"code": code, "session_id": "c"})
    running_id = stream.headers["x-execution-id"]
    while (event := stream.next()) is not None and event["event"] != "stdout":
        pass
    assert event is not None, stream.events
    queued = stream_invoke(srv, CE, {"code": "ran = True", "session_id": "c"})
    first = queued.next()
    assert first is not None and first["data"]["state"] == "queued", first
    queued_id = first["data"]["execution_id"]
    assert execution(srv, queued_id)["state"] == "queued"
    cancelled = c.post_json(f"/runtime/executions/{queued_id}/cancel", {})
    assert cancelled.status == 202 and cancelled.json()["cancel_requested"] is True, cancelled
    done = queued.rest()[-1]
    assert done["event"] == "done" and done["data"]["state"] == "cancelled", done
    out = done["data"]["output"]
    assert out["status"] == "error" and out["error"] == "cancelled", out
    assert execution(srv, queued_id)["state"] == "cancelled"
    # The running one: interrupted, its session's state kept.
    assert execution(srv, running_id)["state"] == "running"
    assert c.post_json(f"/runtime/executions/{running_id}/cancel", {}).status == 202
    rest = stream.rest()
    assert rest[-1]["event"] == "done", rest
    done = rest[-1]["data"]
    assert done["state"] == "cancelled" and done["output"]["state_lost"] is False, done
    again = c.invoke(CE, {"code": "result = (kept, 'ran' in globals())", "session_id": "c"})
    assert again.json()["output"]["result"] == [1, False], again
    assert again.json()["output"]["session_restarted"] is False
    finished = c.post_json(f"/runtime/executions/{running_id}/cancel", {})
    assert finished.status == 409 and finished.json()["code"] == "execution_finished", finished


def test_cancel_restarts_a_cell_that_ignores_the_interrupt(server_factory) -> None:
    srv = server_factory(["--examples"])
    code = (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ignoring', flush=True)\ntime.sleep(60)"
    )
    stream = stream_invoke(srv, CE, {"code": code, "session_id": "x"})
    execution_id = stream.headers["x-execution-id"]
    # Cancel once the cell ignores SIGINT (earlier, the interrupt would still stop it).
    while (event := stream.next()) is not None and event["event"] != "stdout":
        pass
    assert event is not None and event["data"]["text"] == "ignoring\n", event
    assert srv.client.post_json(f"/runtime/executions/{execution_id}/cancel", {}).status == 202
    done = stream.rest()[-1]["data"]
    assert done["state"] == "cancelled" and done["output"]["state_lost"] is True, done
    after = srv.client.invoke(CE, {"code": "1", "session_id": "x"}).json()["output"]
    assert after["session_restarted"] is True, after


def test_a_reader_behind_the_log_bound_gets_a_marked_gap(server_factory) -> None:
    srv = server_factory(["--examples"], env={"EXECUTION_LOG_EVENTS": "20"})
    answer = srv.client.invoke(CE, {"code": COUNT.format(n=60, pause=0.01), "session_id": "g"})
    assert answer.status == 200 and answer.json()["output"]["status"] == "success", answer
    execution_id = answer.json()["metadata"]["execution_id"]
    events = sse(srv, "GET", f"/runtime/executions/{execution_id}/events").rest()
    gap, kept = events[0], events[1:]
    assert gap["event"] == "gap" and gap["data"]["from"] == 1, gap
    assert len(kept) == 20 and kept[-1]["event"] == "done"
    assert kept[0]["id"] == gap["data"]["to"] + 1 == gap["id"] + 1
    assert [e["id"] for e in kept] == list(range(kept[0]["id"], kept[0]["id"] + 20))
    # The answer itself is whole: the bound is the log's, not the output's.
    assert answer.json()["output"]["stdout"] == "".join(f"{i}\n" for i in range(60))


def test_a_reader_that_stops_reading_slows_neither_the_call_nor_the_server(
    server_factory,
) -> None:
    srv = server_factory(["--examples"], env={"EXECUTION_LOG_EVENTS": "20"})
    # 15 MB of displays: more than the socket buffers between server and reader hold.
    code = (
        "import time\nfrom IPython.display import display\nfor i in range(100):\n"
        "    display({'text/plain': str(i % 10) * 150_000}, raw=True)\n    time.sleep(0.01)\n"
    )
    # A reader that reads nothing until the call is over.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    body = json.dumps({"input": {"code": code, "session_id": "slow"}}).encode()
    conn.request("POST", _path(CE) + "?stream=true", body=body)
    resp = conn.getresponse()
    execution_id = resp.getheader("X-Execution-Id")
    # The call runs to its end while the reader sleeps, and the server answers others.
    assert wait_for(lambda: execution(srv, execution_id)["state"] == "done", timeout=60)
    health = srv.client.get("/runtime/health", timeout=5)
    assert health.status == 200, health
    reader = Sse(resp.status, {}, conn, resp)
    events = reader.rest()
    gaps = [e for e in events if e["event"] == "gap"]
    assert len(gaps) == 1, [e["event"] for e in events][:20]
    covered: list[int] = []  # every seq, read or named by the gap: none missing, none twice
    for e in events:
        gap = e["data"] if e["event"] == "gap" else None
        covered += list(range(gap["from"], gap["to"] + 1)) if gap else [e["id"]]
    assert covered == list(range(1, events[-1]["id"] + 1))
    assert events[-1]["event"] == "done" and events[-1]["data"]["state"] == "done"
    # It missed what the log no longer held when it came back: most of the 100 displays.
    displays = [e for e in events if e["event"] == "display"]
    assert len(displays) + gaps[0]["data"]["to"] - gaps[0]["data"]["from"] + 1 >= 100, gaps
    assert len(displays) < 60, len(displays)


def test_stream_executor_streams_by_default_and_json_when_asked(server_factory) -> None:
    srv = server_factory(["--examples"])
    body = {"input": {"code": "print('hi')", "session_id": "d"}}
    default = sse(srv, "POST", _path(STREAM_EXECUTOR), body)
    assert default.headers["content-type"].startswith("text/event-stream"), default.headers
    assert stdout_of(default.rest()) == "hi\n"
    asked = srv.client.request(
        "POST", _path(STREAM_EXECUTOR), json.dumps(body).encode(), {"Accept": "application/json"}
    )
    assert asked.status == 200 and asked.json()["output"]["stdout"] == "hi\n", asked
    off = srv.client.post_json(_path(STREAM_EXECUTOR) + "?stream=false", body)
    assert off.headers["content-type"].startswith("application/json"), off
    # And the code executor answers JSON unless asked to stream.
    plain = srv.client.post_json(_path(CE), body)
    assert plain.headers["content-type"].startswith("application/json"), plain


def test_output_caps_hold_on_every_surface(server_factory) -> None:
    srv = server_factory(["--examples"], env={"OUTPUT_STREAM_CHARS": "1000"})
    code = "for i in range(100):\n    print('z' * 99)"
    events = stream_invoke(srv, CE, {"code": code, "session_id": "cap"}).rest()
    streamed = stdout_of(events)
    assert streamed.startswith("z" * 99) and streamed.endswith("[output truncated]\n"), streamed
    assert len(streamed) <= 1000 + 64
    out = events[-1]["data"]["output"]
    assert out["stdout"] == streamed and out["truncated"] is True
    assert out["truncation"]["stdout"]["chars_seen"] == 100 * 100
    assert out["truncation"]["limits"]["stream_chars"] == 1000


async def _ws(srv: Server, agent: str, first: dict[str, Any]) -> list[dict[str, Any]]:
    url = f"ws://127.0.0.1:{srv.port}/runtime/agents/{quote(agent, safe='@')}/stream"
    conn = await tornado.websocket.websocket_connect(url)
    await conn.write_message(json.dumps(first))
    got = []
    while (msg := await asyncio.wait_for(conn.read_message(), 60)) is not None:
        got.append(json.loads(msg))
    # A stream closes normally after `done`; a refusal with 1008 (4xx) or 1011 (5xx).
    last = got[-1]
    if last["event"] == "error":
        expected = 1008 if last["data"]["status"] < 500 else 1011
    else:
        assert last["event"] == "done", last
        expected = 1000
    assert conn.close_code == expected, (conn.close_code, last)
    return got


def test_websocket_stream_offers_the_same_events_and_resumes(server_factory) -> None:
    srv = server_factory(["--examples"])
    body = {"input": {"code": COUNT.format(n=3, pause=0.1) + "'end'", "session_id": "w"}}
    got = asyncio.run(_ws(srv, CE, body))
    assert [m["event"] for m in got] == [
        "status",
        "status",
        "stdout",
        "stdout",
        "stdout",
        "result",
        "done",
    ], got
    assert [m["seq"] for m in got] == list(range(1, 8))
    done = got[-1]["data"]
    assert done["state"] == "done" and done["output"]["stdout"] == "0\n1\n2\n"
    execution_id = done["execution_id"]
    # What the websocket sent is what SSE replays.
    replay = sse(srv, "GET", f"/runtime/executions/{execution_id}/events").rest()
    assert [(e["id"], e["event"], e["data"]) for e in replay] == [
        (m["seq"], m["event"], m["data"]) for m in got
    ]
    resumed = asyncio.run(_ws(srv, CE, {"execution_id": execution_id, "after": 4}))
    assert [m["seq"] for m in resumed] == [5, 6, 7]
    refused = asyncio.run(_ws(srv, CE, {"input": {"session_id": "w"}}))
    assert refused[0]["event"] == "error" and refused[0]["data"]["status"] == 422, refused


@pytest.mark.parametrize("agent", [CE])
def test_unknown_agent_over_websocket_is_refused(server_factory, agent: str) -> None:
    srv = server_factory(["--examples"])
    refused = asyncio.run(_ws(srv, "nope@1.0/x", {"input": {"code": "1"}}))
    assert (
        refused == [{"seq": 0, "event": "error", "data": refused[0]["data"]}]
        and refused[0]["data"]["code"] == "agent_not_found"
    ), refused
