"""(tenant, package, session_id) -> one live kernel: create, look up, take turns, cull, shut down.

The registry and its FIFO turns only: how an agent kind runs in a session is execution/'s.

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
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.auth.principal import DEFAULT_TENANT
from pixell_kernel_runtime.config import Settings
from pixell_kernel_runtime.errors import (
    Conflict,
    NotFound,
    RuntimeAPIError,
    ServiceUnavailable,
    TooManyRequests,
)
from pixell_kernel_runtime.execution import runner
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sandbox import Sandbox
from pixell_kernel_runtime.sandbox.kernelspec import RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions import launch
from pixell_kernel_runtime.sessions.budget import MemoryBudget
from pixell_kernel_runtime.sessions.kernel import KernelStartError, SessionKernel
from pixell_kernel_runtime.sessions.operations import SessionOperations
from pixell_kernel_runtime.sessions.pool import WarmPool
from pixell_kernel_runtime.sessions.session import (
    Session,
    closed_error,
    new_generation,
    session_key,
)

log = logging.getLogger(__name__)

# What a 503 for a full runtime (sessions, memory) tells clients to wait.
RETRY_AFTER_SECONDS = 30


class SessionManager(SessionOperations):
    def __init__(
        self,
        settings: Settings,
        sandbox: Sandbox,
        run_dir: Path,
        find_package: Callable[[str], InstalledPackage | None] | None = None,
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.run_dir = run_dir
        # The package loaded under an id now (the store's find): a call that waited is
        # checked against it, so that no session is built on a replaced package's files.
        self.find_package = find_package
        self._reapers: set[asyncio.Task[None]] = set()
        self.spec_manager: RuntimeKernelSpecManager | None = None
        # (tenant, "<package_id>:<session_id>") -> Session: the same session_id under two
        # tenants is two sessions, two kernels.
        self._sessions: dict[tuple[str, str], Session] = {}
        self._inflight: dict[str, int] = {}
        self._create_lock = asyncio.Lock()
        self._culler: asyncio.Task[None] | None = None
        self.created_total = 0
        # Calls that passed validation (what /runtime/info reports as total_invocations).
        self.invocations = 0
        self.pool: WarmPool | None = None
        budget = settings.kernels_memory_budget
        self.budget = MemoryBudget(budget, self._all_kernels) if budget else None
        self.caps = runner.OutputCaps(
            stream_chars=settings.output_stream_chars,
            outputs=settings.output_max_outputs,
            output_bytes=settings.output_max_bytes,
        )

    # ---- lifecycle -----------------------------------------------------

    async def start(self) -> None:
        self.spec_manager = RuntimeKernelSpecManager(self.settings.kernels_dir)
        self.sandbox.kernel_spec = self.spec_manager.describe()
        spec_manager = self.spec_manager
        if self.settings.pool_size > 0:
            self.pool = WarmPool(
                size=self.settings.pool_size,
                sandbox=self.sandbox,
                spec_manager=lambda: spec_manager,
                caps=self.caps,
                preload=tuple(m for m in self.settings.pool_preload.split(",") if m.strip()),
                room=self.budget.room_for_one if self.budget is not None else None,
            )
        self._culler = asyncio.create_task(self._cull_loop())

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
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

    def _all_kernels(self) -> list[SessionKernel]:
        live = [s.kernel for s in list(self._sessions.values()) if s.kernel is not None]
        return live + (self.pool.kernels() if self.pool is not None else [])

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in list(self._sessions.values()):
            state = s.state()
            out[state] = out.get(state, 0) + 1
        return out

    def queue_depth(self) -> int:
        return sum(s.waiting for s in list(self._sessions.values()))

    def counts(self) -> dict[str, int]:
        active = sum(1 for s in self._sessions.values() if s.kernel is not None)
        return {"total": len(self._sessions), "active": active, "created": self.created_total}

    # ---- look-up -------------------------------------------------------

    def list(self, tenant: str | None = None) -> list[Session]:
        """One tenant's sessions, or (``None``: an administrator) every tenant's."""
        found = [s for s in self._sessions.values() if tenant is None or s.tenant == tenant]
        return sorted(found, key=lambda s: s.created)

    def get(self, key: str, tenant: str = DEFAULT_TENANT) -> Session:
        """Another tenant's session is not found, exactly as a missing one."""
        try:
            return self._sessions[(tenant, key)]
        except KeyError:
            raise NotFound(f"Session not found: {key}", code="session_not_found") from None

    def by_kernel_id(self, kernel_id: str, tenant: str = DEFAULT_TENANT) -> Session:
        """A session by its Jupyter kernel id; another tenant's is not found."""
        for session in self._sessions.values():
            if session.kernel_id == kernel_id and session.tenant == tenant:
                return session
        raise NotFound(f"Kernel does not exist: {kernel_id}", code="kernel_not_found")

    async def session_for(
        self,
        package: InstalledPackage,
        session_id: str,
        resource_tier: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> Session:
        key = session_key(package.id, session_id)
        session = self._sessions.get((tenant, key))
        if session is not None and session.package.sha256 == package.sha256:
            return session
        # Sessions that must go are closed after the lock is released: closing takes
        # seconds, and every new session waits for this lock.
        leaving: list[Session] = []
        try:
            async with self._create_lock:
                return await self._create(package, session_id, resource_tier, tenant, leaving)
        finally:
            for old in leaving:
                await self._close_quietly(old, "replaced or evicted")

    async def _create(
        self,
        package: InstalledPackage,
        session_id: str,
        resource_tier: int | None,
        tenant: str,
        leaving: list[Session],
    ) -> Session:
        """The session for (tenant, package, session_id), made under the create lock."""
        key = session_key(package.id, session_id)
        self._check_current(package)
        session = self._sessions.get((tenant, key))
        if session is not None and session.package.sha256 == package.sha256:
            return session
        if session is not None:
            # The package was replaced under this id: its old kernel must go.
            leaving.append(self._detach(session))
        own = sum(1 for s in self._sessions.values() if s.tenant == tenant)
        if session is None and own >= self.settings.max_sessions_per_tenant:
            raise TooManyRequests(
                f"tenant {tenant} already has {own} live sessions (the limit is "
                f"{self.settings.max_sessions_per_tenant}); delete one or retry later",
                code="too_many_sessions",
                retry_after=30,
            )
        await self._make_room(leaving)
        tier = package.manifest.resource_tier if resource_tier is None else resource_tier
        warm = self.pool.take(package, tier) if self.pool is not None else None
        if warm is not None:
            sbx = warm.sandbox
        else:
            sbx = await launch.open_sandbox(self.sandbox, package, tier, f"session {session_id}")
        try:
            # Replaced or unloaded while the sandbox was set up: its files may be gone.
            self._check_current(package)
        except RuntimeAPIError:
            if warm is not None:
                await warm.kernel.shutdown()
            await asyncio.to_thread(self.sandbox.close_session, sbx)
            raise
        session = Session(
            key=key,
            session_id=session_id,
            tenant=tenant,
            package=package,
            sandbox=sbx,
            resource_tier=tier,
        )
        if warm is not None:
            # A warm kernel: the session's first call does not wait for a kernel to boot.
            warm.kernel.on_death = functools.partial(self._on_death, session)
            session.kernel = warm.kernel
            new_generation(session, None)
        self._sessions[(tenant, key)] = session
        self.created_total += 1
        return session

    async def _make_room(self, leaving: list[Session]) -> None:
        """Room for one more session: under MAX_SESSIONS and the kernels' memory budget. Past
        either, warm kernels go first, then the least recently used idle session (or, with
        SESSION_EVICTION=refuse, a 503 with Retry-After)."""
        if len(self._sessions) >= self.settings.max_sessions:
            leaving.append(
                self._detach(
                    self._victim(
                        f"all {self.settings.max_sessions} sessions (MAX_SESSIONS) are in use"
                    )
                )
            )
        if self.budget is None:
            return
        while not await self.budget.room_for_one([s.kernel for s in leaving if s.kernel]):
            if self.pool is not None and await self.pool.shrink():
                continue
            limit = self.budget.limit // (1024 * 1024)
            leaving.append(
                self._detach(
                    self._victim(
                        f"the kernels hold their memory budget (KERNELS_MEMORY_BUDGET, {limit} MiB)"
                    )
                )
            )

    def _check_current(self, package: InstalledPackage) -> None:
        """The package a waiting call resolved must still be the one loaded under its id."""
        if self.find_package is None:
            return
        current = self.find_package(package.id)
        if current is None:
            raise NotFound(
                f"Package {package.id} was unloaded while this call waited",
                code="package_not_found",
            )
        if current.sha256 != package.sha256:
            raise Conflict(
                f"Package {package.id} was replaced while this call waited; retry the call",
                code="package_replaced",
            )

    def _victim(self, why: str) -> Session:
        """The idle session to evict (least recently active), or a 503 saying ``why``."""
        idle = [s for s in self._sessions.values() if not s.busy and s.waiting == 0]
        if not idle or self.settings.session_eviction == "refuse":
            error = ServiceUnavailable(
                f"{why}" + ("; every session is busy" if not idle else "") + "; try again later",
                code="too_many_sessions" if "MAX_SESSIONS" in why else "memory_budget",
            )
            error.retry_after = RETRY_AFTER_SECONDS
            raise error
        # A console's running cell counts: the least recently active idle session goes.
        victim = min(idle, key=lambda s: (s.kernel_busy(), s.last_active()))
        log.info("evicting idle session %s to make room", victim.key)
        return victim

    def _detach(self, session: Session) -> Session:
        """Out of the table at once (no call finds it any more); closed by the caller."""
        session.closed = True
        self._sessions.pop((session.tenant, session.key), None)
        return session

    async def _close_quietly(self, session: Session, why: str) -> None:
        try:
            await self._close(session)
        except Exception:  # noqa: BLE001 - one session must not stop the others' closing
            log.exception("closing %s session %s failed", why, session.key)

    # ---- kernel ownership ----------------------------------------------

    async def ensure_kernel(self, session: Session) -> SessionKernel:
        if session.kernel is not None:
            if await session.kernel.is_alive():
                return session.kernel
            await self.kernel_ended(session, cause="died_idle")
        assert self.spec_manager is not None, "SessionManager.start() first"
        try:
            kernel = await launch.start_kernel(
                self.sandbox,
                session.sandbox,
                session.package,
                self.spec_manager,
                self.caps,
                reason="restart" if session.generation else "new",
                session=session.key,
            )
        except KernelStartError as exc:
            if session.closed:  # its directory was removed under the starting kernel
                raise closed_error(session, "started its kernel") from None
            log.error("session %s: %s", session.key, exc)
            raise ServiceUnavailable(
                f"could not start a kernel for session {session.session_id}: "
                f"{str(exc).splitlines()[0]}",
                code="kernel_start_failed",
            ) from None
        kernel.on_death = functools.partial(self._on_death, session)
        session.kernel = kernel
        new_generation(
            session, f"{session.ended}; a new kernel was started" if session.ended else None
        )
        if session.closed:
            # Deleted (or its package unloaded) while the kernel started: nothing else
            # would ever shut this kernel down.
            await self._drop_kernel(session, cause="shutdown")
            raise closed_error(session, "started its kernel")
        return kernel

    async def _drop_kernel(self, session: Session, *, cause: str) -> None:
        kernel, session.kernel = session.kernel, None
        if kernel is not None:
            # Counted before the first await: a listing meanwhile sees the death whole.
            if cause != "shutdown":
                metrics.KERNEL_DEATHS.labels(cause).inc()
                session.restarts += 1
            # The provisioner's cleanup already swept the kernel's cgroup and ids.
            await kernel.shutdown()

    async def kernel_ended(self, session: Session, *, cause: str) -> None:
        """The kernel died (seen by a call or by its death watch): drop it, keep why."""
        kernel = session.kernel
        if kernel is not None and kernel.exit is None:
            await kernel.is_alive()  # reads how it ended
        exit_ = kernel.exit if kernel is not None else None
        reason = metrics.death_reason(exit_.signal, exit_.code) if exit_ else "exit"
        log.info(
            "session %s: kernel died (%s)",
            session.key,
            exit_.describe() if exit_ else "unknown",
            extra={
                "event_type": "kernel_died",
                "session": session.key,
                "reason": reason,
                "seen": cause,
            },
        )
        await self._drop_kernel(session, cause=reason)
        session.ended = exit_.describe() if exit_ else "the kernel died"

    async def restart_failed(self, session: Session, exc: Exception, what: str) -> NoReturn:
        """A restart could not start a kernel: the old one is gone, the session is dead."""
        log.error("session %s: %s: %s", session.key, what, exc)
        await self._drop_kernel(session, cause="restart_failed")
        await asyncio.to_thread(self.sandbox.end_launch, session.sandbox)
        session.ended = f"{what}: {str(exc).splitlines()[0]}"
        raise ServiceUnavailable(
            f"session {session.session_id}: {session.ended}", code="kernel_start_failed"
        )

    def _on_death(self, session: Session, kernel: SessionKernel) -> None:
        task = asyncio.get_running_loop().create_task(self._reap(session, kernel))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, session: Session, kernel: SessionKernel) -> None:
        """A kernel found dead between calls: its remains go now, not at the next call."""
        try:
            async with session.lock:
                if not session.closed and session.kernel is kernel:
                    log.info("session %s: its kernel died while idle", session.key)
                    await self.kernel_ended(session, cause="died_idle")
        except Exception:  # noqa: BLE001 - the next call notices the death again
            log.exception("session %s: cleaning up a dead kernel failed", session.key)

    async def _close(self, session: Session) -> None:
        self._detach(session)
        await self._drop_kernel(session, cause="shutdown")
        await asyncio.to_thread(self.sandbox.close_session, session.sandbox)

    def package_loaded(self, package: InstalledPackage) -> None:
        """A package was loaded: warm kernels for it from now on."""
        if self.pool is not None:
            self.pool.want(package)

    async def shutdown_package(self, package_id: str) -> int:
        if self.pool is not None:
            await self.pool.drop(package_id)
        victims = [s for s in self._sessions.values() if s.package.id == package_id]
        await asyncio.gather(*(self._close_quietly(s, "retired") for s in victims))
        return len(victims)
