"""Streaming and the Jupyter channels websocket against the jupyter_client floor and Kernel
Gateway 3, side by side in one run on loopback (issue 10).

    python bench/bench_streaming.py [--n 200] [--events 30] [--json out.json]

Targets, all up at once and measured in interleaved rounds (the machines are shared and noisy:
every figure is also given as a ratio to the floor and to Kernel Gateway, from the same run):

- ``floor``: a bare ipykernel (``AsyncKernelManager``, ipc transport), driven in-process by
  ``jupyter_client``;
- ``kg``: Jupyter Kernel Gateway 3 from PyPI (its own venv, see ``bench_gateway.py``), as
  shipped, over its REST and ``/api/kernels/{id}/channels`` websocket (JSON protocol);
- ``kg_nodelay``: the same with the server's websocket setting ``TCP_NODELAY`` (a config file
  patches tornado's ``WebSocketHandler.open``; the bench checks the option on the socket);
- ``runtime_ws``: this runtime's ``/api/kernels/{kernel_id}/channels`` websocket, the kernel
  of a session first made by one REST invoke (``kernel_id`` from ``GET /runtime/sessions/{key}``);
- ``runtime_sse``: ``POST .../invoke`` with ``Accept: text/event-stream``;
- ``runtime_rest``: plain REST invoke over one HTTP keep-alive connection, for reference.

Measures:

- warm round trip of ``1+1``: from sending ``execute_request`` until both its
  ``execute_reply`` and its iopub ``idle`` arrived (for REST: the answer), ``--n`` runs after 20
  warmup runs per target;
- first-event latency: the cell ``import time; print('x', time.time(), flush=True);
  time.sleep(0.5)``; the kernel's ``time.time()`` right before the print travels in the text,
  and is compared with the client's ``time.time()`` when the stream message (the SSE ``stdout``
  event) arrives, same host and clock; ``--events`` runs per target.

The client always turns Nagle off on its own sockets. Every server is a subprocess on a
127.0.0.1 port with an explicit minimal environment, stopped (with whatever it started) at the
end. A runtime endpoint that is missing is reported as "not available".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ipykernel
import jupyter_client
import tornado
import tornado.httpclient
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as gw  # noqa: E402
from common import free_port  # noqa: E402

PACKAGE = "pixell-python-agent@0.1.0"
AGENT = f"/runtime/agents/{quote(PACKAGE + '/code-executor', safe='@')}/invoke"
EVENT_CODE = "import time; print('x', time.time(), flush=True); time.sleep(0.5)"
WARMUP = 20
ROUNDS = 10
Runner = Callable[[], Awaitable[float]]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stamp_latency(text: str, received: float) -> float:
    """Seconds from the kernel's ``time.time()`` (printed after ``x``) to ``received``."""
    words = text.split()
    if len(words) < 2 or words[0] != "x":
        raise RuntimeError(f"unexpected stream text {text!r}")
    return received - float(words[1])


# --- floor: jupyter_client on a bare ipc ipykernel ------------------------------------------


class Floor:
    def __init__(self, workdir: Path) -> None:
        root = workdir / "floor"
        # Its own home and IPython dir, like the other targets' kernels.
        self.env = gw.jupyter_env(root, os.path.dirname(sys.executable))
        self.km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=f"{root}/k")
        self.kc: Any = None

    async def start(self) -> None:
        await self.km.start_kernel(env=self.env)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km.has_kernel:
            await self.km.shutdown_kernel(now=True)

    async def execute(self, code: str, on_stream: Any = None, timeout: float = 30) -> None:
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            received = time.time()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and on_stream is not None:
                on_stream(msg, received)
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:
            reply = await self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"execute failed: {reply['content']}")


# --- generic runners ------------------------------------------------------------------------


def jupyter_runners(client: Any) -> tuple[Runner, Runner]:
    """(round trip, first-event latency) for anything with ``execute(code, on_stream=)``."""

    async def round_trip() -> float:
        t0 = time.perf_counter()
        await client.execute("1+1")
        return time.perf_counter() - t0

    async def first_event() -> float:
        seen: list[float] = []

        def on_stream(msg: dict[str, Any], received: float) -> None:
            if not seen and msg["content"]["name"] == "stdout":
                seen.append(stamp_latency(msg["content"]["text"], received))

        await client.execute(EVENT_CODE, on_stream=on_stream)
        if not seen:
            raise RuntimeError("no stdout stream message")
        return seen[0]

    return round_trip, first_event


# --- the runtime ----------------------------------------------------------------------------


