"""Notebook cells from one channels websocket: the session's FIFO turns and execution records.

Shell messages of one connection reach the kernel in the order they were sent. An
``execute_request`` first waits for the session's turn (behind REST calls and other clients'
cells, within the queue bound), holds it until its ``execute_reply`` and its iopub ``idle`` have
arrived (or the kernel died, or the session closed), and is an ``Execution`` of kind
``notebook`` meanwhile, fed with the kernel's messages as they pass through to the client.

The kernel takes one cell at a time from here, so ipykernel's ``stop_on_error`` (abort what was
queued behind a failed cell) is done here: cells queued behind a failed one are answered
``aborted``, as the kernel would answer them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from jupyter_client.session import Session as JupyterSession

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.errors import RuntimeAPIError, ServiceUnavailable, TooManyRequests
from pixell_kernel_runtime.execution import record
from pixell_kernel_runtime.execution.record import Execution
from pixell_kernel_runtime.execution.runner import CellRun
from pixell_kernel_runtime.jupyter import protocol
from pixell_kernel_runtime.sessions.kernel import INTERRUPT_GRACE, KernelStartError, SessionKernel
from pixell_kernel_runtime.sessions.session import Session, new_generation

log = logging.getLogger(__name__)

# How often a running cell checks that its kernel lives while no message comes.
POLL_SECONDS = 0.1
# The reply and the idle status leave the kernel back to back: once one is here, the other
# may lag this long (one lost past a queue's bound must not hold the session's turn forever).
LAG_SECONDS = 2.0
# Client messages one connection may have waiting for the shell (a flood past it is refused).
MAX_QUEUED = 1000
_INTERRUPTS: set[asyncio.Task[None]] = set()


class Connection(Protocol):
    """What the cells need of their websocket connection (channels.ChannelsHandler)."""

    runtime: Any
    session: Session
    subject: str
    bound: asyncio.Event

    @property
    def jsession(self) -> JupyterSession: ...

    async def bind(self) -> None: ...

    def unbind(self) -> None: ...

    def send_to_kernel(self, channel: str, msg: dict[str, Any]) -> bool: ...

    def send_synthetic(self, messages: list[tuple[str, dict[str, Any]]]) -> None: ...


@dataclass
class _Cell:
    msg_id: str
    run: CellRun
    kernel: SessionKernel
    # The kernel asked this connection's client for input and has no answer yet.
    awaiting_input: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # When the reply or the idle status (whichever first) arrived.
    first_end: float | None = None


class CellQueue:
    """The shell pipeline of one connection (see the module's doc)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._items: deque[dict[str, Any]] = deque()
        self._more = asyncio.Event()
        self.current: _Cell | None = None
        # The cell between its arrival at the head of the line and its sending to the kernel
        # (waiting for its turn, or starting the kernel in it), and the cells that run.
        self._waiting: asyncio.Task[None] | None = None
        self._in_turn = False
        self._running: set[asyncio.Task[None]] = set()
        self._aborting = False
        self._closing = False
        self._sender = asyncio.create_task(self._send_loop())

    @property
    def running(self) -> bool:
        return self.current is not None

    def put(self, msg: dict[str, Any]) -> None:
        if len(self._items) >= MAX_QUEUED:
            log.warning("session %s: a connection's shell queue is full", self.conn.session.key)
            if msg["msg_type"] == "execute_request":
                why = f"more than {MAX_QUEUED} messages are waiting on this connection"
                self.conn.send_synthetic(
                    protocol.refused_cell(self.conn.jsession, msg, "QueueFull", why)
                )
            return
        self._items.append(msg)
        self._more.set()

    def close(self) -> list[asyncio.Task[None]]:
        """The websocket closed: what was not sent yet never reaches the kernel; a cell that
        runs keeps its turn until it ends. Returns the tasks to wait for."""
        self._closing = True
        self._sender.cancel()
        cell = self.current
        if cell is not None and cell.awaiting_input:
            # No one is left to answer its input(): interrupted, the cell ends and its turn too.
            task = asyncio.create_task(_interrupt(cell.kernel, self.conn.session.key))
            _INTERRUPTS.add(task)
            task.add_done_callback(_INTERRUPTS.discard)
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            if self._in_turn:
                self._running.add(waiting)  # it sees _closing before it sends anything
            else:
                waiting.cancel()  # still in the queue: it leaves it
        return list(self._running)

    def feed(self, channel: str, msg: dict[str, Any]) -> None:
        """Every kernel message the connection reads: the running cell's go to its record."""
        cell = self.current
        parent = msg.get("parent_header")
        if cell is None or not isinstance(parent, dict) or parent.get("msg_id") != cell.msg_id:
            return
        if channel == "stdin":
            cell.awaiting_input = msg.get("msg_type") == "input_request"
            return
        if channel == "iopub":
            cell.run.handle_iopub(msg)
        elif channel == "shell":
            cell.run.handle_reply(msg)
        else:
            return
        if cell.first_end is None and (cell.run.idle or cell.run.status is not None):
            cell.first_end = time.monotonic()
        cell.changed.set()

    def input_answered(self) -> None:
        if self.current is not None:
            self.current.awaiting_input = False

    # ---- the pipeline ------------------------------------------------------------------------

    def _cells_behind(self) -> bool:
        waiting = self._waiting is not None and not self._waiting.done()
        return waiting or any(m["msg_type"] == "execute_request" for m in self._items)

    async def _send_loop(self) -> None:
        while True:
            if not self._items:
                # Everything queued behind a failed cell has been answered.
                self._aborting = False
                self._more.clear()
                await self._more.wait()
                continue
            msg = self._items.popleft()
            await self.conn.bound.wait()
            if msg["msg_type"] != "execute_request":
                self.conn.send_to_kernel("shell", msg)
                continue
            sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._in_turn = False
            self._waiting = asyncio.create_task(self._cell(msg, sent))
            await sent
            self._waiting = None

    async def _cell(self, msg: dict[str, Any], sent: asyncio.Future[None]) -> None:
        conn, sessions = self.conn, self.conn.runtime.sessions
        try:
            try:
                place = sessions.reserve_turn(conn.session)
            except TooManyRequests as exc:
                refusal = protocol.refused_cell(conn.jsession, msg, "SessionBusy", exc.message)
                conn.send_synthetic(refusal)
                return
            async with sessions.turn(conn.session, place=place):
                self._in_turn = True
                if self._closing:
                    return
                if self._aborting:
                    conn.send_synthetic(protocol.aborted_cell(conn.jsession, msg))
                    return
                await sessions.ensure_kernel(conn.session)
                await conn.bind()
                if not self._closing:
                    await self._execute(msg, sent)
        except RuntimeAPIError as exc:
            if not sent.done():  # it never reached the kernel: its cell ends with why
                refusal = protocol.refused_cell(conn.jsession, msg, exc.kind, exc.message)
                conn.send_synthetic(refusal)
            else:
                log.info("session %s: a notebook cell ended: %s", conn.session.key, exc.message)
        except Exception:  # noqa: BLE001 - one cell's failure must not end the connection
            log.exception("session %s: a notebook cell failed", conn.session.key)
            if not sent.done():
                why = "the server failed to run this cell; see its log"
                conn.send_synthetic(protocol.refused_cell(conn.jsession, msg, "InternalError", why))
        finally:
            if not sent.done():
                sent.set_result(None)

    async def _execute(self, msg: dict[str, Any], sent: asyncio.Future[None]) -> None:
        conn, session = self.conn, self.conn.session
        kernel = session.kernel
        assert kernel is not None
        content = msg["content"]
        code = content.get("code")
        execution = conn.runtime.executions.create(
            agent_id=None,
            session_key=session.key,
            session_id=session.session_id,
            tenant=session.tenant,
            subject=conn.subject,
            kind="notebook",
            code=code if isinstance(code, str) else "",
            silent=bool(content.get("silent")),
        )
        run = CellRun(msg["msg_id"], listener=execution.emit, caps=kernel.caps)
        cell = _Cell(msg["msg_id"], run, kernel)
        task = asyncio.current_task()
        assert task is not None
        try:
            with record.finishing(execution):
                execution.start()
                session.executions += 1
                session.ran_on = session.generation
                execution.canceller = kernel.interrupt
                self.current = cell
                self._running.add(task)
                if not conn.send_to_kernel("shell", msg):
                    raise ServiceUnavailable(
                        "the kernel takes no more messages (it does not read them)",
                        code="kernel_not_reading",
                    )
                sent.set_result(None)
                outcome = await self._wait(cell, kernel, execution)
                if outcome == "dead":
                    conn.unbind()  # before a new kernel binds the same socket paths
                    if session.kernel is kernel:
                        await conn.runtime.sessions.kernel_ended(session, cause="died")
                elif outcome == "stopped":
                    await self._restart(kernel)
                execution.execution_count = run.execution_count
                stop = content.get("stop_on_error", True) and not content.get("silent")
                if run.status != "ok" and stop and self._cells_behind():
                    self._aborting = True
                execution.output_bytes = run.output_bytes
                execution.finish(_state(outcome, run, execution), _answer(outcome, run, kernel))
        finally:
            if self.current is cell:
                self.current = None
            self._running.discard(task)

    async def _wait(self, cell: _Cell, kernel: SessionKernel, execution: Execution) -> str:
        """done, dead, closed (the session was deleted) or stopped (cancelled, and the
        interrupt was ignored past the grace)."""
        cancelled_at: float | None = None
        while True:
            now = time.monotonic()
            lagging = cell.first_end is not None and now - cell.first_end > LAG_SECONDS
            if cell.run.complete or lagging:
                return "done"
            if self.conn.session.closed:
                return "closed"
            if execution.cancel_requested:
                cancelled_at = cancelled_at or now
                if now - cancelled_at > INTERRUPT_GRACE:
                    return "stopped"
            cell.changed.clear()
            try:
                await asyncio.wait_for(cell.changed.wait(), POLL_SECONDS)
            except TimeoutError:
                if not await kernel.is_alive():
                    return "dead"

    async def _restart(self, kernel: SessionKernel) -> None:
        """A cancelled cell that ignored its interrupt: a fresh kernel, as a timeout does."""
        session, sessions = self.conn.session, self.conn.runtime.sessions
        try:
            await kernel.restart()
        except KernelStartError as exc:
            await sessions.restart_failed(
                session,
                exc,
                "a notebook cell was cancelled and ignored the interrupt, and restarting the "
                "kernel failed",
            )
        session.restarts += 1
        metrics.KERNEL_DEATHS.labels("cancelled").inc()
        new_generation(
            session,
            "a notebook cell was cancelled and ignored the interrupt, so the kernel was restarted",
        )


async def _interrupt(kernel: SessionKernel, key: str) -> None:
    try:
        await kernel.interrupt()
    except Exception:  # noqa: BLE001 - a kernel that cannot be interrupted is dying anyway
        log.warning("session %s: interrupting a cell left waiting for input failed", key)


def _state(outcome: str, run: CellRun, execution: Execution) -> str:
    if execution.cancel_requested:
        return record.CANCELLED
    if outcome == "dead":
        return record.KERNEL_DIED
    return record.DONE if outcome == "done" and run.status == "ok" else record.ERROR


def _answer(outcome: str, run: CellRun, kernel: SessionKernel) -> dict[str, Any]:
    exception = run.error
    if outcome == "dead":
        why = kernel.exit.describe() if kernel.exit else "the kernel died"
        exception = {"ename": "KernelDied", "evalue": why, "traceback": ""}
    elif outcome == "closed":
        exception = {"ename": "SessionClosed", "evalue": "the session was closed", "traceback": ""}
    elif outcome == "stopped":
        evalue = "cancelled; the cell ignored the interrupt, so the kernel was restarted"
        exception = {"ename": "Cancelled", "evalue": evalue, "traceback": ""}
    return {
        "status": "ok" if outcome == "done" and run.status == "ok" else "error",
        "execution_count": run.execution_count,
        "stdout": run.stdout,
        "stderr": run.stderr,
        "outputs": run.outputs,
        "exception": exception,
    }
