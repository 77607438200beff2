"""One call of an agent in its session, as an execution record: how this agent kind runs.

``Executor.start`` does what must answer the HTTP request itself (the tenant's slot, the
session, a place in its queue: 429/503 are answers, not records), then runs the call in a task
of its own: a client that disconnects does not cancel it. The call writes everything into its
``Execution`` (the event log as the kernel produces it, the final answer); plain invoke, SSE and
websocket streams all read it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.agents import Agent
from pixell_kernel_runtime.execution import answers, record
from pixell_kernel_runtime.execution.bootstrap import (
    AWAIT_HANDLER_CELL,
    COLLECT_EXPRESSION,
    HANDLER_EXPRESSIONS,
    handler_cell,
)
from pixell_kernel_runtime.execution.record import Execution, ExecutionStore
from pixell_kernel_runtime.execution.runner import CellRun
from pixell_kernel_runtime.packages.manifest import CODE_EXECUTOR
from pixell_kernel_runtime.sessions.kernel import KernelStartError, SessionKernel
from pixell_kernel_runtime.sessions.manager import SessionManager
from pixell_kernel_runtime.sessions.session import (
    Session,
    closed_error,
    new_generation,
    unless_closed,
)

log = logging.getLogger(__name__)

# An outcome of kernel.execute -> the execution's final state (when the kernel said ok).
_STATES = {
    "timeout": record.TIMEOUT,
    "timeout_restarted": record.TIMEOUT,
    "cancelled": record.CANCELLED,
    "cancelled_restarted": record.CANCELLED,
    "dead": record.KERNEL_DIED,
}


@dataclass(frozen=True)
class InvokeRequest:
    """A validated call (api/invoke_request.py builds it from the body)."""

    input: dict[str, Any]
    session_id: str
    timeout: float
    code: str | None  # the cell, for code executors
    resource_tier: int | None


class Executor:
    """Starts calls as execution records and owns their tasks until they end."""

    def __init__(self, sessions: SessionManager, store: ExecutionStore) -> None:
        self.sessions = sessions
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        agent: Agent,
        request: InvokeRequest,
        *,
        trace_id: str,
        tenant: str,
        subject: str,
    ) -> Execution:
        """The call's record, once it has a place in its session's queue (it then runs on)."""
        held = contextlib.ExitStack()
        held.enter_context(self.sessions.tenant_slot(tenant))
        try:
            session = await self.sessions.session_for(
                agent.package, request.session_id, request.resource_tier, tenant
            )
            place = held.callback(self.sessions.reserve_turn(session))
        except BaseException:
            held.close()
            raise
        kind = agent.export.kind
        execution = self.store.create(
            agent_id=agent.id,
            session_key=session.key,
            session_id=request.session_id,
            tenant=tenant,
            subject=subject,
            kind=kind,
            code=request.code,
            input=None if kind == CODE_EXECUTOR else request.input,
        )
        execution.emit("status", {"state": record.QUEUED, "execution_id": execution.id})
        task = asyncio.create_task(
            self._run(execution, session, agent, request, trace_id, held, place)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Whatever happens to the task (even a cancel before its first step), its slot and
        # queue place are given back.
        task.add_done_callback(lambda _: held.close())

        async def cancel() -> None:
            # Queued: it leaves the queue at once. Running: the call sees cancel_requested
            # within a poll, interrupts, and restarts past the grace (as a timeout does).
            if execution.state == record.QUEUED:
                task.cancel()

        execution.canceller = cancel
        await asyncio.sleep(0)  # the task now waits in the queue: a cancel reaches its body
        return execution

    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float, force: asyncio.Event) -> None:
        """Shutdown: wait up to ``grace`` seconds for running calls to end (unless ``force``)."""
        if not self._tasks or force.is_set():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        forced = asyncio.ensure_future(force.wait())
        try:
            while self._tasks and not force.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait(
                    [*self._tasks, forced], timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            forced.cancel()

    async def stop(self) -> None:
        """Server shutdown: calls still running end as cancelled."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(
        self,
        execution: Execution,
        session: Session,
        agent: Agent,
        request: InvokeRequest,
        trace_id: str,
        held: contextlib.ExitStack,
        place: Callable[[], None],
    ) -> None:
        with held:
            try:
                with record.finishing(execution):
                    await _call(self.sessions, execution, session, agent, request, trace_id, place)
            except asyncio.CancelledError:
                if not execution.cancel_requested:
                    raise
            except Exception as exc:  # noqa: BLE001 - the record says it; plain invoke re-raises
                if not isinstance(exc, record.ANSWERED):
                    log.exception("execution %s failed", execution.id)