def invoke_body(session: str, code: str) -> str:
    return json.dumps({"input": {"code": code, "session_id": session}})


def rest_invoke(conn: http.client.HTTPConnection, session: str, code: str = "1+1") -> dict:
    conn.request("POST", AGENT, invoke_body(session, code), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200 or data["output"]["status"] != "success":
        raise RuntimeError(f"invoke failed: {resp.status} {data}")
    return data


class NotAvailable(Exception):
    pass


def sse_first_event(port: int, session: str) -> tuple[float, bool]:
    """One streamed invoke: (stdout event latency, whether it came before the cell ended)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        conn.request("POST", AGENT, invoke_body(session, EVENT_CODE), headers)
        resp = conn.getresponse()
        ctype = resp.getheader("Content-Type", "")
        if resp.status != 200 or not ctype.startswith("text/event-stream"):
            raise NotAvailable(f"HTTP {resp.status}, Content-Type {ctype!r}")
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the client is ours
        event, latency, kernel_t = "", None, 0.0
        while True:
            line = resp.readline()
            received = time.time()
            if not line:
                raise RuntimeError("stream ended before done")
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:") and event == "stdout" and latency is None:
                text = json.loads(line[5:])["text"]
                latency = stamp_latency(text, received)
                kernel_t = received - latency
            elif line.startswith(b"data:") and event == "done":
                if latency is None:
                    raise RuntimeError(f"done without a stdout event: {line[:300]!r}")
                # Streamed: the event came while the kernel slept its 0.5 s.
                return latency, received - kernel_t >= 0.45
    finally:
        conn.close()


@contextlib.contextmanager
def runtime_server(workdir: Path) -> Any:
    home = workdir / "runtime-home"
    home.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = {"PATH": f"{bin_dir}:{gw.SYSTEM_PATH}", "HOME": str(home), "LANG": "C.UTF-8"}
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "pixell_kernel_runtime",
        "serve",
        "--examples",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--state-dir",
        str(workdir / "runtime-state"),
        "--log-level",
        "WARNING",
    ]
    with gw.serving(argv, env, port, "/runtime/health", workdir / "runtime.log"):
        yield port


async def runtime_ws_client(port: int, session: str) -> Any:
    """The session's kernel over the runtime's channels websocket (made by one REST invoke)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    rest_invoke(conn, session)
    key = quote(f"{PACKAGE}:{session}", safe="")
    conn.request("GET", f"/runtime/sessions/{key}")
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    kernel_id = doc.get("kernel_id") if resp.status == 200 else None
    if not kernel_id:
        raise NotAvailable(f"GET /runtime/sessions/{{key}}: {resp.status}, no kernel_id")
    url = f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?session_id=bench"
    try:
        client = await gw.JupyterWS.connect(url)
    except tornado.httpclient.HTTPClientError as exc:
        raise NotAvailable(f"channels websocket: {exc}") from None
    await client.wait_ready()
    return client


def rest_runner(port: int, session: str) -> tuple[Runner, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    rest_invoke(conn, session)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def once() -> float:
        t0 = time.perf_counter()
        rest_invoke(conn, session)
        return time.perf_counter() - t0

    async def round_trip() -> float:
        return await asyncio.to_thread(once)

    return round_trip, conn


def sse_runner(port: int, session: str, streamed: list[bool]) -> Runner:
    async def first_event() -> float:
        latency, before_end = await asyncio.to_thread(sse_first_event, port, session)
        streamed.append(before_end)
        return latency

    return first_event


# --- measuring and reporting ----------------------------------------------------------------


async def interleave(
    runners: dict[str, Runner], per_target: int, warmup: int, after_warmup: Any = None
) -> dict:
    """``per_target`` runs of each runner, in rounds that visit every target in turn."""
    for run in runners.values():
        for _ in range(warmup):
            await run()
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {name: [] for name in runners}
    rounds = min(ROUNDS, per_target)
    for r in range(rounds):
        count = per_target // rounds + (1 if r < per_target % rounds else 0)
        for name, run in runners.items():
            for _ in range(count):
                times[name].append(await run())
    return times


def figures(times: list[float]) -> dict[str, float]:
    return {
        "n": len(times),
        "p50_ms": round(1000 * statistics.median(times), 3),
        "p95_ms": round(1000 * pct(times, 0.95), 3),
    }


def with_ratios(table: dict[str, dict], bases: tuple[str, ...]) -> None:
    for fig in table.values():
        if "p50_ms" not in fig:
            continue
        for base in bases:
            ref = table.get(base, {})
            if "p50_ms" in ref and ref["p50_ms"] > 0:
                fig[f"p50_vs_{base}"] = round(fig["p50_ms"] / ref["p50_ms"], 2)


def machine(kg_venv: Path) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "ipykernel": ipykernel.__version__,
        "jupyter_client": jupyter_client.__version__,
        "tornado": tornado.version,
        "kernel_gateway": gw.kg_version(kg_venv),
    }


def markdown(result: dict) -> str:
    lines = []
    for title, key in (("warm round trip of 1+1", "round_trip"), ("first event", "first_event")):
        lines += [f"\n{title}", "| target | p50 ms | p95 ms | vs floor | vs kg | vs kg_nodelay |"]
        lines.append("|---|---|---|---|---|---|")
        for name, fig in result[key].items():
            if "p50_ms" not in fig:
                lines.append(f"| {name} | not available: {fig.get('not_available', '')} | | | | |")
                continue
            ratios = [fig.get(f"p50_vs_{b}", "") for b in ("floor", "kg", "kg_nodelay")]
            cells = [name, fig["p50_ms"], fig["p95_ms"], *ratios]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    venv = gw.kg_venv()
    rt: dict[str, Runner] = {}
    ev: dict[str, Runner] = {}
    missing: dict[str, str] = {}
    streamed: list[bool] = []
    mark_files: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        floor = Floor(workdir)
        try:
            await floor.start()
            rt["floor"], ev["floor"] = jupyter_runners(floor)
            for name, nodelay in (("kg", False), ("kg_nodelay", True)):
                kg = stack.enter_context(gw.kernel_gateway(venv, workdir, nodelay))
                status, model = gw.http_json(
                    kg["port"], "POST", "/api/kernels", {"name": "python3"}
                )
                if status != 201:
                    raise RuntimeError(f"{name}: POST /api/kernels answered {status} {model}")
                url = f"ws://127.0.0.1:{kg['port']}/api/kernels/{model['id']}/channels"
                client = await gw.JupyterWS.connect(f"{url}?session_id=bench")
                stack.callback(client.close)
                await client.wait_ready()
                rt[name], ev[name] = jupyter_runners(client)
                mark_files[name] = kg["nodelay_mark"]
            port = stack.enter_context(runtime_server(workdir))
            try:
                client = await runtime_ws_client(port, "bench-ws")
                stack.callback(client.close)
                rt["runtime_ws"], ev["runtime_ws"] = jupyter_runners(client)
            except NotAvailable as exc:
                missing["runtime_ws"] = str(exc)
            try:
                await asyncio.to_thread(sse_first_event, port, "bench-sse")
                ev["runtime_sse"] = sse_runner(port, "bench-sse", streamed)
            except NotAvailable as exc:
                missing["runtime_sse"] = str(exc)
            rt["runtime_rest"], conn = rest_runner(port, "bench-rest")
            stack.callback(conn.close)

            round_trips = await interleave(rt, args.n, WARMUP)
            first_events = await interleave(ev, args.events, 2, streamed.clear)
            marks = {name: gw.nodelay_marks(path) for name, path in mark_files.items()}
        finally:
            await floor.stop()
    if marks.get("kg") or not marks.get("kg_nodelay") or 0 in marks["kg_nodelay"]:
        raise RuntimeError(f"Kernel Gateway TCP_NODELAY is not as intended: {marks}")
    result: dict[str, Any] = {"machine": machine(venv), "round_trip": {}, "first_event": {}}
    for key, times in (("round_trip", round_trips), ("first_event", first_events)):
        table = {name: figures(t) for name, t in times.items()}
        for name, why in missing.items():
            if key == "first_event" or name != "runtime_sse":
                table[name] = {"not_available": why}
        with_ratios(table, ("floor", "kg", "kg_nodelay"))
        result[key] = table
    if streamed:
        result["first_event"]["runtime_sse"]["before_cell_end"] = f"{sum(streamed)}/{len(streamed)}"
    result["kg_server_tcp_nodelay"] = marks
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="warm round trips per target")
    ap.add_argument("--events", type=int, default=30, help="first-event runs per target")
    ap.add_argument("--json", type=Path)
    # tmpfs when there is one: the runtime's sandbox gives its kernels a tmpfs home, so the
    # floor's and the gateway's kernels keep their IPython history on one too.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else "/tmp"
    ap.add_argument("--scratch", default=shm, help="where the bench's temporary dirs go")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pkrs-", dir=args.scratch) as d:
        result = asyncio.run(run(args, Path(d)))
    text = json.dumps(result, indent=2)
    print(text)
    print(markdown(result))
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
