"""What ``bench_streaming.py`` runs against besides the runtime: Jupyter Kernel Gateway 3.

- its own venv (``~/.cache/pixell-bench/kg-venv``, made once with ``python -m venv`` and
  ``pip install 'jupyter_kernel_gateway>=3,<4' ipykernel``, reused after);
- a Kernel Gateway process on a loopback port, with an explicit minimal environment and its own
  ``JUPYTER_*`` and ``IPYTHONDIR`` folders, "as shipped" or "with nodelay", optionally with
  ``--KernelGatewayApp.prespawn_count=N`` (kernels it starts at start-up; a ``POST
  /api/kernels`` still starts a new one), then with
  ``--JupyterWebsocketPersonality.list_kernels=True`` (off as shipped: ``GET /api/kernels``
  answers 403) so that a client can find the prespawned kernels;
- a Jupyter client over the kernels websocket (legacy JSON protocol), shared with the
  runtime's ``/api/kernels/{id}/channels``; it always turns Nagle off on its own side.

"With nodelay": the gateway's config file (``jupyter_kernel_gateway_config.py`` in its
``JUPYTER_CONFIG_DIR``, plain Python that traitlets runs at start) wraps tornado's
``WebSocketHandler.open`` to call ``self.set_nodelay(True)``, which jupyter_server's kernel
websocket handler reaches through ``super().open()``. The wrapper also writes the socket's
``TCP_NODELAY`` value to a file, so the bench checks the option is really set on the server's
socket rather than trusting the patch.

It also reads what the benches need from /proc: a process tree, its CPU ticks and its memory
(RSS, and PSS/USS from ``smaps_rollup``).

Not a benchmark on its own: ``python bench/bench_streaming.py`` and ``bench/bench_compare.py``
run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tornado.websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port  # noqa: E402

KG_SPEC = "jupyter_kernel_gateway>=3,<4"
CACHE = Path(os.environ.get("PIXELL_BENCH_CACHE", Path.home() / ".cache" / "pixell-bench"))
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NODELAY_CONFIG = """\
# Written by bench/bench_gateway.py: Kernel Gateway "with nodelay".
import os
import socket

import tornado.websocket

_open = tornado.websocket.WebSocketHandler.open