async def _call(
    sessions: SessionManager,
    execution: Execution,
    session: Session,
    agent: Agent,
    request: InvokeRequest,
    trace_id: str,
    place: Callable[[], None],
) -> None:
    kind = agent.export.kind
    timeout = request.timeout
    started = time.perf_counter()
    note: str | None = None
    exit_ = None
    run = CellRun("")
    try:
        async with sessions.turn(session, place=place):
            execution.start()
            kernel = await sessions.ensure_kernel(session)
            # Not the kernel the previous call ran on (whatever replaced it): say so.
            restarted = session.ran_on not in (0, session.generation)
            note = (session.restart_reason or "the kernel was restarted") if restarted else None
            session.ran_on = session.generation
            session.executions += 1
            try:
                with unless_closed(session, "ran"):
                    if kind == CODE_EXECUTOR:
                        assert request.code is not None
                        run, outcome = await kernel.execute(
                            request.code,
                            timeout=timeout,
                            user_expressions=COLLECT_EXPRESSION,
                            listener=execution.emit,
                            stop=lambda: execution.cancel_requested,
                        )
                    else:
                        run, outcome = await _call_handler(kernel, agent, execution, request)
            except KernelStartError as exc:
                await sessions.restart_failed(
                    session,
                    exc,
                    f"the call ran past its {timeout:g}s timeout (or was cancelled) and ignored "
                    "the interrupt, and restarting the kernel failed",
                )
            if session.closed and outcome != "done":
                raise closed_error(session, "ran")
            exit_ = kernel.exit
            if outcome == "dead":
                await sessions.kernel_ended(session, cause="died")
            elif outcome.endswith("_restarted"):
                why = "timeout" if outcome.startswith("timeout") else "cancelled"
                session.restarts += 1
                metrics.KERNEL_DEATHS.labels(why).inc()
                what = f"ran past its {timeout:g}s timeout" if why == "timeout" else "was cancelled"
                new_generation(
                    session,
                    f"the previous call {what} and ignored the interrupt, so the kernel was "
                    "restarted",
                )
    except asyncio.CancelledError:
        if not execution.cancel_requested:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        outcome = "cancelled"  # while it waited for its turn: nothing ran
    duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
    fate = answers.Fate(outcome=outcome, timeout=timeout, exit=exit_, restarted_note=note)
    if kind == CODE_EXECUTOR:
        output = answers.code_output(run, fate, request.session_id, duration_ms)
        failed = output["status"] != "success"
        meta: dict[str, Any] = {}
    else:
        output, meta = answers.handler_output(run, fate)
        failed = bool(meta.get("error"))
        if not failed:
            execution.emit("result", {"output": output})
    status = "error" if failed else "success"
    metrics.INVOCATIONS.labels(metrics.agent_label(agent.id), status).inc()
    metrics.INVOKE_DURATION.labels(kind).observe(duration_ms / 1000.0)
    execution.execution_count = run.execution_count
    execution.output_bytes = run.output_bytes
    state = _STATES.get(outcome) or (record.ERROR if failed else record.DONE)
    execution.finish(
        state,
        {
            "agent_id": agent.id,
            "output": output,
            "duration_ms": duration_ms,
            "trace_id": trace_id,
            "metadata": {
                "session_id": request.session_id,
                "session": session.key,
                "kind": kind,
                "execution_id": execution.id,
                "execution_count": run.execution_count,
                "session_restarted": note is not None,
                **({"restart_reason": note} if note else {}),
                **meta,
            },
        },
    )


async def _call_handler(
    kernel: SessionKernel, agent: Agent, execution: Execution, request: InvokeRequest
) -> tuple[CellRun, str]:
    """Call the handler (an interruptible cell); await its value in a second cell if it
    returned an awaitable. Both share the one timeout."""
    deadline = time.monotonic() + request.timeout
    cell = handler_cell(agent.export.module, agent.export.function, request.input)
    common: dict[str, Any] = {
        "silent": True,
        "listener": execution.emit,
        "stop": lambda: execution.cancel_requested,
    }
    first, outcome = await kernel.execute(
        cell, timeout=request.timeout, user_expressions=HANDLER_EXPRESSIONS, **common
    )
    if outcome != "done" or not answers.handler_pending(first):
        return first, outcome
    run, outcome = await kernel.execute(
        AWAIT_HANDLER_CELL,
        timeout=max(0.001, deadline - time.monotonic()),
        user_expressions=COLLECT_EXPRESSION,
        **common,
    )
    run.prepend(first)
    return run, outcome
