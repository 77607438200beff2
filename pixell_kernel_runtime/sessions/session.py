"""One session: (tenant, package, session_id) and the kernel it runs, as the registry keeps it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pixell_kernel_runtime.errors import NotFound
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sandbox.core import SandboxSession
from pixell_kernel_runtime.sessions import procinfo
from pixell_kernel_runtime.sessions.kernel import SessionKernel


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_key(package_id: str, session_id: str) -> str:
    return f"{package_id}:{session_id}"


@dataclass
class Session:
    key: str
    session_id: str
    tenant: str
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
    # Each kernel process the session runs is one generation. A call that runs on another
    # generation than the session's previous call ran on says session_restarted, and why.
    generation: int = 0
    ran_on: int = 0
    restart_reason: str | None = None
    # Why the last kernel ended while no other runs yet (it died, a restart failed).
    ended: str | None = None
    # Its id on the Jupyter kernels API (jupyter_server's routes take only UUID-shaped ids):
    # stable for the session's life, whatever kernel process runs under it.
    kernel_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    closed: bool = False

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def kernel_busy(self) -> bool:
        """Running a cell from any client (a console's too), by the kernel's iopub status."""
        return self.kernel is not None and self.kernel.execution_state == "busy"

    def last_active(self) -> float:
        """The later of the last call here and the kernel's last status broadcast."""
        seen = self.kernel.last_activity if self.kernel is not None else None
        return max(self.last_used, seen or 0.0)

    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.kernel is not None and not self.kernel.died:
            return "busy" if self.busy else "idle"
        return "dead" if self.kernel is not None or self.ended else "not_started"

    def idle_seconds_left(self, idle_limit: float, now: float | None = None) -> float | None:
        """Seconds before the culler closes this session if nothing happens (None: busy)."""
        if self.busy or self.waiting or self.kernel_busy():
            return None
        now = time.time() if now is None else now
        return round(max(0.0, idle_limit - (now - self.last_active())), 3)

    def summary(self, *, host: bool = True, idle_limit: float | None = None) -> dict[str, Any]:
        """``host``: include host facts (pid, connection file path, RSS) -- attach/admin only."""
        # A kernel seen dead whose remains are not yet dropped (the reaper runs next) already
        # shows as what it is about to be: no process, one restart more.
        dying = self.kernel is not None and self.kernel.died
        pid = self.kernel.pid if self.kernel and not dying else None
        out = {
            "id": self.key,
            "session_id": self.session_id,
            "kernel_id": self.kernel_id,
            "tenant": self.tenant,
            "package_id": self.package.id,
            "kernel_state": self.state(),
            "created": _iso(self.created),
            "last_used": _iso(self.last_used),
            # Any client's activity (iopub status), as jupyter_server's last_activity.
            "last_activity": _iso(self.last_active()),
            "kernel_execution_state": self.kernel.execution_state if self.kernel else None,
            "executions": self.executions,
            "restarts": self.restarts + int(dying),
            "queued": self.waiting,
        }
        if idle_limit is not None:
            out["idle_seconds_left"] = self.idle_seconds_left(idle_limit)
        if host:
            out["kernel_pid"] = pid
            # For `pixell-kernel-runtime console` / `jupyter console --existing` on this host.
            out["connection_file"] = self.sandbox.dirs.connection_file if self.kernel else None
            out["kernel_rss_bytes"] = procinfo.tree_rss(pid) if pid else None
        return out


def new_generation(session: Session, reason: str | None) -> None:
    """A new kernel process runs for the session; ``reason`` says what replaced the last."""
    session.generation += 1
    session.restart_reason = reason
    session.ended = None


def closed_error(session: Session, while_: str) -> NotFound:
    return NotFound(
        f"Session {session.session_id} was closed while this call {while_}",
        code="session_closed",
    )


@contextlib.contextmanager
def unless_closed(session: Session, while_: str):  # type: ignore[no-untyped-def]
    """Closing a session stops its kernel's channels under a running call: whatever that
    call then raises (a cancelled socket poll, a closed socket) becomes session_closed."""
    try:
        yield
    except BaseException:
        task = asyncio.current_task()
        if session.closed and not (task is not None and task.cancelling()):
            raise closed_error(session, while_) from None
        raise
