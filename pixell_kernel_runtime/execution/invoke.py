"""One call of an agent in its session: how this agent kind runs, and the answer's shape.

The session manager finds or creates the session and gives the call its turn; here the call
runs (a code cell, or a handler in two interruptible cells), its fate is read (done, timeout,
timeout with a restart, kernel death) and shaped into the contract's answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.agents import Agent
from pixell_kernel_runtime.execution import answers
from pixell_kernel_runtime.execution.bootstrap import (
    AWAIT_HANDLER_CELL,
    COLLECT_EXPRESSION,
    HANDLER_EXPRESSIONS,
    handler_cell,
)
from pixell_kernel_runtime.execution.runner import CellRun
from pixell_kernel_runtime.packages.manifest import CODE_EXECUTOR
from pixell_kernel_runtime.sessions.kernel import KernelStartError, SessionKernel
from pixell_kernel_runtime.sessions.manager import SessionManager
from pixell_kernel_runtime.sessions.session import closed_error, new_generation, unless_closed


@dataclass(frozen=True)
class InvokeRequest:
    """A validated call (api/invoke_request.py builds it from the body)."""

    input: dict[str, Any]
    session_id: str
    timeout: float
    code: str | None  # the cell, for code executors
    resource_tier: int | None


async def invoke(
    sessions: SessionManager,
    agent: Agent,
    request: InvokeRequest,
    *,
    trace_id: str,
    tenant: str,
) -> dict[str, Any]:
    kind = agent.export.kind
    timeout = request.timeout
    with sessions.tenant_slot(tenant):
        started = time.perf_counter()
        session = await sessions.session_for(
            agent.package, request.session_id, request.resource_tier, tenant
        )
        async with sessions.turn(session):
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
                            request.code, timeout=timeout, user_expressions=COLLECT_EXPRESSION
                        )
                    else:
                        run, outcome = await _call_handler(kernel, agent, request.input, timeout)
            except KernelStartError as exc:
                await sessions.restart_failed(
                    session,
                    exc,
                    f"the call ran past its {timeout:g}s timeout and ignored the interrupt, "
                    "and restarting the kernel failed",
                )
            if session.closed and outcome != "done":
                raise closed_error(session, "ran")
            exit_ = kernel.exit
            if outcome == "dead":
                await sessions.kernel_ended(session, cause="died")
            elif outcome == "timeout_restarted":
                session.restarts += 1
                metrics.KERNEL_DEATHS.labels("timeout").inc()
                new_generation(
                    session,
                    f"the previous call ran past its {timeout:g}s timeout and ignored the "
                    "interrupt, so the kernel was restarted",
                )
    duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
    fate = answers.Fate(outcome=outcome, timeout=timeout, exit=exit_, restarted_note=note)
    if kind == CODE_EXECUTOR:
        output = answers.code_output(run, fate, request.session_id, duration_ms)
        status = output["status"]
        meta: dict[str, Any] = {}
    else:
        output, meta = answers.handler_output(run, fate)
        status = "error" if meta.get("error") else "success"
    metrics.INVOCATIONS.labels(kind, status).inc()
    metrics.INVOKE_DURATION.labels(kind).observe(duration_ms / 1000.0)
    return {
        "agent_id": agent.id,
        "output": output,
        "duration_ms": duration_ms,
        "trace_id": trace_id,
        "metadata": {
            "session_id": request.session_id,
            "session": session.key,
            "kind": kind,
            "execution_count": run.execution_count,
            "session_restarted": note is not None,
            **({"restart_reason": note} if note else {}),
            **meta,
        },
    }


async def _call_handler(
    kernel: SessionKernel, agent: Agent, input_: dict[str, Any], timeout: float
) -> tuple[CellRun, str]:
    """Call the handler (an interruptible cell); await its value in a second cell if it
    returned an awaitable. Both share the one timeout."""
    deadline = time.monotonic() + timeout
    cell = handler_cell(agent.export.module, agent.export.function, input_)
    first, outcome = await kernel.execute(
        cell, timeout=timeout, silent=True, user_expressions=HANDLER_EXPRESSIONS
    )
    if outcome != "done" or not answers.handler_pending(first):
        return first, outcome
    run, outcome = await kernel.execute(
        AWAIT_HANDLER_CELL,
        timeout=max(0.001, deadline - time.monotonic()),
        silent=True,
        user_expressions=COLLECT_EXPRESSION,
    )
    run.prepend(first)
    return run, outcome
