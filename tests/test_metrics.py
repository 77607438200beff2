"""Metrics on their own port and on the API's, every label bounded; JSON logs per request."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import pytest
from conftest import Server, wait_for

CE = "pixell-python-agent@0.1.0/code-executor"
DA = "pixell-python-agent@0.1.0/data-analyzer"


def _parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _metrics_port(srv: Server) -> int:
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", srv.logs())
    assert found, srv.logs()[-3000:]
    return int(found.group(1))


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        return _parse(resp.read().decode())


def _out(srv: Server, agent: str, code: str, sid: str, **extra: Any) -> dict[str, Any]:
    answer = srv.client.invoke(agent, {"code": code, "session_id": sid, **extra})
    assert answer.status == 200, answer
    return answer.json()["output"]


def test_metrics_port_labels_and_death_reasons(server_factory) -> None:
    srv = server_factory(["--examples"], env={"METRICS_AGENT_LABELS": "1"})
    port = _metrics_port(srv)
    assert _out(srv, CE, "1", "a")["status"] == "success"
    assert _out(srv, DA, "2", "a")["status"] == "success"
    killed = _out(srv, CE, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "a")
    assert killed["kernel_exit"]["signal_name"] == "SIGKILL", killed
    slow = _out(
        srv,
        CE,
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)",
        "b",
        timeout_seconds=1,
    )
    assert slow["state_lost"] is True, slow
    streamed = srv.client.request(
        "POST",
        f"/runtime/agents/{CE}/invoke?stream=true",
        json.dumps({"input": {"code": "print('x' * 1000)", "session_id": "c"}}).encode(),
    )
    assert streamed.status == 200 and b"event: done" in streamed.body
    got = _scrape(port)
    # The first agent has its own label; past METRICS_AGENT_LABELS the rest are `other`.
    assert got[f'pixell_invocations_total{{agent="{CE}",status="success"}}'] == 1 + 1
    assert got['pixell_invocations_total{agent="other",status="success"}'] == 1
    assert got['pixell_kernel_deaths_total{reason="oom"}'] == 1  # SIGKILL
    assert got['pixell_kernel_deaths_total{reason="timeout"}'] == 1
    assert got['pixell_stream_bytes_total{surface="sse"}'] >= len(streamed.body) - 200
    # a: its kernel was killed (dead until its next call); b: restarted; c: idle.
    assert got['pixell_sessions{state="idle"}'] == 2
    assert got['pixell_sessions{state="dead"}'] == 1
    assert got["pixell_executions_kept"] == 5
    # Every route label is a handler's template, never a raw path.
    routes = {m for k in got for m in re.findall(r'route="([^"]*)"', k)}
    assert "/runtime/agents/{id}/invoke" in routes and not any(CE in r for r in routes), routes
    # The API port serves the same text (scope usage: open here, loopback without tokens).
    api = srv.client.get("/metrics")
    assert api.status == 200 and "pixell_kernel_start_seconds_bucket" in api.body.decode()


def test_metrics_port_can_be_turned_off_and_an_explicit_busy_port_is_fatal(
    server_factory, tmp_path
) -> None:
    off = server_factory(["--examples"], env={"METRICS_ENABLED": "false"})
    assert "metrics on http" not in off.logs()
    assert off.client.get("/metrics").status == 404
    busy = Server(tmp_path / "busy", ["--metrics-port", str(off.port)])
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            busy.start()
        assert "cannot serve metrics on 127.0.0.1" in busy.logs(), busy.logs()
    finally:
        busy.stop()


def test_json_logs_one_line_per_request_with_what_it_was_about(server_factory) -> None:
    srv = server_factory(["--examples", "--log-format", "json"])
    answer = srv.client.invoke(CE, {"code": "secret_value = 12345", "session_id": "logs"})
    assert answer.status == 200, answer
    meta = answer.json()["metadata"]

    def records() -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in srv.logs().splitlines() if ln.startswith("{")]

    def posts() -> list[dict[str, Any]]:
        return [
            r
            for r in records()
            if r.get("logger") == "pixell_kernel_runtime.access" and r.get("method") == "POST"
        ]

    # The access line is written once the answer has gone out: poll for it.
    assert wait_for(lambda: len(posts()) == 1, timeout=10), posts()
    lines, access = records(), posts()
    line = access[0]
    assert line["route"] == "/runtime/agents/{id}/invoke" and line["status"] == 200, line
    assert line["agent_id"] == CE and line["session_id"] == "logs", line
    assert line["execution_id"] == meta["execution_id"] and line["trace_id"], line
    assert line["tenant"] == "default" and line["latency_ms"] > 0, line
    started = [r for r in lines if r.get("event_type") == "kernel_started"]
    assert started and started[0]["session"] == "pixell-python-agent@0.1.0:logs", started
    # User code never reaches the log.
    assert "secret_value" not in srv.logs()
