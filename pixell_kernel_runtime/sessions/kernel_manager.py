"""How the server holds one kernel through jupyter_client: the manager (interrupts counted
and acknowledged), the bounded zmq context, the death watch, how a kernel ended."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.ioloop.restarter import AsyncIOLoopKernelRestarter
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session
from traitlets import default

# What one kernel can make the server hold: libzmq queues whole messages on the receiving
# side, by default 1000 of any size, so a cell printing 10 MB chunks in a loop grew the server
# by gigabytes. Ordinary programs are capped in the kernel (kernel_side's output budget); code
# that bypasses that meets these: past MAXMSGSIZE a connection is dropped (the message is
# lost, not buffered), past RCVHWM the kernel's side drops. At worst 16 x 16 MiB per socket.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
RECEIVE_QUEUE_MESSAGES = 16
# Signatures a kernel's Session remembers against replayed messages. jupyter_client's 65536
# grow by ~150 bytes a message to ~10 MiB for each busy session; the kernel holds the key and
# can forge any message anyway, so only a replay of a recent one is worth refusing.
DIGEST_HISTORY = 256
# Replies read before an interrupt is sent (a bound: a kernel could flood its control socket).
READY_REPLIES_READ = 1000


@cache
def bounded_context() -> zmq.asyncio.Context:
    ctx = zmq.asyncio.Context()
    ctx.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    ctx.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_MESSAGES)
    return ctx


@dataclass
class Exit:
    """How a kernel process ended."""

    code: int | None
    signal: int | None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            hint = (
                " (out of memory, or killed from outside)" if self.signal == signal.SIGKILL else ""
            )
            if self.signal == signal.SIGXCPU:
                hint = " (CPU time limit)"
            return f"the kernel was killed by {name}{hint}"
        if self.code is not None:
            return f"the kernel exited with code {self.code}"
        return "the kernel died"

    def to_json(self) -> dict[str, Any]:
        name = None
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = None
        return {"exit_code": self.code, "signal": self.signal, "signal_name": name}


def exit_from_returncode(rc: int | None) -> Exit:
    if rc is None:
        return Exit(None, None)
    if rc < 0:
        return Exit(None, -rc)
    # bwrap and shells report a child's death by signal as 128 + signal.
    if rc > 128 and rc - 128 < 65:
        return Exit(rc, rc - 128)
    return Exit(rc, None)


class DeathWatch(AsyncIOLoopKernelRestarter):  # type: ignore[misc]
    """jupyter_client's restarter with autorestart off: on death it only says so, once."""

    async def poll(self) -> None:  # type: ignore[override]
        km = self.kernel_manager
        if km.shutting_down or await km.is_alive():
            return
        self.stop()
        self._fire_callbacks("dead")


class SessionKernelManager(AsyncKernelManager):  # type: ignore[misc]
    """A kernel manager that carries its session's sandbox, for the ``SandboxProvisioner``."""

    sandbox: Any = None
    sandbox_session: Any = None

    # interrupt_requests sent on the control socket whose interrupt_reply has not been read.
    unanswered_interrupts: int = 0

    @default("session")
    def _session_default(self) -> Session:
        # The client's Session is a clone: it inherits the bound.
        return Session(parent=self, digest_history_size=DIGEST_HISTORY)

    async def interrupt_kernel(self) -> None:
        # Surfaces that never settle (a notebook's cancel) still read what has come back.
        await self._read_ready_replies()
        await super().interrupt_kernel()
        if self.kernel_spec is not None and self.kernel_spec.interrupt_mode == "message":
            self.unanswered_interrupts += 1

    async def settle_interrupts(self, timeout: float) -> bool:
        """Read the replies of the interrupts sent so far (False if they did not all come
        within ``timeout``). A reply means the kernel has signalled itself: no interrupt
        still on its way can hit a later cell. jupyter_client never reads them, and unread
        they pile up in libzmq (some 13 KiB an interrupt). Only counted, never parsed."""
        deadline = time.monotonic() + timeout
        sock = self._control_socket
        while self.unanswered_interrupts > 0:
            left = deadline - time.monotonic()
            if sock is None or left <= 0 or not await sock.poll(int(left * 1000)):
                # Not waited for again by every later call; a late reply counts for a newer
                # interrupt.
                self.unanswered_interrupts = 0
                return False
            await sock.recv_multipart(copy=False)
            self.unanswered_interrupts -= 1
        return True

    async def _read_ready_replies(self) -> None:
        """Read, without waiting, the replies already there (late ones included)."""
        sock = self._control_socket
        for _ in range(READY_REPLIES_READ):
            if sock is None or not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            await sock.recv_multipart(copy=False)
            self.unanswered_interrupts = max(0, self.unanswered_interrupts - 1)

    def forget_interrupts(self) -> None:
        """A restart closes the control socket, and the replies with it."""
        self.unanswered_interrupts = 0