def _open_nodelay(self, *args, **kwargs):
    self.set_nodelay(True)
    sock = self.ws_connection.stream.socket
    with open(os.environ["PKR_BENCH_NODELAY_MARK"], "a") as f:
        f.write("%d\\n" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return _open(self, *args, **kwargs)


tornado.websocket.WebSocketHandler.open = _open_nodelay
"""


# --- processes: started with an explicit env, stopped with everything they started --------


def process_tree(pid: int) -> set[int]:
    """``pid`` and its live descendants, from /proc (kernels start in sessions of their own,
    so a process group would miss them)."""
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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads, live and ended), 0 for a gone process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds of every live process in the trees of ``roots``."""
    pids: set[int] = set()
    for root in roots:
        pids |= process_tree(root)
    return sum(cpu_seconds(p) for p in pids)


def memory_kib(pid: int) -> dict[str, int]:
    """``{"rss", "pss", "uss"}`` of ``pid`` in KiB (USS: private clean + dirty), from
    ``smaps_rollup``; zeros for a gone process."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            value = int(rest.split()[0]) if rest.strip() and key[0].isupper() else 0
            if key == "Rss":
                out["rss"] = value
            elif key == "Pss":
                out["pss"] = value
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += value
    return out


def tree_memory_kib(root: int) -> dict[str, int]:
    """:func:`memory_kib` summed over the live tree of ``root``."""
    total = {"rss": 0, "pss": 0, "uss": 0}
    for pid in process_tree(root):
        for key, value in memory_kib(pid).items():
            total[key] += value
    return total


def smaps_groups(pid: int) -> dict[str, int]:
    """RSS in KiB per mapping name (``[heap]``, ``[anon]``, each file) from ``smaps``."""
    out: dict[str, int] = {}
    name = "[anon]"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            first, _, rest = line.partition(" ")
            if "-" in first and not first.endswith(":"):
                parts = rest.split()
                name = parts[4] if len(parts) > 4 else "[anon]"
            elif first == "Rss:":
                out[name] = out.get(name, 0) + int(rest.split()[0])
    return out


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    return []


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), None for a gone or zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


@contextlib.contextmanager
def serving(
    argv: list[str], env: dict[str, str], port: int, ready_path: str, log_path: Path
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` until ``GET ready_path`` answers 200 (60 s at most); on exit SIGTERM it,
    wait 30 s (then SIGKILL), and SIGKILL any descendant it left behind (reported)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {_tail(log_path)}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", ready_path)
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not answer in 60 s: {_tail(log_path)}")
            time.sleep(0.1)
        yield proc
    finally:
        tree = {p: t for p in process_tree(proc.pid) - {proc.pid} if (t := _start_time(p))}
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"bench: {argv[0]} ignored SIGTERM for 30 s, killed", file=sys.stderr)
                proc.kill()
                proc.wait(10)
        deadline = time.monotonic() + 10
        while (left := [p for p, t in tree.items() if _start_time(p) == t]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if left:
            print(f"bench: {argv[0]} left {left} running; killed", file=sys.stderr)


def _tail(path: Path, size: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-size:].decode(errors="replace")
    return ""


# --- Kernel Gateway -------------------------------------------------------------------------


def kg_venv() -> Path:
    """The bench's Kernel Gateway venv, made on first use (pip from the configured index)."""
    venv = CACHE / "kg-venv"
    exe = venv / "bin" / "jupyter-kernelgateway"
    if exe.exists():
        return venv
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"bench: creating {venv} ({KG_SPEC})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", KG_SPEC, "ipykernel"]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install {KG_SPEC} failed:\n{done.stdout[-2000:]}")
    return venv


