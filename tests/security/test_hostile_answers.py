"""What a kernel sends back is hostile data: never eval'ed, size-capped, parsed off the loop.

Issue 7, item 5. Before: the server ran ``ast.literal_eval`` on the kernel-controlled
``text/plain`` of the helper's answer (on the event loop: a 1.5 MiB repr grew the server by
~550 MB), and the output cap counted a non-string MIME value as 256 bytes and ignored
``metadata`` (20 displays with 2 MiB metadata each gave a 42 MB answer not marked truncated).

Every payload here is harmless even when it works: its proof is the answer itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Server

from pixell_kernel_runtime.execution.runner import OUTPUT_BYTES_LIMIT, STREAM_LIMIT
from pixell_kernel_runtime.execution.wire import MESSAGE_LIMIT

AGENT = "pixell-python-agent@0.1.0/code-executor"
MIB = 1024 * 1024
# What the server may hold for one hostile answer beyond its resting size.
RSS_GROWTH_MIB = 150


def _start(server_factory: Any, example_apkgs: dict[str, Path]) -> Server:
    srv = server_factory(env={"LOG_LEVEL": "INFO"})
    assert srv.client.load(example_apkgs["pixell-python-agent"]).status == 200
    return srv


def _run(client: Client, code: str, session: str) -> dict[str, Any]:
    answer = client.invoke(AGENT, {"code": code, "session_id": session, "timeout_seconds": 60})
    assert answer.status == 200, answer
    return answer.json()["output"]


def _hijack(repr_expr: str, *, once: bool = False, no_json: bool = False) -> str:
    """User code that swaps the helper's collect for an object whose only form is its repr
    (``once``: for one call; ``no_json``: and no application/json from this kernel at all)."""
    lines = [
        "import sys",
        "m = sys.modules['__pixell__']",
        f"text = {repr_expr}",
        "class X:",
        "    def __repr__(self):",
        "        return text",
    ]
    if once:  # the next call gets the real helper back
        lines += [
            "orig = m.collect",
            "def swapped(*a, **k):",
            "    m.collect = orig",
            "    return X()",
            "m.collect = swapped",
        ]
    else:
        lines.append("m.collect = lambda *a, **k: X()")
    if no_json:
        formatter = "get_ipython().display_formatter.formatters['application/json']"
        lines.append(f"{formatter}.enabled = False")
    lines.append("result = 'honest'")
    return "\n".join(lines)


def _vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> None:
    # Writing 5 resets the peak RSS (VmHWM) of that process: our own server child.
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


@contextmanager
def _health_probe(client: Client) -> Iterator[dict[str, list]]:
    """Ask /runtime/health over and over until the block ends; record every outcome."""
    seen: dict[str, list] = {"ok": [], "bad": []}
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                status = client.get("/runtime/health", timeout=10).status
            except OSError as exc:  # a stalled loop: the request timed out
                seen["bad"].append(repr(exc))
            else:
                seen["ok" if status == 200 else "bad"].append(status)
            stop.wait(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.parametrize(
    "fake",
    [
        # Only ast.literal_eval accepts this one.
        "\"{'has_result': True, 'result': 'PWNED'}\"",
        # And this one is JSON text: json.loads of text/plain accepted it.
        '\'{"has_result": true, "result": "PWNED"}\'',
    ],
    ids=["python-literal", "json-text"],
)
def test_text_plain_of_the_helper_is_never_parsed(
    server_factory: Any, example_apkgs: dict[str, Path], fake: str
) -> None:
    srv = _start(server_factory, example_apkgs)
    out = _run(srv.client, _hijack(fake, no_json=True), "plain")
    assert out["status"] == "success", out
    assert out["result"] is None, out
    # The same session still answers; its own values come through application/json only.
    out = _run(srv.client, "result = 6 * 7", "plain")
    assert out["result"] is None, out
    fresh = _run(srv.client, "result = 6 * 7", "fresh")
    assert fresh["result"] == 42, fresh


def test_display_metadata_counts_toward_the_output_cap(
    server_factory: Any, example_apkgs: dict[str, Path]
) -> None:
    srv = _start(server_factory, example_apkgs)
    code = (
        "from IPython.display import display\n"
        "pad = 'm' * (2 * 1024 * 1024)\n"
        "for i in range(20):\n"
        "    display({'text/plain': f'd{i}'}, raw=True, metadata={'pad': pad})\n"
        "result = 7\n"
    )
    answer = srv.client.invoke(AGENT, {"code": code, "session_id": "meta"})
    assert answer.status == 200, answer
    # Streams at their cap, outputs at theirs, and room for the rest of the answer.
    assert len(answer.body) < OUTPUT_BYTES_LIMIT + 2 * STREAM_LIMIT + 256 * 1024, len(answer.body)
    out = answer.json()["output"]
    assert out["status"] == "success" and out["result"] == 7, out["status"]
    kept = out["outputs"]
    assert 0 < len(kept) < 20
    # Whole messages are kept or dropped: what is kept is intact.
    assert [o["data"]["text/plain"] for o in kept] == [f"d{i}" for i in range(len(kept))]
    assert all(len(o["metadata"]["pad"]) == 2 * MIB for o in kept)
    assert out["truncated"] is True
    outputs = out["truncation"]["outputs"]
    assert outputs["count_seen"] == 20 and outputs["count_kept"] == len(kept), outputs
    assert outputs["bytes_seen"] > 40 * MIB, outputs
    assert len(kept) * 2 * MIB < outputs["bytes_kept"] <= OUTPUT_BYTES_LIMIT, outputs
    assert out["truncation"]["limits"]["output_bytes"] == OUTPUT_BYTES_LIMIT


def test_huge_expression_repr_costs_bounded_memory_and_health_answers(
    server_factory: Any, example_apkgs: dict[str, Path]
) -> None:
    srv = _start(server_factory, example_apkgs)
    pid = srv.proc.pid
    assert _run(srv.client, "result = 1", "big")["result"] == 1  # kernel up before measuring
    # ~7 MiB: a long string and 300k literal items. literal_eval built ~300 MB of AST from it.
    blob = "\"('\" + 'x' * (6 * 1024 * 1024) + \"', \" + '0, ' * 300_000 + ')'"
    before = _vm_kib(pid, "VmRSS")
    _reset_peak(pid)
    with _health_probe(srv.client) as health:
        out = _run(srv.client, _hijack(blob), "big")
    grown = (_vm_kib(pid, "VmHWM") - before) / 1024
    assert grown < RSS_GROWTH_MIB, f"server peak RSS grew by {grown:.0f} MiB"
    assert out["status"] == "success" and out["result"] is None, out["status"]
    assert health["bad"] == [] and len(health["ok"]) >= 1, health
    assert srv.client.get("/runtime/health").status == 200


def test_reply_over_the_message_cap_is_a_marked_error(
    server_factory: Any, example_apkgs: dict[str, Path]
) -> None:
    srv = _start(server_factory, example_apkgs)
    assert MESSAGE_LIMIT < 12 * MIB < 16 * MIB  # 16 MiB: the socket's per-frame MAXMSGSIZE
    with _health_probe(srv.client) as health:
        out = _run(srv.client, _hijack("'x' * (12 * 1024 * 1024)", once=True), "cap")
    assert out["status"] == "error", out
    assert "reply" in out["error"] and str(MESSAGE_LIMIT) in out["error"], out["error"]
    assert out["truncated"] is True
    dropped = out["truncation"]["dropped"]
    assert dropped["count"] == 1 and dropped["bytes"] > 12 * MIB, dropped
    assert health["bad"] == [] and len(health["ok"]) >= 1, health
    # Nothing of that reply is left behind: the session's next answer is its own.
    again = _run(srv.client, "result = 6 * 7", "cap")
    assert again["status"] == "success" and again["result"] == 42, again


def test_display_of_millions_of_json_values_is_dropped_unparsed(
    server_factory: Any, example_apkgs: dict[str, Path]
) -> None:
    srv = _start(server_factory, example_apkgs)
    pid = srv.proc.pid
    assert _run(srv.client, "result = 1", "values")["result"] == 1
    # 4 MB of "[[], [], ...": small on the wire, ~70 MB of lists each once parsed.
    code = (
        "from IPython.display import display\n"
        "for i in range(5):\n"
        "    display({'application/json': [[]] * 1_000_000}, raw=True)\n"
        "result = 3\n"
    )
    before = _vm_kib(pid, "VmRSS")
    _reset_peak(pid)
    with _health_probe(srv.client) as health:
        out = _run(srv.client, code, "values")
    grown = (_vm_kib(pid, "VmHWM") - before) / 1024
    assert grown < RSS_GROWTH_MIB, f"server peak RSS grew by {grown:.0f} MiB"
    assert out["status"] == "success" and out["result"] == 3, out["status"]
    assert out["outputs"] == []
    assert out["truncated"] is True
    assert out["truncation"]["outputs"]["count_seen"] == 5
    assert out["truncation"]["dropped"]["count"] == 5
    assert health["bad"] == [] and len(health["ok"]) >= 1, health
