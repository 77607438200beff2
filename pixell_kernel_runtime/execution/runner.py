"""Execute one cell and turn its Jupyter messages into a bounded result.

The runner only talks messages: it sends an ``execute_request`` and gathers
what the kernel publishes for it (streams, display data, the execute result,
errors) until the kernel is idle again and the reply has arrived. It never
waits blindly: every wait is bounded by a deadline and a liveness check, so a
kernel that dies mid-cell is noticed at once.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
STREAM_LIMIT = 1024 * 1024
OUTPUTS_LIMIT = 100
OUTPUT_BYTES_LIMIT = 16 * 1024 * 1024
# How often liveness is checked while no message arrives.
POLL_SECONDS = 0.1

_KEPT_MIMES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "application/json",
)


def strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


@dataclass
class CellRun:
    """What one execute gathered, filled in as messages arrive."""

    msg_id: str
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    status: str | None = None  # the reply's: ok | error | aborted
    error: dict[str, Any] | None = None
    user_expressions: dict[str, Any] = field(default_factory=dict)
    idle: bool = False
    truncated: bool = False
    _output_bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.idle and self.status is not None

    def _append_stream(self, name: str, text: str) -> None:
        current = self.stdout if name == "stdout" else self.stderr
        room = STREAM_LIMIT - len(current)
        if room <= 0:
            self.truncated = True
            return
        if len(text) > room:
            text = text[:room] + "\n[output truncated]\n"
            self.truncated = True
        if name == "stdout":
            self.stdout += text
        else:
            self.stderr += text

    def _append_output(self, kind: str, content: dict[str, Any]) -> None:
        data = {k: v for k, v in content.get("data", {}).items() if k in _KEPT_MIMES}
        size = sum(len(v) if isinstance(v, str) else 256 for v in data.values())
        if len(self.outputs) >= OUTPUTS_LIMIT or self._output_bytes + size > OUTPUT_BYTES_LIMIT:
            self.truncated = True
            return
        self._output_bytes += size
        item: dict[str, Any] = {"type": kind, "data": data}
        if content.get("metadata"):
            item["metadata"] = content["metadata"]
        self.outputs.append(item)

    def handle_iopub(self, msg: dict[str, Any]) -> None:
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "stream":
            self._append_stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("display_data", "update_display_data"):
            self._append_output("display_data", content)
        elif kind == "execute_result":
            self.execution_count = content.get("execution_count", self.execution_count)
            self._append_output("execute_result", content)
        elif kind == "error":
            self.error = {
                "ename": content.get("ename", ""),
                "evalue": content.get("evalue", ""),
                "traceback": strip_ansi("\n".join(content.get("traceback", []))),
            }
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count", self.execution_count)
        elif kind == "clear_output":
            self.outputs.clear()
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    def handle_reply(self, msg: dict[str, Any]) -> None:
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        content = msg["content"]
        self.status = content.get("status", "error")
        self.execution_count = content.get("execution_count", self.execution_count)
        self.user_expressions = content.get("user_expressions") or {}
        if self.status == "error" and self.error is None:
            self.error = {
                "ename": content.get("ename", ""),
                "evalue": content.get("evalue", ""),
                "traceback": strip_ansi("\n".join(content.get("traceback", []))),
            }


def send(
    kc: AsyncKernelClient,
    code: str,
    *,
    silent: bool = False,
    user_expressions: dict[str, str] | None = None,
) -> CellRun:
    msg_id = kc.execute(
        code,
        silent=silent,
        store_history=not silent,
        user_expressions=user_expressions or {},
        allow_stdin=False,
        stop_on_error=False,
    )
    return CellRun(msg_id)


async def gather(
    kc: AsyncKernelClient,
    run: CellRun,
    *,
    deadline: float,
    is_alive: Callable[[], Awaitable[bool]],
) -> str:
    """Read messages for ``run`` until it completes, the deadline passes or the kernel dies.

    Returns ``"done"``, ``"deadline"`` or ``"dead"``. Can be called again on
    the same run (after an interrupt) to keep gathering.
    """
    while not run.complete:
        now = time.monotonic()
        if now >= deadline:
            return "deadline"
        timeout = min(POLL_SECONDS, deadline - now)
        got = await _next_message(kc, run, timeout)
        if not got and not await is_alive():
            # Drain what the kernel managed to send before dying.
            while await _next_message(kc, run, 0.01):
                pass
            return "dead"
    return "done"


async def _next_message(kc: AsyncKernelClient, run: CellRun, timeout: float) -> bool:
    """Handle one pending message (reply first); False when none came within ``timeout``."""
    if await _take_reply(kc, run):
        return True
    try:
        run.handle_iopub(await kc.get_iopub_msg(timeout=timeout))
        return True
    except queue.Empty:
        pass
    # The reply may have landed while we waited on iopub.
    return await _take_reply(kc, run)


async def _take_reply(kc: AsyncKernelClient, run: CellRun) -> bool:
    """Handle the shell reply if it is already there (never waits)."""
    if run.status:
        return False
    try:
        run.handle_reply(await kc.get_shell_msg(timeout=0))
        return True
    except queue.Empty:
        return False


async def drain(kc: AsyncKernelClient) -> None:
    """Drop stale messages left by an abandoned cell, so the next run starts clean."""
    for getter in (kc.get_iopub_msg, kc.get_shell_msg):
        while True:
            try:
                await getter(timeout=0)
            except (TimeoutError, queue.Empty):
                break
