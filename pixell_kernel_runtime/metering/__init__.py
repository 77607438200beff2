"""Usage metering: a record per execution in a SQLite ledger, read by GET /runtime/usage and
exported to Stripe by ``pixell-kernel-runtime usage export``.

``install(runtime)`` wires it into a Runtime: the execution hooks, and a ``Metering`` whose
``close()`` (awaited in ``Runtime.stop``) drains what is queued into the ledger.

What is recorded: one row per execution when it ends (``finished``), with its final status.
An execution that was running when the server died (SIGKILL, power loss) never ended: it has
no row, not even after a restart, and is not billed (its client got no answer). A row once
committed is never written again (the execution id is the key): a restart cannot count it twice.

When: the metering thread commits a record within about a millisecond of the end (it does not
hold the answer back, so a server killed inside that millisecond loses that one record); the
commit survives a crash of the server at once, and of the host once synced (within a second).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from pixell_kernel_runtime.errors import RuntimeAPIError
from pixell_kernel_runtime.metering import probe
from pixell_kernel_runtime.metering.ledger import DEFAULT_GROUPS, Ledger, UsageRecord
from pixell_kernel_runtime.metering.recorder import Finished, Recorder

__all__ = ["Ledger", "Metering", "UsageRecord", "db_path", "install"]

log = logging.getLogger(__name__)
DB_NAME = "metering.db"


def db_path(settings: Any) -> Path:
    """METERING_DB, else ``<state_dir>/metering.db``."""
    configured = getattr(settings, "metering_db", None)
    if configured:
        return Path(os.path.expanduser(str(configured)))
    return Path(settings.state_dir) / DB_NAME


class Metering:
    """The runtime's side of metering: hooks (on the loop, enqueue only) and reads (off it)."""

    def __init__(self, ledger: Ledger, recorder: Recorder, sessions: Any = None) -> None:
        self.ledger = ledger
        self.recorder = recorder
        self.sessions = sessions

    @classmethod
    def open(cls, settings: Any, sessions: Any = None) -> Metering:
        """Open (or create) the ledger and start the recorder thread. Raises RuntimeError on a
        ledger that cannot be used (a bad METERING_DB): before anything else is made, so a
        start that fails leaves nothing behind."""
        path = db_path(settings)
        try:
            ledger = Ledger(path)
        except Exception as exc:
            raise RuntimeError(f"metering ledger {path}: {exc}") from exc
        log.info("metering ledger %s", path)
        return cls(ledger, Recorder(ledger), sessions)

    def attach(self, runtime: Any) -> Metering:
        """Meter every execution of ``runtime`` (its sessions and execution hooks)."""
        self.sessions = runtime.sessions
        runtime.executions.hooks.started.append(self.on_started)
        runtime.executions.hooks.finished.append(self.on_finished)
        return self

    # ---- execution hooks (on the loop) ----------------------------------

    def _session(self, execution: Any) -> Any:
        if self.sessions is None:
            return None
        try:
            return self.sessions.get(execution.session_key, execution.tenant)
        except RuntimeAPIError:  # closed meanwhile
            return None

    def on_started(self, execution: Any) -> None:
        session = self._session(execution)
        # The kernel the call starts on, named now (attribute reads): one the session gets
        # later in the call was started for it.
        self.recorder.post("start", (execution.id, session, probe.target_of(session)))

    def on_finished(self, execution: Any) -> None:
        session = self._session(execution)
        package = getattr(session, "package", None)
        package_id = getattr(package, "id", None) or execution.session_key.split(":", 1)[0]
        manifest = getattr(package, "manifest", None)
        facts = Finished(
            execution_id=execution.id,
            tenant=execution.tenant,
            subject=execution.subject,
            agent_id=execution.agent_id,
            package_id=package_id,
            package_name=getattr(manifest, "name", None),
            session_key=execution.session_key,
            session_id=execution.session_id,
            kind=execution.kind,
            status=execution.state,
            created=execution.created,
            started=execution.started,
            ended=execution.ended,
            output_bytes=int(execution.output_bytes or 0),
        )
        self.recorder.post("finish", (facts, session))

    # ---- the rest (off the loop) ----------------------------------------

    def lag(self) -> dict[str, Any]:
        """Queue depth, the age of the oldest record not yet committed, drops and errors."""
        return self.recorder.lag()

    def pending(self) -> int:
        """Hook events not yet handled (records not yet committed): the metrics gauge."""
        return int(self.recorder.lag()["queued"])

    async def flush(self, timeout: float | None = 30.0) -> bool:
        return await asyncio.to_thread(self.recorder.flush, timeout)

    async def close(self, timeout: float | None = 30.0) -> bool:
        """Drain the queue into the ledger and stop (graceful shutdown)."""
        done = await asyncio.to_thread(self.recorder.close, timeout)
        lag = self.recorder.lag()
        if not done or lag["dropped"] or lag["lost"]:
            log.error("metering: closed with usage not recorded: %s", lag)
        return done

    async def summary(
        self,
        *,
        tenant: str | None,
        start: float | None,
        end: float | None,
        group_by: tuple[str, ...] = DEFAULT_GROUPS,
        agent: str | None = None,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self.ledger.summary,
            tenant=tenant,
            start=start,
            end=end,
            group_by=group_by,
            agent=agent,
        )


def install(runtime: Any) -> Metering:
    """Open the ledger and hook it to every execution of ``runtime``."""
    return Metering.open(runtime.settings).attach(runtime)
