"""Warm kernels, started and sandboxed ahead of demand, handed to new sessions.

A package's kernels are its own (its files are bound into the kernel's view at launch, and its
environment applied at the last exec), so the pool keeps ``size`` ready kernels per loaded
package at its default tier. A warm kernel serves exactly one session and is never recycled:
taking one schedules its replacement. Refills run one kernel start at a time in the background
(a start is a second of CPU: two at once on a small host would slow the sessions running), and
stop while the memory budget says no.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.execution.runner import OutputCaps
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sandbox import Sandbox
from pixell_kernel_runtime.sandbox.core import SandboxSession
from pixell_kernel_runtime.sandbox.kernelspec import RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions import launch
from pixell_kernel_runtime.sessions.kernel import SessionKernel

log = logging.getLogger(__name__)

PRELOAD_TIMEOUT = 60.0
# After a failed start the filler waits this long before trying that package again.
RETRY_SECONDS = 30.0


@dataclass
class Warm:
    package: InstalledPackage
    tier: int | None
    sandbox: SandboxSession
    kernel: SessionKernel


class WarmPool:
    def __init__(
        self,
        *,
        size: int,
        sandbox: Sandbox,
        spec_manager: Callable[[], RuntimeKernelSpecManager],
        caps: OutputCaps,
        preload: tuple[str, ...] = (),
        room: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.size = size
        self.sandbox = sandbox
        self.spec_manager = spec_manager
        self.caps = caps
        self.preload = preload
        # Whether the memory budget has room for one more kernel (None: no budget).
        self.room = room
        self._packages: dict[str, InstalledPackage] = {}
        self._ready: dict[str, list[Warm]] = {}
        self._filler: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self.hits = 0
        self.misses = 0

    # ---- what the session manager asks -----------------------------------

    def ready(self) -> int:
        return sum(len(w) for w in self._ready.values())

    def kernels(self) -> list[SessionKernel]:
        return [w.kernel for entries in self._ready.values() for w in entries]

    def want(self, package: InstalledPackage) -> None:
        """Keep warm kernels for ``package`` from now on (a load, or a session's first use)."""
        if self.size <= 0 or self._closed:
            return
        current = self._packages.get(package.id)
        if current is not None and current.sha256 == package.sha256:
            return
        self._packages[package.id] = package
        self._kick()

    def take(self, package: InstalledPackage, tier: int | None) -> Warm | None:
        """A warm kernel for a new session of ``package`` at ``tier``, if one is ready."""
        if self.size <= 0:
            return None
        entries = self._ready.get(package.id, [])
        for i, warm in enumerate(entries):
            if warm.package.sha256 == package.sha256 and warm.tier == tier and not warm.kernel.died:
                del entries[i]
                warm.kernel.on_death = None
                self.hits += 1
                metrics.POOL_REQUESTS.labels("hit").inc()
                self._kick()
                return warm
        self.misses += 1
        metrics.POOL_REQUESTS.labels("miss").inc()
        self.want(package)
        return None

    async def drop(self, package_id: str) -> None:
        """The package was unloaded or replaced: its warm kernels go."""
        self._packages.pop(package_id, None)
        await self._close_all(self._ready.pop(package_id, []))

    async def shrink(self) -> bool:
        """Close one warm kernel (the memory budget needs the room); False if none was ready."""
        for entries in self._ready.values():
            if entries:
                await self._close_all([entries.pop(0)])
                return True
        return False

    async def close(self) -> None:
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
        every = [w for entries in self._ready.values() for w in entries]
        self._ready.clear()
        await self._close_all(every)

    def describe(self) -> dict[str, int]:
        return {"size": self.size, "ready": self.ready(), "hits": self.hits, "misses": self.misses}

    # ---- filling ------------------------------------------------------------

    def _kick(self) -> None:
        self._wake.set()
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill_loop())

    def _short(self) -> InstalledPackage | None:
        for package_id, package in self._packages.items():
            if len(self._ready.get(package_id, [])) < self.size:
                return package
        return None

    async def _fill_loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            package = self._short()
            if package is None:
                await self._wake.wait()
                continue
            if self.room is not None and not await self.room():
                # No room: wait for a take, a drop or a session to go, then look again.
                try:
                    await asyncio.wait_for(self._wake.wait(), RETRY_SECONDS)
                except TimeoutError:
                    pass
                continue
            try:
                warm = await self._start(package)
            except Exception as exc:  # noqa: BLE001 - the pool must outlive a failed start
                log.warning("warm kernel for %s did not start: %s", package.id, exc)
                try:
                    await asyncio.wait_for(self._wake.wait(), RETRY_SECONDS)
                except TimeoutError:
                    pass
                continue
            current = self._packages.get(package.id)
            if self._closed or current is None or current.sha256 != package.sha256:
                await self._close_all([warm])  # unloaded or replaced while it started
                continue
            self._ready.setdefault(package.id, []).append(warm)

    async def _start(self, package: InstalledPackage) -> Warm:
        tier = package.manifest.resource_tier
        sbx = await launch.open_sandbox(self.sandbox, package, tier, f"a warm {package.id} kernel")
        try:
            kernel = await launch.start_kernel(
                self.sandbox, sbx, package, self.spec_manager(), self.caps, reason="pool"
            )
        except BaseException:
            await asyncio.to_thread(self.sandbox.close_session, sbx)
            raise
        warm = Warm(package, tier, sbx, kernel)
        if self.preload:
            await kernel.execute(
                launch.preload_code(self.preload),
                timeout=PRELOAD_TIMEOUT,
                silent=True,
                restart_on_deadline=False,
            )
        kernel.on_death = lambda _k: self._died(warm)
        return warm

    def _died(self, warm: Warm) -> None:
        entries = self._ready.get(warm.package.id, [])
        if warm in entries:
            entries.remove(warm)
            log.info("a warm %s kernel died in the pool", warm.package.id)
            task = asyncio.get_running_loop().create_task(self._close_all([warm]))
            task.add_done_callback(lambda _t: self._kick())

    async def _close_all(self, warms: list[Warm]) -> None:
        for warm in warms:
            try:
                await warm.kernel.shutdown()
                await asyncio.to_thread(self.sandbox.close_session, warm.sandbox)
            except Exception:  # noqa: BLE001 - one kernel must not stop the others' closing
                log.exception("closing a warm %s kernel failed", warm.package.id)
