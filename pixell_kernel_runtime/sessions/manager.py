"""(package, session_id) -> one live kernel: create, look up, queue calls, cull, shut down.

Calls to one session run one at a time, in arrival order (an asyncio.Lock
wakes its waiters first-in first-out), behind a bounded queue; different
sessions run in parallel. Nothing here blocks the event loop: kernels are
driven through jupyter_client's async API, and file work goes to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.agents import Agent
from pixell_kernel_runtime.config import Settings
from pixell_kernel_runtime.errors import (
    NotFound,
    RuntimeAPIError,
    ServiceUnavailable,
    TooManyRequests,
    ValidationFailed,
)
from pixell_kernel_runtime.execution import answers
from pixell_kernel_runtime.execution.bootstrap import (
    AWAIT_HANDLER_CELL,
    COLLECT_EXPRESSION,
    HANDLER_EXPRESSIONS,
    VARIABLES_EXPRESSION,
    handler_cell,
)
from pixell_kernel_runtime.execution.runner import CellRun
from pixell_kernel_runtime.packages.manifest import CODE_EXECUTOR
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sandbox import Sandbox
from pixell_kernel_runtime.sandbox.core import SandboxSession
from pixell_kernel_runtime.sandbox.environment import kernel_environment
from pixell_kernel_runtime.sandbox.kernelspec import RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions import procinfo
from pixell_kernel_runtime.sessions.kernel import KernelStartError, SessionKernel

log = logging.getLogger(__name__)

_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._@:+=-]{1,128}$")
DEFAULT_SESSION = "default"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_key(package_id: str, session_id: str) -> str:
    return f"{package_id}:{session_id}"


@dataclass
class Session:
    key: str
    session_id: str
    package: InstalledPackage
    sandbox: SandboxSession
    # Fixed when the session is created (the first call's input.resource_tier, else the
    # manifest's); the operator's policy caps it in the sandbox.
    resource_tier: int | None = None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    executions: int = 0
    restarts: int = 0
    kernel: SessionKernel | None = None
    # Set when the kernel died or was restarted behind the caller's back; the
    # next answer says so, once.
    restarted_note: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    closed: bool = False

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.kernel is None:
            return "dead" if self.restarted_note else "not_started"
        return "busy" if self.busy else "idle"

    def summary(self) -> dict[str, Any]:
        pid = self.kernel.pid if self.kernel else None
        return {
            "id": self.key,
            "session_id": self.session_id,
            "package_id": self.package.id,
            "kernel_state": self.state(),
            "created": _iso(self.created),
            "last_used": _iso(self.last_used),
            "executions": self.executions,
            "restarts": self.restarts,
            "queued": self.waiting,
            "kernel_pid": pid,
            # For `pixell-kernel-runtime console` / `jupyter console --existing` on this host.
            "connection_file": self.sandbox.dirs.connection_file if self.kernel else None,
            "kernel_rss_bytes": procinfo.tree_rss(pid) if pid else None,
        }


class SessionManager:
    def __init__(self, settings: Settings, sandbox: Sandbox, run_dir: Path) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.run_dir = run_dir
        self.spec_manager: RuntimeKernelSpecManager | None = None
        self._sessions: dict[str, Session] = {}
        self._create_lock = asyncio.Lock()
        self._culler: asyncio.Task[None] | None = None
        self.created_total = 0
        # Calls that passed validation (what /runtime/info reports as total_invocations).
        self.invocations = 0

    # ---- lifecycle -----------------------------------------------------

    async def start(self) -> None:
        self.spec_manager = RuntimeKernelSpecManager(self.settings.kernels_dir)
        self.sandbox.kernel_spec = self.spec_manager.describe()
        self._culler = asyncio.create_task(self._cull_loop())

    async def stop(self) -> None:
        if self._culler is not None:
            self._culler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._culler
        results = await asyncio.gather(
            *(self._close(s) for s in list(self._sessions.values())), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("closing a session failed: %r", result)

    def counts(self) -> dict[str, int]:
        active = sum(1 for s in self._sessions.values() if s.kernel is not None)
        return {"total": len(self._sessions), "active": active, "created": self.created_total}

    # ---- look-up -------------------------------------------------------

    def list(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.created)

    def get(self, key: str) -> Session:
        try:
            return self._sessions[key]
        except KeyError:
            raise NotFound(f"Session not found: {key}", code="session_not_found") from None

    async def _session_for(
        self, package: InstalledPackage, session_id: str, resource_tier: int | None = None
    ) -> Session:
        key = session_key(package.id, session_id)
        session = self._sessions.get(key)
        if session is not None and session.package.sha256 == package.sha256:
            return session
        async with self._create_lock:
            session = self._sessions.get(key)
            if session is not None and session.package.sha256 == package.sha256:
                return session
            if session is not None:
                # The package was replaced under this id: its old kernel must go.
                await self._close(session)
            if len(self._sessions) >= self.settings.max_sessions:
                await self._evict_one()
            tier = package.manifest.resource_tier if resource_tier is None else resource_tier
            try:
                sbx = await asyncio.to_thread(
                    functools.partial(
                        self.sandbox.open_session,
                        package_root=package.root,
                        package_name=package.manifest.name,
                        package_id=package.id,
                        resource_tier=tier,
                    )
                )
            except (OSError, RuntimeError) as exc:
                log.error("cannot open a sandbox session for %s: %s", key, exc)
                raise ServiceUnavailable(
                    f"could not set up a sandbox for session {session_id}: {exc}",
                    code="sandbox_unavailable",
                ) from None
            session = Session(
                key=key, session_id=session_id, package=package, sandbox=sbx, resource_tier=tier
            )
            self._sessions[key] = session
            self.created_total += 1
            return session

    async def _evict_one(self) -> None:
        idle = [s for s in self._sessions.values() if not s.busy and s.waiting == 0]
        if not idle:
            raise ServiceUnavailable(
                f"all {self.settings.max_sessions} sessions are busy; try again later",
                code="too_many_sessions",
            )
        victim = min(idle, key=lambda s: s.last_used)
        log.info("evicting idle session %s to make room", victim.key)
        await self._close(victim)

    # ---- kernel ownership ----------------------------------------------

    async def _ensure_kernel(self, session: Session) -> SessionKernel:
        if session.kernel is not None:
            if await session.kernel.is_alive():
                return session.kernel
            exit_ = session.kernel.exit
            await self._drop_kernel(session, cause="died_idle")
            session.restarted_note = exit_.describe() if exit_ else "the kernel died"
        dirs = session.sandbox.dirs
        env = kernel_environment(
            session.package.manifest.environment,
            package_root=str(session.package.root),
            home=dirs.home,
            tmp=dirs.tmp,
        )
        assert self.spec_manager is not None, "SessionManager.start() first"
        kernel = SessionKernel(
            sandbox=self.sandbox,
            sandbox_session=session.sandbox,
            spec_manager=self.spec_manager,
            env=env,
        )
        try:
            await kernel.start()
        except KernelStartError as exc:
            await asyncio.to_thread(self.sandbox.end_launch, session.sandbox)
            if session.closed:  # its directory was removed under the starting kernel
                raise _closed(session, "started its kernel") from None
            log.error("session %s: %s", session.key, exc)
            raise ServiceUnavailable(
                f"could not start a kernel for session {session.session_id}: "
                f"{str(exc).splitlines()[0]}",
                code="kernel_start_failed",
            ) from None
        metrics.KERNEL_STARTS.labels("restart" if session.restarted_note else "new").inc()
        session.kernel = kernel
        if session.closed:
            # Deleted (or its package unloaded) while the kernel started: nothing else
            # would ever shut this kernel down.
            await self._drop_kernel(session, cause="shutdown")
            raise _closed(session, "started its kernel")
        return kernel

    async def _drop_kernel(self, session: Session, *, cause: str) -> None:
        kernel, session.kernel = session.kernel, None
        if kernel is not None:
            # The provisioner's cleanup already swept the kernel's cgroup and ids.
            await kernel.shutdown()
            if cause != "shutdown":
                metrics.KERNEL_DEATHS.labels(cause).inc()
                session.restarts += 1

    async def _close(self, session: Session) -> None:
        session.closed = True
        self._sessions.pop(session.key, None)
        await self._drop_kernel(session, cause="shutdown")
        await asyncio.to_thread(self.sandbox.close_session, session.sandbox)

    # ---- calls ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, session: Session):  # type: ignore[no-untyped-def]
        """Wait for this session's turn, within the queue bound."""
        if session.waiting >= self.settings.session_queue_size:
            raise TooManyRequests(
                f"session {session.session_id} already has {session.waiting} calls queued"
                f" (the limit is {self.settings.session_queue_size}); retry later",
            )
        session.waiting += 1
        try:
            await session.lock.acquire()
        finally:
            session.waiting -= 1
        try:
            if session.closed:
                raise _closed(session, "waited")
            yield
        finally:
            session.last_used = time.time()
            session.lock.release()

    def _timeout(self, input_: dict[str, Any]) -> float:
        raw = input_.get("timeout_seconds")
        if raw is None:
            return self.settings.default_timeout_seconds
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
            raise ValidationFailed(
                [
                    {
                        "loc": ["body", "input", "timeout_seconds"],
                        "msg": "must be a positive number",
                        "type": "value_error",
                    }
                ]
            )
        return min(float(raw), self.settings.max_timeout_seconds)

    @staticmethod
    def session_id_of(input_: dict[str, Any], context: dict[str, Any]) -> str:
        raw = input_.get("session_id", context.get("session_id"))
        if raw is None or raw == "":
            return DEFAULT_SESSION
        if not isinstance(raw, str) or not _SESSION_ID_RE.match(raw):
            raise ValidationFailed(
                [
                    {
                        "loc": ["body", "input", "session_id"],
                        "msg": "must be 1-128 characters of letters, digits and ._@:+=-",
                        "type": "value_error",
                    }
                ]
            )
        return raw

    async def invoke(
        self, agent: Agent, input_: dict[str, Any], *, context: dict[str, Any], trace_id: str
    ) -> dict[str, Any]:
        if agent.private:
            raise NotFound(f"Agent not found: {agent.id}", code="agent_not_found")
        kind = agent.export.kind
        session_id = self.session_id_of(input_, context)
        timeout = self._timeout(input_)
        if kind == CODE_EXECUTOR:
            code = input_.get("code")
            if not isinstance(code, str):
                raise ValidationFailed(
                    [
                        {
                            "loc": ["body", "input", "code"],
                            "msg": "field required (a string)",
                            "type": "value_error.missing" if code is None else "type_error.str",
                        }
                    ]
                )
        tier = input_.get("resource_tier")
        if tier is not None and (isinstance(tier, bool) or tier not in (0, 1, 2)):
            raise ValidationFailed(
                [
                    {
                        "loc": ["body", "input", "resource_tier"],
                        "msg": "must be 0, 1 or 2",
                        "type": "value_error",
                    }
                ]
            )
        self.invocations += 1
        started = time.perf_counter()
        session = await self._session_for(agent.package, session_id, tier)
        async with self._turn(session):
            kernel = await self._ensure_kernel(session)
            note, session.restarted_note = session.restarted_note, None
            session.executions += 1
            with _unless_closed(session, "ran"):
                if kind == CODE_EXECUTOR:
                    run, outcome = await kernel.execute(
                        code, timeout=timeout, user_expressions=COLLECT_EXPRESSION
                    )
                else:
                    run, outcome = await self._call_handler(kernel, agent, input_, timeout)
            if session.closed and outcome != "done":
                raise _closed(session, "ran")
            exit_ = kernel.exit
            if outcome == "dead":
                await self._drop_kernel(session, cause="died")
                session.restarted_note = exit_.describe() if exit_ else "the kernel died"
            elif outcome == "timeout_restarted":
                session.restarts += 1
                metrics.KERNEL_DEATHS.labels("timeout").inc()
        duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
        fate = answers.Fate(outcome=outcome, timeout=timeout, exit=exit_, restarted_note=note)
        if kind == CODE_EXECUTOR:
            output = answers.code_output(run, fate, session_id, duration_ms)
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
                "session_id": session_id,
                "session": session.key,
                "kind": kind,
                "execution_count": run.execution_count,
                "session_restarted": note is not None,
                **({"restart_reason": note} if note else {}),
                **meta,
            },
        }

    @staticmethod
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

    # ---- session operations (the sessions API) -------------------------

    async def delete(self, key: str) -> None:
        session = self.get(key)
        await self._close(session)

    async def interrupt(self, key: str) -> None:
        session = self.get(key)
        if session.kernel is None:
            raise RuntimeAPIError(
                f"session {key} has no running kernel",
                status=409,
                kind="Conflict",
                code="no_kernel",
            )
        await session.kernel.interrupt()

    async def restart(self, key: str) -> None:
        session = self.get(key)
        async with self._turn(session):
            if session.kernel is None:
                await self._ensure_kernel(session)
                return
            await session.kernel.restart()
            session.restarts += 1

    async def variables(self, key: str) -> list[dict[str, Any]]:
        session = self.get(key)
        if session.kernel is None:
            return []
        async with self._turn(session):
            if session.kernel is None:
                return []
            with _unless_closed(session, "ran"):
                run, outcome = await session.kernel.execute(
                    "", timeout=10.0, silent=True, user_expressions=VARIABLES_EXPRESSION
                )
            if session.closed and outcome != "done":
                raise _closed(session, "ran")
            if outcome == "dead":
                exit_ = session.kernel.exit
                await self._drop_kernel(session, cause="died")
                session.restarted_note = exit_.describe() if exit_ else "the kernel died"
                return []
            return answers.user_expression(run).get("variables", [])

    async def shutdown_package(self, package_id: str) -> int:
        victims = [s for s in self._sessions.values() if s.package.id == package_id]
        await asyncio.gather(*(self._close(s) for s in victims))
        return len(victims)

    async def _cull_loop(self) -> None:
        idle_limit = self.settings.session_idle_seconds
        while True:
            await asyncio.sleep(min(60.0, max(1.0, idle_limit / 4)))
            now = time.time()
            for s in list(self._sessions.values()):
                if not s.busy and s.waiting == 0 and now - s.last_used > idle_limit:
                    log.info("culling idle session %s", s.key)
                    await self._close(s)


def _closed(session: Session, while_: str) -> NotFound:
    return NotFound(
        f"Session {session.session_id} was closed while this call {while_}",
        code="session_closed",
    )


@contextlib.contextmanager
def _unless_closed(session: Session, while_: str):  # type: ignore[no-untyped-def]
    """Closing a session stops its kernel's channels under a running call: whatever that
    call then raises (a cancelled socket poll, a closed socket) becomes session_closed."""
    try:
        yield
    except BaseException:
        task = asyncio.current_task()
        if session.closed and not (task is not None and task.cancelling()):
            raise _closed(session, while_) from None
        raise
