"""Open a sandbox session and start a sandboxed kernel in it: for sessions and the warm pool."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.errors import ServiceUnavailable
from pixell_kernel_runtime.execution.runner import OutputCaps
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sandbox import Sandbox
from pixell_kernel_runtime.sandbox.core import SandboxSession
from pixell_kernel_runtime.sandbox.environment import kernel_environment
from pixell_kernel_runtime.sandbox.kernelspec import RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions.kernel import KernelStartError, SessionKernel

log = logging.getLogger(__name__)


async def open_sandbox(
    sandbox: Sandbox, package: InstalledPackage, tier: int | None, what: str
) -> SandboxSession:
    """A sandbox session for ``package`` (its trees, ids, policy); 503 when none can be had."""
    try:
        return await asyncio.to_thread(
            functools.partial(
                sandbox.open_session,
                package_root=package.root,
                package_name=package.manifest.name,
                package_id=package.id,
                resource_tier=tier,
            )
        )
    except (OSError, RuntimeError) as exc:
        log.error("cannot open a sandbox session for %s: %s", what, exc)
        raise ServiceUnavailable(
            f"could not set up a sandbox for {what}: {exc}", code="sandbox_unavailable"
        ) from None


async def start_kernel(
    sandbox: Sandbox,
    sbx: SandboxSession,
    package: InstalledPackage,
    spec_manager: RuntimeKernelSpecManager,
    caps: OutputCaps,
    *,
    reason: str,
    session: str | None = None,
) -> SessionKernel:
    """A started, bootstrapped kernel in ``sbx``; KernelStartError when it would not start
    (its launch is swept)."""
    dirs = sbx.dirs
    env = kernel_environment(
        package.manifest.environment,
        package_root=str(package.root),
        home=dirs.home,
        tmp=dirs.tmp,
    )
    kernel = SessionKernel(
        sandbox=sandbox, sandbox_session=sbx, spec_manager=spec_manager, env=env, caps=caps
    )
    launched = time.monotonic()
    try:
        await kernel.start()
    except KernelStartError:
        await asyncio.to_thread(sandbox.end_launch, sbx)
        raise
    seconds = time.monotonic() - launched
    metrics.KERNEL_STARTS.labels(reason).inc()
    metrics.KERNEL_START_SECONDS.observe(seconds)
    log.info(
        "%s kernel started in %.2fs (pid %s)",
        session or f"a warm {package.id}",
        seconds,
        kernel.pid,
        extra={"event_type": "kernel_started", "reason": reason, "session": session},
    )
    return kernel


def preload_code(modules: tuple[str, ...]) -> str:
    """A silent cell that imports ``modules`` without binding a name in the user's namespace."""
    names: Any = list(modules)
    return (
        "def __pixell_preload():\n"
        "    import importlib\n"
        f"    for name in {names!r}:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except Exception:\n"
        "            pass\n"
        "__pixell_preload()\n"
        "del __pixell_preload\n"
    )
