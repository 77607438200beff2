"""One live kernel: start through jupyter_client, execute with a deadline, notice death.

The kernel is launched from the runtime's own kernel spec by the ``SandboxProvisioner`` it names,
over ipc sockets in the session's server dir; the environment it gets is built once, by
``sandbox.environment``, and applied by the launcher only after every sandbox layer.

Between calls two cheap watchers run: jupyter_client's restarter with autorestart off notices
the process dying while idle, and a reader of the client's own iopub notes every client's
``status`` broadcasts (``execution_state``, as jupyter_server's ``last_activity``), so that a
cell run from a console counts as activity; during a call, the call's reads note them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

from pixell_kernel_runtime.execution import runner, wire
from pixell_kernel_runtime.execution.bootstrap import bootstrap_code
from pixell_kernel_runtime.sandbox import layout
from pixell_kernel_runtime.sandbox.kernelspec import KERNEL_NAME, RuntimeKernelSpecManager
from pixell_kernel_runtime.sessions.kernel_manager import (
    RECEIVE_QUEUE_MESSAGES,
    DeathWatch,
    Exit,
    SessionKernelManager,
    bounded_context,
    exit_from_returncode,
)

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
INTERRUPT_GRACE = 1.5
# How long after its interrupt_reply an interrupt may go without a sign from the cell before
# it is sent again.
INTERRUPT_REPEAT = 0.5
# How long a reply may trail the cell's idle status (they come on two sockets).
REPLY_AFTER_IDLE = 0.5
# How often an idle kernel's process is polled (a waitpid that does not block).
DEATH_POLL_SECONDS = 1.0
STATUS_PAUSE_SECONDS = 0.05
# How long after a call the reader between calls starts (what came meanwhile waits in the queue).
READER_PAUSE_SECONDS = 0.25


class KernelStartError(Exception):
    pass


class SessionKernel:
    """A kernel manager and its client, owned by one session."""

    def __init__(
        self,
        *,
        sandbox: Any,
        sandbox_session: Any,
        spec_manager: RuntimeKernelSpecManager,
        env: dict[str, str],
        caps: runner.OutputCaps = runner.DEFAULT_CAPS,
    ) -> None:
        self.dirs = sandbox_session.dirs
        self.caps = caps
        self.env = env
        self.km = SessionKernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=spec_manager,
            transport="ipc",
            ip=self.dirs.ipc_prefix,
            connection_file=self.dirs.connection_file,
            shutdown_wait_time=2.0,
            # Measures, caps and parses kernel messages off the event loop (hostile data).
            client_class="pixell_kernel_runtime.execution.wire.BoundedKernelClient",
        )
        self.km.sandbox = sandbox
        self.km.sandbox_session = sandbox_session
        self.kc: AsyncKernelClient | None = None
        self.exit: Exit | None = None
        # Called (from the loop, once) when the process is found dead between calls.
        self.on_death: Callable[[SessionKernel], None] | None = None
        self.died = False
        # What the kernel last broadcast on iopub, to any client, and when.
        self.execution_state: str | None = None
        self.last_activity: float | None = None
        self._death_watch: DeathWatch | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._reader_timer: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        proc = getattr(self.km.provisioner, "process", None) if self.km.provisioner else None
        return getattr(proc, "pid", None)

    async def start(self) -> None:
        try:
            await self.km.start_kernel(env=self.env)
            await self._connect()
        except Exception as exc:
            detail = await self._log_tail()
            await self.shutdown()
            raise KernelStartError(f"kernel failed to start: {exc}{detail}") from exc
        self._watch()

    # ---- watchers between calls ------------------------------------------

    def _watch(self) -> None:
        self._unwatch()
        watch = DeathWatch(kernel_manager=self.km, time_to_dead=DEATH_POLL_SECONDS)
        watch.add_callback(self._died, "dead")
        watch.start()
        self._death_watch = watch
        self._resume_reader()

    def _unwatch(self) -> None:
        watch, self._death_watch = self._death_watch, None
        if watch is not None:
            watch.stop()
        self._pause_reader()

    def _died(self) -> None:
        if self._death_watch is None:  # stopped meanwhile: a restart or shutdown of ours
            return
        self._unwatch()
        self.died = True
        if self.on_death is not None:
            self.on_death(self)

    async def _read_between_calls(self) -> None:
        """Note the kernel's status broadcasts (any client's: a console's cells count as
        activity) while no call of ours reads iopub; the rest is dropped unparsed, as the
        next call would drop it."""
        assert self.kc is not None
        channel = self.kc.iopub_channel
        try:
            while await channel.readable.wait(None):
                # What is queued (at most the socket's queue), then a pause: a kernel flooding
                # iopub costs the server a few small messages a tick.
                for _ in range(RECEIVE_QUEUE_MESSAGES):
                    frames = channel.take_unparsed()
                    if frames is None:
                        break
                    state = wire.broadcast_state(frames)
                    if state is not None:
                        self._note_status(state)
                await asyncio.sleep(STATUS_PAUSE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - a watcher must not take anything down with it
            log.warning("iopub status watch ended: %r", exc)

    def _note_status(self, state: str) -> None:
        self.execution_state = state
        self.last_activity = time.time()

    def _pause_reader(self) -> None:
        timer, self._reader_timer = self._reader_timer, None
        if timer is not None:
            timer.cancel()
        task, self._status_task = self._status_task, None
        if task is not None:
            task.cancel()

    def _resume_reader(self) -> None:
        # After a pause: back-to-back calls (which read iopub themselves, statuses included)
        # then never start and cancel a reader task between them.
        if self._reader_timer is None and self._status_task is None:
            loop = asyncio.get_running_loop()
            self._reader_timer = loop.call_later(READER_PAUSE_SECONDS, self._start_reader)

    def _start_reader(self) -> None:
        self._reader_timer = None
        if self._status_task is None and self.kc is not None and self._death_watch is not None:
            self._status_task = asyncio.create_task(self._read_between_calls())

    async def _connect(self) -> None:
        self.kc = self.km.client(context=bounded_context())
        self.kc.start_channels()
        # Calls read iopub themselves: the statuses they see count too.
        self.kc.iopub_channel.status_listener = self._note_status
        try:
            await self.kc.wait_for_ready(timeout=START_TIMEOUT)
        except RuntimeError as exc:
            raise KernelStartError(str(exc)) from exc
        # Its sockets are bound and no user code has run yet: from now on the kernel cannot
        # change the paths the server connects to.
        session = self.km.sandbox_session
        await asyncio.to_thread(layout.lock_socket_dir, session.dirs, session.owners)
        run = runner.send(self.kc, bootstrap_code(), silent=True)
        outcome = await runner.gather(
            self.kc, run, deadline=time.monotonic() + START_TIMEOUT, is_alive=self.is_alive
        )
        if outcome != "done" or run.status != "ok":
            raise KernelStartError(f"kernel bootstrap failed: {run.error or outcome}")

    async def _log_tail(self) -> str:
        tail = await asyncio.to_thread(layout.read_log_tail, self.dirs.log_file)
        return f"\n{tail}" if tail else ""

    async def is_alive(self) -> bool:
        if self.exit is not None:
            return False
        alive = await self.km.is_alive()
        if not alive:
            self.exit = await self._exit_status()
        return alive

    async def _exit_status(self) -> Exit:
        provisioner = self.km.provisioner
        rc = None
        if provisioner is not None:
            rc = await provisioner.poll()
            proc = getattr(provisioner, "process", None)
            if rc is None and proc is not None:
                rc = proc.returncode
        return exit_from_returncode(rc)

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
        restart_on_deadline: bool = True,
        listener: Callable[[str, dict[str, Any]], Any] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[runner.CellRun, str]:
        """Run ``code``. Outcome: done, timeout (state kept), timeout_restarted, or dead;
        ``deadline`` (nothing done to the kernel) without ``restart_on_deadline``; cancelled
        or cancelled_restarted when ``stop()`` turned true (a cancel: handled as a deadline).

        Raises KernelStartError when the restart after a deadline cannot start a kernel."""
        assert self.kc is not None
        # This call reads iopub now; the reader between calls stops until it returns.
        self._pause_reader()
        try:
            # An interrupt still on its way (a REST interrupt, a repeated one) must not hit
            # this cell.
            await self.km.settle_interrupts(INTERRUPT_GRACE)
            await runner.drain(self.kc)
            run = runner.send(
                self.kc,
                code,
                silent=silent,
                user_expressions=user_expressions,
                listener=listener,
                caps=self.caps,
            )
            deadline = time.monotonic() + timeout
            outcome = await runner.gather(
                self.kc, run, deadline=deadline, is_alive=self.is_alive, stop=stop
            )
            if outcome not in ("deadline", "stopped") or not restart_on_deadline:
                return run, outcome
            why = "timeout" if outcome == "deadline" else "cancelled"
            # Deadline: ask politely, then restart (losing state) if the cell ignores it.
            outcome = await self._interrupt_within_grace(run, silent)
            if outcome == "done":
                await self.km.settle_interrupts(INTERRUPT_GRACE)
                return run, why
            if outcome == "dead":
                return run, "dead"
            await self.restart()
            return run, f"{why}_restarted"
        finally:
            self._resume_reader()

    async def _interrupt_within_grace(self, run: runner.CellRun, silent: bool) -> str:
        """Interrupt ``run`` and keep gathering it for INTERRUPT_GRACE: ``done`` (state kept),
        ``dead``, or ``deadline`` (it ignored the interrupt)."""
        assert self.kc is not None
        # - ipykernel ignores SIGINT outside a message handler: the interrupt waits for the
        #   cell's execute_input (published inside the handler), so a cancel that comes right
        #   after the call's turn is not dropped.
        # - Even then ipykernel loses an early interrupt now and then (seen with a bare
        #   ipykernel 7.4: about 1 in 10 sent at once); one the kernel shows no sign of
        #   (no error, reply or idle) within INTERRUPT_REPEAT of its interrupt_reply (the
        #   kernel has signalled itself by then) is sent again.
        # - Every interrupt_reply is read before the call ends, so that a repeated interrupt
        #   cannot land in the session's next cell.
        # - A second SIGINT while the kernel formats the first one's traceback escapes IPython:
        #   ipykernel swallows it and goes idle without a reply. Idle without a reply is then
        #   an interrupted cell, not a stuck kernel.
        grace = time.monotonic() + INTERRUPT_GRACE
        outcome = "deadline"
        if not silent and not run.started:
            outcome = await runner.gather(
                self.kc, run, deadline=grace, is_alive=self.is_alive, stop=lambda: run.started
            )
            outcome = "deadline" if outcome == "stopped" else outcome
        while outcome == "deadline" and time.monotonic() < grace:
            try:
                await self.km.interrupt_kernel()
            except Exception:  # noqa: BLE001 - a failed interrupt just means we restart
                log.warning("interrupt failed", exc_info=True)
            await self.km.settle_interrupts(grace - time.monotonic())
            outcome = await runner.gather(
                self.kc,
                run,
                deadline=min(grace, time.monotonic() + INTERRUPT_REPEAT),
                is_alive=self.is_alive,
                stop=lambda: run.reacted,
            )
            if outcome == "stopped" and not run.idle:
                outcome = await runner.gather(
                    self.kc, run, deadline=grace, is_alive=self.is_alive, stop=lambda: run.idle
                )
        if outcome == "stopped":
            # Idle for this cell: its reply, if there is one, was sent before.
            outcome = await runner.gather(
                self.kc, run, deadline=time.monotonic() + REPLY_AFTER_IDLE, is_alive=self.is_alive
            )
            if outcome == "deadline":
                run.interrupted_unanswered()
                outcome = "done"
        return outcome

    async def interrupt(self) -> None:
        await self.km.interrupt_kernel()

    async def restart(self) -> None:
        """A fresh kernel process in the same directories; the old state is gone.

        Raises KernelStartError (the old process gone either way) when the new one fails."""
        self._unwatch()
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        self.exit = None
        self.died = False
        self.execution_state = None
        self.km.forget_interrupts()
        try:
            await self.km.restart_kernel(now=True)
            await self._connect()
        except Exception as exc:
            detail = await self._log_tail()
            raise KernelStartError(f"kernel failed to restart: {exc}{detail}") from exc
        self._watch()

    async def shutdown(self) -> None:
        self._unwatch()
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        try:
            if self.km.has_kernel:
                # Also removes the connection file and ipc sockets.
                await self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - shutting down must not fail the caller
            log.warning("kernel shutdown failed", exc_info=True)