def kg_version(venv: Path) -> str:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import kernel_gateway; print(kernel_gateway.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def jupyter_env(root: Path, bin_dir: Path | str) -> dict[str, str]:
    """A minimal environment with its own HOME, ``JUPYTER_*`` and ``IPYTHONDIR`` under
    ``root`` (made here): nothing of the caller's environment or home reaches the process."""
    dirs = {d: root / d for d in ("home", "config", "data", "runtime", "ipython")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",
        "HOME": str(dirs["home"]),
        "LANG": "C.UTF-8",
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTER_PLATFORM_DIRS": "1",
        "IPYTHONDIR": str(dirs["ipython"]),
        "PYTHONNOUSERSITE": "1",
    }


@contextlib.contextmanager
def kernel_gateway(
    venv: Path, workdir: Path, nodelay: bool, prespawn_count: int = 0
) -> Iterator[dict[str, Any]]:
    """A Kernel Gateway on a free loopback port; yields ``{"port", "nodelay_mark", "pid"}``
    (``pid``: the gateway's server process). With ``prespawn_count`` it is ready once it
    lists that many kernels (60 s at most)."""
    name = "kg-nodelay" if nodelay else "kg-shipped"
    root = workdir / (f"{name}-prespawn{prespawn_count}" if prespawn_count else name)
    env = jupyter_env(root, venv / "bin")
    mark = root / "nodelay-mark"
    env["PKR_BENCH_NODELAY_MARK"] = str(mark)
    if nodelay:
        Path(env["JUPYTER_CONFIG_DIR"], "jupyter_kernel_gateway_config.py").write_text(
            NODELAY_CONFIG
        )
    port = free_port()
    argv = [
        str(venv / "bin" / "jupyter-kernelgateway"),
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={port}",
        "--KernelGatewayApp.port_retries=0",
        "--KernelGatewayApp.log_level=WARN",
    ]
    if prespawn_count:
        argv.append(f"--KernelGatewayApp.prespawn_count={prespawn_count}")
        argv.append("--JupyterWebsocketPersonality.list_kernels=True")
    with serving(argv, env, port, "/api", root / "kg.log") as proc:
        deadline = time.monotonic() + 60
        while prespawn_count:
            status, kernels = http_json(port, "GET", "/api/kernels", timeout=10)
            if status == 200 and len(kernels) >= prespawn_count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kernel Gateway: {prespawn_count} prespawned kernels late")
            time.sleep(0.1)
        yield {"port": port, "nodelay_mark": mark, "pid": proc.pid}


def kg_kernel_pid(kg_pid: int, kernel_id: str) -> int | None:
    """The process of a gateway kernel: the child whose ``-f`` connection file names it."""
    needle = f"kernel-{kernel_id}.json"
    for pid in process_tree(kg_pid) - {kg_pid}:
        if any(arg.endswith(needle) for arg in cmdline(pid)):
            return pid
    return None


def nodelay_marks(mark: Path) -> list[int]:
    """The TCP_NODELAY values the patched gateway read on its websocket sockets."""
    with contextlib.suppress(OSError):
        return [int(v) for v in mark.read_text().split()]
    return []


def http_json(
    port: int, method: str, path: str, body: Any = None, timeout: float = 60
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


# --- a Jupyter client over the kernels websocket (legacy JSON protocol) ---------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JupyterWS:
    """One kernels-websocket connection; every wait is bounded."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.session = uuid.uuid4().hex

    @classmethod
    async def connect(cls, url: str, timeout: float = 30) -> JupyterWS:
        conn = await asyncio.wait_for(
            tornado.websocket.websocket_connect(url, max_message_size=64 << 20), timeout
        )
        # The client is ours: Nagle off on our side, always, for every target.
        conn.protocol.set_nodelay(True)
        sock = conn.protocol.stream.socket
        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            raise RuntimeError("client socket: TCP_NODELAY did not stick")
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": "bench",
            "date": _now(),
            "version": "5.3",
        }
        msg = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        self.conn.write_message(json.dumps(msg))
        return msg_id

    async def recv(self, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no kernel message in time")
        raw = await asyncio.wait_for(self.conn.read_message(), left)
        if raw is None:
            raise RuntimeError(f"websocket closed: {self.conn.close_code} {self.conn.close_reason}")
        if isinstance(raw, bytes):
            raise RuntimeError("binary frame on the legacy JSON protocol")
        return json.loads(raw)

    async def wait_ready(self, timeout: float = 60) -> None:
        """kernel_info_request until a reply comes (a new kernel may miss the first)."""
        deadline = time.monotonic() + timeout
        while True:
            msg_id = self.send("kernel_info_request", {})
            step = min(deadline, time.monotonic() + 2)
            try:
                while True:
                    msg = await self.recv(step)
                    if (
                        msg.get("msg_type") == "kernel_info_reply"
                        and msg["parent_header"].get("msg_id") == msg_id
                    ):
                        await self._drain(0.2)
                        return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    async def _drain(self, seconds: float) -> None:
        """Drop the late iopub status of the readiness probes."""
        with contextlib.suppress(TimeoutError):
            while True:
                await self.recv(time.monotonic() + seconds)

    async def execute(
        self, code: str, timeout: float = 30, on_stream: Any = None
    ) -> dict[str, Any]:
        """Send ``execute_request``, return once both its ``execute_reply`` and its iopub
        ``idle`` arrived (what a client needs to know the cell is over). ``on_stream(msg,
        received_at)`` sees each stream message as it arrives."""
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        msg_id = self.send("execute_request", content)
        deadline = time.monotonic() + timeout
        reply = None
        idle = False
        while reply is None or not idle:
            msg = await self.recv(deadline)
            received = time.time()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg.get("msg_type") or msg["header"]["msg_type"]
            if kind == "execute_reply":
                reply = msg["content"]
            elif kind == "status" and msg["content"].get("execution_state") == "idle":
                idle = True
            elif kind == "stream" and on_stream is not None:
                on_stream(msg, received)
        if reply.get("status") != "ok":
            raise RuntimeError(f"execute failed: {reply}")
        return reply
