"""Execute one cell and turn its Jupyter messages into a bounded result.

The runner only talks messages: it sends an ``execute_request`` and gathers
what the kernel publishes for it (streams, display data, the execute result,
errors) until the kernel is idle again and the reply has arrived. It never
waits blindly: every wait is bounded by a deadline and a liveness check, so a
kernel that dies mid-cell is noticed at once.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

from pixell_kernel_runtime.execution import wire

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# What one execution keeps, all in one place (the answer's ``truncation.limits`` says them).
STREAM_LIMIT = 1024 * 1024  # characters of each stream (stdout, stderr)
OUTPUTS_LIMIT = 100  # rich outputs (display data, execute results)
OUTPUT_BYTES_LIMIT = 16 * 1024 * 1024  # their whole messages' wire size: data, metadata, all
OUTPUT_VALUES_LIMIT = 1_000_000  # JSON values in them (what parsing made of them costs memory)
ERROR_TEXT_LIMIT = 64 * 1024  # characters of an error's name and value; traceback: STREAM_LIMIT
# Short answers of user_expressions kept as text (``True`` / ``False``); the rest are dropped.
SHORT_TEXT = 64
# How many dropped messages the answer lists one by one (all are counted).
LISTED_DROPS = 10
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


@dataclass(frozen=True)
class OutputCaps:
    """What one execution keeps (the operator's OUTPUT_* settings; defaults above)."""

    stream_chars: int = STREAM_LIMIT
    outputs: int = OUTPUTS_LIMIT
    output_bytes: int = OUTPUT_BYTES_LIMIT
    output_values: int = OUTPUT_VALUES_LIMIT


DEFAULT_CAPS = OutputCaps()


def limits(caps: OutputCaps = DEFAULT_CAPS) -> dict[str, int]:
    return {
        "stream_chars": caps.stream_chars,
        "outputs": caps.outputs,
        "output_bytes": caps.output_bytes,
        "output_values": caps.output_values,
        "message_bytes": wire.MESSAGE_LIMIT,
        "message_values": wire.MESSAGE_VALUES_LIMIT,
    }


def _measure(msg: dict[str, Any]) -> tuple[int, int]:
    """A message's wire size and JSON value count (``wire`` attaches both to what it reads)."""
    size = msg.get("wire_bytes")
    if isinstance(size, int):
        values = msg.get("wire_values")
        return size, values if isinstance(values, int) else 0
    # A client that is not wire's: measure what it parsed (costs one serialisation).
    text = json.dumps(msg.get("content"), default=str).encode()
    return len(text), wire.count_values([text])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _expressions(raw: Any) -> dict[str, dict[str, Any]]:
    """What the runtime reads of user_expressions: each one's status, its application/json,
    and its text/plain only when short (``True``); nothing else is kept."""
    kept: dict[str, dict[str, Any]] = {}
    if not isinstance(raw, dict):
        return kept
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        data = entry.get("data")
        data = data if isinstance(data, dict) else {}
        out: dict[str, Any] = {}
        if "application/json" in data:
            out["application/json"] = data["application/json"]
        text = data.get("text/plain")
        if isinstance(text, str) and len(text) <= SHORT_TEXT:
            out["text/plain"] = text
        kept[str(name)] = {"status": entry.get("status"), "data": out}
    return kept


@dataclass
class _Text:
    chars_seen: int = 0
    chars_kept: int = 0
    bytes_seen: int = 0


@dataclass
class _Outputs:
    count_seen: int = 0
    count_kept: int = 0
    bytes_seen: int = 0
    bytes_kept: int = 0
    values_seen: int = 0
    values_kept: int = 0


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
    # The kernel is inside the cell's handler, where SIGINT raises: it published something for
    # the cell other than its status (execute_input comes first).
    started: bool = False
    truncated: bool = False
    # Told each piece of output as it is kept (after the caps): an execution record's emit.
    listener: Callable[[str, dict[str, Any]], Any] | None = None
    caps: OutputCaps = DEFAULT_CAPS
    _streams: dict[str, _Text] = field(
        default_factory=lambda: {"stdout": _Text(), "stderr": _Text(), "exception": _Text()}
    )
    _outputs: _Outputs = field(default_factory=_Outputs)
    _dropped: list[dict[str, Any]] = field(default_factory=list)
    _dropped_count: int = 0
    _dropped_bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.idle and self.status is not None

    @property
    def reacted(self) -> bool:
        """The kernel answered an interrupt: an error, the reply or idle."""
        return self.error is not None or self.status is not None or self.idle

    @property
    def output_bytes(self) -> int:
        """What the kernel sent as output (streams, rich outputs, errors): wire bytes seen."""
        streams = sum(t.bytes_seen for t in self._streams.values())
        return streams + self._outputs.bytes_seen

    def truncation(self) -> dict[str, Any]:
        """What was seen against what was kept, for the answer (``truncated`` says if any)."""
        return {
            **{name: asdict(tally) for name, tally in self._streams.items()},
            "outputs": asdict(self._outputs),
            "dropped": {
                "count": self._dropped_count,
                "bytes": self._dropped_bytes,
                "messages": list(self._dropped),
            },
            "limits": limits(self.caps),
        }

    def prepend(self, first: CellRun) -> None:
        """Put an earlier run of the same call (a handler's phase one) before this one."""
        self.stdout = first.stdout + self.stdout
        self.stderr = first.stderr + self.stderr
        self.outputs[:0] = first.outputs
        self.truncated = self.truncated or first.truncated
        pairs = [(t, first._streams[name]) for name, t in self._streams.items()]
        for mine, theirs in [*pairs, (self._outputs, first._outputs)]:
            for key, value in asdict(theirs).items():
                setattr(mine, key, getattr(mine, key) + value)
        self._dropped[:0] = first._dropped
        del self._dropped[LISTED_DROPS:]
        self._dropped_count += first._dropped_count
        self._dropped_bytes += first._dropped_bytes

    def _drop(self, msg: dict[str, Any], size: int) -> None:
        """A message the wire layer refused to parse: counted, listed, marked."""
        self.truncated = True
        self._dropped_count += 1
        self._dropped_bytes += size
        dropped = {"msg_type": msg.get("msg_type", ""), "bytes": size, "reason": msg["dropped"]}
        if len(self._dropped) < LISTED_DROPS:
            self._dropped.append(dropped)
        if self.listener is not None:
            self.listener("status", {"truncated": True, "dropped": dropped})

    def _append_stream(self, name: str, text: str, size: int) -> None:
        tally = self._streams[name]
        tally.chars_seen += len(text)
        tally.bytes_seen += size
        current = self.stdout if name == "stdout" else self.stderr
        room = self.caps.stream_chars - len(current)
        if room <= 0:
            if text:
                self.truncated = True
            return
        if len(text) > room:
            text = text[:room] + "\n[output truncated]\n"
            self.truncated = True
            tally.chars_kept += room
        else:
            tally.chars_kept += len(text)
        if name == "stdout":
            self.stdout += text
        else:
            self.stderr += text
        if self.listener is not None and text:
            self.listener(name, {"text": text})

    def _append_output(self, kind: str, content: dict[str, Any], size: int, values: int) -> None:
        tally = self._outputs
        tally.count_seen += 1
        tally.bytes_seen += size
        tally.values_seen += values
        if (
            tally.count_kept >= self.caps.outputs
            or tally.bytes_kept + size > self.caps.output_bytes
            or tally.values_kept + values > self.caps.output_values
        ):
            self.truncated = True
            return
        raw = content.get("data")
        data = {k: v for k, v in raw.items() if k in _KEPT_MIMES} if isinstance(raw, dict) else {}
        item: dict[str, Any] = {"type": kind, "data": data}
        metadata = content.get("metadata")
        if metadata and isinstance(metadata, dict):
            item["metadata"] = metadata
        self.outputs.append(item)
        if self.listener is not None:
            if kind == "execute_result":
                self.listener("result", {**item, "execution_count": self.execution_count})
            else:
                self.listener("display", item)
        tally.count_kept += 1
        tally.bytes_kept += size
        tally.values_kept += values

    def _clip(self, text: str, limit: int) -> str:
        tally = self._streams["exception"]
        tally.chars_seen += len(text)
        tally.chars_kept += min(len(text), limit)
        if len(text) > limit:
            self.truncated = True
            text = text[:limit] + "\n[truncated]"
        return text

    def _error_from(self, content: dict[str, Any]) -> dict[str, Any]:
        traceback = content.get("traceback")
        lines = [t for t in traceback if isinstance(t, str)] if isinstance(traceback, list) else []
        return {
            "ename": self._clip(_text(content.get("ename")), ERROR_TEXT_LIMIT),
            "evalue": self._clip(_text(content.get("evalue")), ERROR_TEXT_LIMIT),
            "traceback": self._clip(strip_ansi("\n".join(lines)), self.caps.stream_chars),
        }

    def handle_iopub(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header")
        if not isinstance(parent, dict) or parent.get("msg_id") != self.msg_id:
            return
        # The kernel manager's Session is a clone of the client's with its own counter, so its
        # interrupt_request can carry this execute's msg_id: its busy/idle are not the cell's.
        if parent.get("msg_type", "execute_request") != "execute_request":
            return
        kind = msg.get("msg_type") or (msg.get("header") or {}).get("msg_type")
        content = msg.get("content")
        content = content if isinstance(content, dict) else {}
        size, values = _measure(msg)
        if kind != "status":
            self.started = True
        if "dropped" in msg:
            self._drop(msg, size)
            if kind in ("display_data", "update_display_data", "execute_result"):
                self._outputs.count_seen += 1
                self._outputs.bytes_seen += size
            elif kind == "stream":
                # Which stream is unknown: its content was not read.
                self._streams["stdout"].bytes_seen += size
            elif kind == "error" and self.error is None:
                self.error = {
                    "ename": "ErrorTooLarge",
                    "evalue": f"the kernel's error message was dropped unread: {msg['dropped']}",
                    "traceback": "",
                }
            return
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            self._append_stream(name, _text(content.get("text")), size)
        elif kind in ("display_data", "update_display_data"):
            self._append_output("display_data", content, size, values)
        elif kind == "execute_result":
            self.execution_count = _count(content.get("execution_count")) or self.execution_count
            self._append_output("execute_result", content, size, values)
        elif kind == "error":
            self._streams["exception"].bytes_seen += size
            self.error = self._error_from(content)
            if self.listener is not None:
                self.listener("error", self.error)
        elif kind == "execute_input":
            self.execution_count = _count(content.get("execution_count")) or self.execution_count
        elif kind == "clear_output":
            # What is cleared no longer counts against the caps (its memory is gone).
            self.outputs.clear()
            self._outputs.count_kept = self._outputs.bytes_kept = self._outputs.values_kept = 0
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    def handle_reply(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header")
        if not isinstance(parent, dict) or parent.get("msg_id") != self.msg_id:
            return
        if "dropped" in msg:
            size, _ = _measure(msg)
            self._drop(msg, size)
            self.status = "error"
            self.error = {
                "ename": "ReplyTooLarge",
                "evalue": f"the kernel's reply was dropped unread: {msg['dropped']}",
                "traceback": "",
            }
            return
        content = msg.get("content")
        content = content if isinstance(content, dict) else {}
        status = content.get("status")
        self.status = status if status in ("ok", "error", "aborted") else "error"
        self.execution_count = _count(content.get("execution_count")) or self.execution_count
        self.user_expressions = _expressions(content.get("user_expressions"))
        if self.status == "error" and self.error is None:
            self.error = self._error_from(content)

    def interrupted_unanswered(self) -> None:
        """The kernel went idle without a reply: an interrupt landed in ipykernel's or IPython's
        own code around the cell (it catches the KeyboardInterrupt and sends nothing). The
        kernel and its state are fine; the cell counts as interrupted."""
        self.status = "error"
        if self.error is None:
            self.error = {
                "ename": "KeyboardInterrupt",
                "evalue": "interrupted outside the cell's code: the kernel sent no reply",
                "traceback": "",
            }


def send(
    kc: AsyncKernelClient,
    code: str,
    *,
    silent: bool = False,
    user_expressions: dict[str, str] | None = None,
    listener: Callable[[str, dict[str, Any]], Any] | None = None,
    caps: OutputCaps = DEFAULT_CAPS,
) -> CellRun:
    msg_id = kc.execute(
        code,
        silent=silent,
        store_history=not silent,
        user_expressions=user_expressions or {},
        allow_stdin=False,
        stop_on_error=False,
    )
    return CellRun(msg_id, listener=listener, caps=caps)


async def gather(
    kc: AsyncKernelClient,
    run: CellRun,
    *,
    deadline: float,
    is_alive: Callable[[], Awaitable[bool]],
    stop: Callable[[], bool] | None = None,
) -> str:
    """Read messages for ``run`` until it completes, the deadline passes, ``stop()`` says so
    (a cancel: seen within ``POLL_SECONDS``) or the kernel dies.

    Returns ``"done"``, ``"deadline"``, ``"stopped"`` or ``"dead"``. Can be called again on
    the same run (after an interrupt) to keep gathering.
    """
    while not run.complete:
        now = time.monotonic()
        if now >= deadline:
            return "deadline"
        if stop is not None and stop():
            return "stopped"
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
        # The channel's own get_msg: kc.get_iopub_msg only wraps it (ensure_async) again.
        run.handle_iopub(await kc.iopub_channel.get_msg(timeout=timeout))
        return True
    except queue.Empty:
        pass
    # The reply may have landed while we waited on iopub.
    return await _take_reply(kc, run)


def _queued(channel: Any) -> bool:
    """Whether a message may be there, asked without a coroutine (the reply is looked for
    before and after every iopub wait: mostly not there yet)."""
    queued = getattr(channel, "queued", None)
    return queued is None or queued()


async def _take_reply(kc: AsyncKernelClient, run: CellRun) -> bool:
    """Handle the shell reply if it is already there (never waits)."""
    if run.status or not _queued(kc.shell_channel):
        return False
    try:
        run.handle_reply(await kc.shell_channel.get_msg(timeout=0))
        return True
    except queue.Empty:
        return False


async def drain(kc: AsyncKernelClient) -> None:
    """Drop stale messages left by an abandoned cell, so the next run starts clean."""
    for getter in (kc.iopub_channel.get_msg, kc.shell_channel.get_msg):
        while True:
            try:
                await getter(timeout=0)
            except (TimeoutError, queue.Empty):
                break
