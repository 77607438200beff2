"""The memory budget of all kernels together (KERNELS_MEMORY_BUDGET): what they hold now, and
whether one more fits. RSS is read from /proc off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from pixell_kernel_runtime.sessions import procinfo
from pixell_kernel_runtime.sessions.kernel import SessionKernel

# What a new kernel is assumed to take before any runs (an idle sandboxed ipykernel: ~60 MiB).
MIN_ESTIMATE = 64 * 1024 * 1024


class MemoryBudget:
    def __init__(self, limit: int, kernels: Callable[[], Iterable[SessionKernel]]) -> None:
        self.limit = limit
        self.kernels = kernels

    async def used(self, exclude: Iterable[SessionKernel] = ()) -> tuple[int, int]:
        """(bytes, kernels) held by the live kernels, those in ``exclude`` left out."""
        skip = {id(k) for k in exclude}
        pids = [k.pid for k in self.kernels() if id(k) not in skip and k.pid and not k.died]
        sizes = await asyncio.to_thread(lambda: [procinfo.tree_rss(p) for p in pids])
        return sum(sizes), len(sizes)

    async def room_for_one(self, exclude: Iterable[SessionKernel] = ()) -> bool:
        used, count = await self.used(exclude)
        estimate = max(MIN_ESTIMATE, used // count if count else 0)
        return used + estimate <= self.limit
