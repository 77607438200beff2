"""What a session does once it exists: turns (FIFO, bounded), the sessions API's operations
(delete, interrupt, restart, variables) and culling idle sessions. Mixed into SessionManager,
which owns the registry and the kernels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pixell_kernel_runtime.auth.principal import DEFAULT_TENANT
from pixell_kernel_runtime.errors import Conflict, RuntimeAPIError, TooManyRequests
from pixell_kernel_runtime.execution import answers
from pixell_kernel_runtime.execution.bootstrap import VARIABLES_EXPRESSION
from pixell_kernel_runtime.sessions.kernel import KernelStartError
from pixell_kernel_runtime.sessions.session import (
    Session,
    closed_error,
    new_generation,
    unless_closed,
)

if TYPE_CHECKING:
    from pixell_kernel_runtime.config import Settings

log = logging.getLogger(__name__)

# How long a variables read waits for a kernel busy with another client's cell (it never
# interrupts nor restarts: a read changes nothing).
VARIABLES_TIMEOUT = 10.0


class SessionOperations:  # a mixin of SessionManager
    settings: Settings
    _sessions: dict[tuple[str, str], Session]
    _inflight: dict[str, int]
    invocations: int

    # The rest (get, ensure_kernel, kernel_ended, restart_failed, _close, _close_quietly)
    # is SessionManager's.

    # ---- calls ---------------------------------------------------------

    def reserve_turn(self, session: Session) -> Callable[[], None]:
        """A place in the session's queue now (429 when it is full), for ``turn(place=...)``;
        returns its release (idempotent: call it if the turn is never taken)."""
        if session.waiting >= self.settings.session_queue_size:
            raise TooManyRequests(
                f"session {session.session_id} already has {session.waiting} calls queued"
                f" (the limit is {self.settings.session_queue_size}); retry later",
            )
        session.waiting += 1
        held = [True]

        def release() -> None:
            if held:
                held.clear()
                session.waiting -= 1

        return release

    @contextlib.asynccontextmanager
    async def turn(self, session: Session, *, place: Callable[[], None] | None = None):  # type: ignore[no-untyped-def]
        """Wait for this session's turn, within the queue bound (or in a reserved ``place``)."""
        release = place or self.reserve_turn(session)
        try:
            await session.lock.acquire()
        finally:
            release()
        try:
            if session.closed:
                raise closed_error(session, "waited")
            yield
        finally:
            session.last_used = time.time()
            session.lock.release()

    @contextlib.contextmanager
    def tenant_slot(self, tenant: str):  # type: ignore[no-untyped-def]
        """One of the tenant's concurrent invocations, for the length of a call."""
        running = self._inflight.get(tenant, 0)
        if running >= self.settings.max_invocations_per_tenant:
            raise TooManyRequests(
                f"tenant {tenant} already has {running} invocations running (the limit is "
                f"{self.settings.max_invocations_per_tenant}); retry later",
                code="too_many_invocations",
                retry_after=1,
            )
        self._inflight[tenant] = running + 1
        self.invocations += 1
        try:
            yield
        finally:
            self._inflight[tenant] -= 1
            if not self._inflight[tenant]:
                del self._inflight[tenant]

    # ---- session operations (the sessions API) -------------------------

    async def delete(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        session = self.get(key, tenant)
        await self._close(session)

    async def interrupt(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        session = self.get(key, tenant)
        if session.kernel is None:
            raise RuntimeAPIError(
                f"session {key} has no running kernel",
                status=409,
                kind="Conflict",
                code="no_kernel",
            )
        await session.kernel.interrupt()

    async def restart(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        session = self.get(key, tenant)
        async with self.turn(session):
            if session.kernel is None or session.kernel.died:
                await self.ensure_kernel(session)
                return
            try:
                await session.kernel.restart()
            except KernelStartError as exc:
                await self.restart_failed(session, exc, "restarting the kernel failed")
            session.restarts += 1
            new_generation(session, "the kernel was restarted through the sessions API")

    async def variables(self, key: str, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        session = self.get(key, tenant)
        if session.kernel is None:
            return []
        async with self.turn(session):
            if session.kernel is None:
                return []
            with unless_closed(session, "ran"):
                run, outcome = await session.kernel.execute(
                    "",
                    timeout=VARIABLES_TIMEOUT,
                    silent=True,
                    user_expressions=VARIABLES_EXPRESSION,
                    restart_on_deadline=False,
                )
            if session.closed and outcome != "done":
                raise closed_error(session, "ran")
            if outcome == "dead":
                await self.kernel_ended(session, cause="died")
                return []
            if outcome == "deadline":
                raise Conflict(
                    f"session {key}: the kernel did not answer within {VARIABLES_TIMEOUT:g}s"
                    " (busy with a cell from another client?); nothing was interrupted, try"
                    " again later",
                    code="kernel_busy",
                )
            return answers.user_expression(run).get("variables", [])

    async def _cull_loop(self) -> None:
        idle_limit = self.settings.session_idle_seconds
        while True:
            await asyncio.sleep(min(60.0, max(1.0, idle_limit / 4)))
            try:
                await self._cull(idle_limit)
            except Exception:  # noqa: BLE001 - the culler must outlive any one failure
                log.exception("culling idle sessions failed; trying again later")

    async def _cull(self, idle_limit: float) -> None:
        now = time.time()
        for s in list(self._sessions.values()):
            # A cell running from any client (a console) is activity, as in jupyter_server.
            if s.busy or s.waiting or s.kernel_busy() or now - s.last_active() <= idle_limit:
                continue
            log.info("culling idle session %s", s.key)
            await self._close_quietly(s, "idle")
