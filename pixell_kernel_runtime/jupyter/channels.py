"""``/api/kernels/{id}/channels``: a Jupyter channels websocket onto a session's kernel.

Each connection has its own kernel client (its own zmq identity, the session's key) on the
session's live kernel, from the kernel manager with the runtime's bounded zmq context and
``BoundedKernelClient``: kernel messages are size-capped and big ones parsed off the loop before
anything here reads them. Client messages are checked (protocol.py) and re-signed; shell ones go
through cells.py (the session's FIFO turns), control and stdin ones straight to the kernel.
Kernel messages go to the client as they come, and feed the running cell's execution record.

A client that reads slowly costs bounded memory: past ``SLOW_BYTES`` unsent, iopub output is
dropped for it (and it is told how much), past ``CLOSE_BYTES`` the connection is closed.
A kernel replaced under the session (a restart, a death) is followed: the client sees
``restarting``, then the new kernel; a dead one is started again, as jupyter_server's restarter
does, at most ``MAX_AUTO_STARTS`` times a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any

import tornado.websocket
import zmq
from jupyter_client.session import Session as JupyterSession

from pixell_kernel_runtime.api.ws import WebSocketBase
from pixell_kernel_runtime.errors import RuntimeAPIError
from pixell_kernel_runtime.execution import wire
from pixell_kernel_runtime.jupyter import models, protocol
from pixell_kernel_runtime.jupyter.cells import CellQueue
from pixell_kernel_runtime.sessions.kernel_manager import bounded_context
from pixell_kernel_runtime.sessions.session import Session

log = logging.getLogger(__name__)

# Open channels websockets per kernel id (what a kernel model's ``connections`` counts).
OPEN: dict[str, set[ChannelsHandler]] = {}
# Tasks that outlive their connection (a cell that still runs after the client left).
_LINGERING: set[asyncio.Task[None]] = set()

SLOW_BYTES = 16 * 1024 * 1024
CLOSE_BYTES = 64 * 1024 * 1024
WATCH_SECONDS = 0.25
NUDGE_SECONDS = 0.5
NUDGE_TIMEOUT = 10.0
MAX_AUTO_STARTS = 3


def connections(kernel_id: str) -> int:
    return len(OPEN.get(kernel_id, ()))


class ChannelsHandler(WebSocketBase):
    route = "/api/kernels/{kernel_id}/channels"
    scopes = {"GET": "attach"}

    session: Session
    kc: Any = None
    kernel: Any = None
    generation = -1
    _closed = False
    _cells: CellQueue | None = None

    # ---- the upgrade ---------------------------------------------------------------------

    async def get(self, kernel_id: str, *args: Any, **kwargs: Any) -> None:
        self.session = models.find_session(self.runtime, kernel_id, self.tenant(), self.principal)
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise RuntimeAPIError(
                "this is a websocket: send an Upgrade: websocket request",
                status=400,
                kind="BadRequest",
                code="websocket_required",
            )
        kernel = self.session.kernel
        if kernel is None or kernel.died:
            sessions = self.runtime.sessions
            async with sessions.turn(self.session):
                await sessions.ensure_kernel(self.session)
        await super().get(kernel_id, *args, **kwargs)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # None is the legacy JSON protocol (what jupyter_server's gateway client asks for).
        return protocol.V1 if protocol.V1 in subprotocols else None

    async def open(self, kernel_id: str) -> None:  # type: ignore[override]
        super().open()
        self.subject = self.principal.subject if self.principal else "anonymous"
        self.bound = asyncio.Event()
        self._bind_lock = asyncio.Lock()
        self._readers: list[asyncio.Task[None]] = []
        self._nudges: set[str] = set()
        self._nudged = asyncio.Event()
        self._unsent = 0
        self._dropped: dict[str, Any] | None = None
        self._jsession: JupyterSession | None = None
        OPEN.setdefault(self.session.kernel_id, set()).add(self)
        self._cells = CellQueue(self)
        self._watcher = asyncio.create_task(self._watch())
        if self.session.kernel is not None:
            await self.bind()

    # ---- binding to the session's kernel -------------------------------------------------

    @property
    def jsession(self) -> JupyterSession:
        if self._jsession is None:
            self._jsession = JupyterSession(session=str(uuid.uuid4()))
        return self._jsession

    async def bind(self) -> None:
        """Point this connection's kernel client at the session's kernel, if it changed."""
        async with self._bind_lock:
            kernel = self.session.kernel
            if kernel is None:
                return
            if kernel is self.kernel and self.generation == self.session.generation:
                return
            self.unbind()
            session = kernel.km.session.clone()
            # Its own zmq identity: a kernel's ROUTER refuses a second peer under one name.
            session.session = str(uuid.uuid4())
            kc = kernel.km.client(context=bounded_context(), session=session)
            kc.start_channels(shell=True, iopub=True, stdin=True, hb=False, control=True)
            for name in protocol.CLIENT_CHANNELS:
                # Session.send sends on a blocking shadow of the socket: a kernel that stopped
                # reading would block the server at the queue's bound. Refused, and said so.
                getattr(kc, f"{name}_channel").socket.setsockopt(zmq.SNDTIMEO, 0)
            self.kc, self.kernel, self.generation = kc, kernel, self.session.generation
            self._jsession = session
            self._readers = [
                asyncio.create_task(self._read(kc, name)) for name in protocol.CHANNELS
            ]
            await self._nudge(kc)
            self.bound.set()

    def unbind(self) -> None:
        """Let the kernel client go (a dead kernel's: the next one binds the same paths)."""
        self.bound.clear()
        for task in self._readers:
            task.cancel()
        self._readers = []
        kc, self.kc, self.kernel = self.kc, None, None
        if kc is not None:
            kc.stop_channels()

    async def _nudge(self, kc: Any) -> None:
        """Until an iopub message arrives, this client's subscription may not be in place and a
        cell's idle status could pass it by: ask (on control, so a busy kernel answers too)."""
        self._nudges.clear()
        self._nudged.clear()
        deadline = time.monotonic() + NUDGE_TIMEOUT
        while not self._nudged.is_set():
            if time.monotonic() > deadline:
                log.warning("session %s: no iopub message to a new client", self.session.key)
                return
            msg = kc.session.msg("kernel_info_request")
            self._nudges.add(msg["header"]["msg_id"])
            with contextlib.suppress(zmq.ZMQError):
                kc.control_channel.send(msg)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), NUDGE_SECONDS)

    # ---- client -> kernel ------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        # A coroutine: tornado reads the next message only once this one is through, so a big
        # one parsed in a thread keeps its place in line.
        parse = functools.partial(protocol.from_client, message, self.selected_subprotocol)
        try:
            if len(message) > wire.INLINE_BYTES:
                channel, msg = await asyncio.to_thread(parse)
            else:
                channel, msg = parse()
        except protocol.ProtocolError as exc:
            log.info("session %s: a client message was dropped: %s", self.session.key, exc)
            return
        assert self._cells is not None
        if channel == "shell":
            self._cells.put(msg)
            return
        if channel == "stdin":
            self._cells.input_answered()
        self.send_to_kernel(channel, msg)

    def send_to_kernel(self, channel: str, msg: dict[str, Any]) -> bool:
        if self.kc is None:
            log.info("session %s: no kernel for a %s message", self.session.key, channel)
            return False
        # Session.send signs it with this client's key; the client's header (msg_id) stays.
        try:
            getattr(self.kc, f"{channel}_channel").send(msg)
        except zmq.ZMQError as exc:  # the kernel does not read, or a rebind closed the channel
            log.warning("session %s: a %s message was not sent: %s", self.session.key, channel, exc)
            return False
        return True

    # ---- kernel -> client ------------------------------------------------------------------

    async def _read(self, kc: Any, name: str) -> None:
        channel = getattr(kc, f"{name}_channel")
        try:
            while True:
                msg = await channel.get_msg()
                if "invalid" in msg:
                    continue  # unsigned or malformed: the channel logged it
                if name == "iopub":
                    self._nudged.set()
                parent = msg.get("parent_header")
                if isinstance(parent, dict) and parent.get("msg_id") in self._nudges:
                    continue
                if self._cells is not None:
                    self._cells.feed(name, msg)
                if not self._closed:
                    await self._forward(name, msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken channel ends the connection, not the server
            log.exception("session %s: reading %s failed", self.session.key, name)
            if not self._closed:
                self.close(1011, "kernel channel failed")

    async def _forward(self, channel: str, msg: dict[str, Any]) -> None:
        if "dropped" in msg:
            msg = protocol.dropped_notice(self.jsession, msg, channel)
        elif channel == "iopub" and self._unsent > SLOW_BYTES and msg.get("msg_type") != "status":
            self._note_dropped(msg)
            return
        if self._dropped is not None and self._unsent < SLOW_BYTES // 2:
            self._write(self._encode(self._dropped_notice(), "iopub"))
        if (msg.get("wire_bytes") or 0) > wire.INLINE_BYTES:
            data = await asyncio.to_thread(self._encode, msg, channel)
        else:
            data = self._encode(msg, channel)
        self._write(data)

    def _encode(self, msg: dict[str, Any], channel: str) -> str | bytes:
        return protocol.to_client(msg, channel, self.selected_subprotocol, self.jsession.pack)

    def _note_dropped(self, msg: dict[str, Any]) -> None:
        dropped = self._dropped or {"count": 0, "bytes": 0}
        dropped["count"] += 1
        dropped["bytes"] += msg.get("wire_bytes") or 0
        dropped["parent"] = msg.get("parent_header") or {}
        self._dropped = dropped

    def _dropped_notice(self) -> dict[str, Any]:
        dropped, self._dropped = self._dropped or {}, None
        text = (
            f"[pixell-kernel-runtime: {dropped.get('count')} output messages "
            f"({dropped.get('bytes')} bytes) were not sent here: this client read too slowly]\n"
        )
        parent = dropped.get("parent") or {}
        return self.jsession.msg("stream", {"name": "stderr", "text": text}, parent=parent)

    def _write(self, data: str | bytes) -> None:
        if self._closed:
            return
        try:
            done = self.write_message(data, binary=isinstance(data, bytes))
        except tornado.websocket.WebSocketClosedError:
            return
        size = len(data)
        self._unsent += size
        done.add_done_callback(functools.partial(self._written, size))
        if self._unsent > CLOSE_BYTES:
            log.warning("session %s: closing a client that does not read", self.session.key)
            self.close(1008, "the client does not read its messages")

    def _written(self, size: int, done: asyncio.Future[None]) -> None:
        self._unsent -= size
        if not done.cancelled():
            done.exception()  # a closed connection: nothing to do, nothing to log

    def send_synthetic(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        for channel, msg in messages:
            self._write(self._encode(msg, channel))

    def _status(self, state: str) -> None:
        self.send_synthetic([("iopub", protocol.status(self.jsession, state))])

    # ---- following the session's kernel ----------------------------------------------------

    async def _watch(self) -> None:
        starts = 0
        try:
            while not self._closed:
                await asyncio.sleep(WATCH_SECONDS)
                if self.session.closed:
                    self._status("dead")
                    self.close(1001, "the session was closed")
                    return
                kernel = self.session.kernel
                if kernel is not None and not kernel.died:
                    if kernel is not self.kernel or self.generation != self.session.generation:
                        self._status("restarting")
                        await self.bind()
                        self._status("idle")
                    continue
                if self._cells is not None and self._cells.running:
                    continue  # the cell notices the death, ends its record, then its turn
                self.unbind()
                starts += 1
                if starts > MAX_AUTO_STARTS or not await self._start_again():
                    self._status("dead")
                    self.close(1011, "the kernel died")
                    return
        except Exception:  # noqa: BLE001 - the watcher's failure ends this connection only
            log.exception("session %s: following the kernel failed", self.session.key)
            self.close(1011, "internal error")

    async def _start_again(self) -> bool:
        """The kernel died: a new one (in a turn, as any call starts one), then bind to it."""
        self._status("restarting")
        sessions = self.runtime.sessions
        try:
            async with sessions.turn(self.session):
                await sessions.ensure_kernel(self.session)
                await self.bind()
        except RuntimeAPIError as exc:
            log.warning("session %s: no new kernel: %s", self.session.key, exc.message)
            return False
        self._status("idle")
        return True

    # ---- closing ---------------------------------------------------------------------------

    def on_close(self) -> None:
        self._closed = True
        if not hasattr(self, "_watcher"):
            return  # it closed before open() set it up: there is nothing to let go
        OPEN.get(self.session.kernel_id, set()).discard(self)
        if not OPEN.get(self.session.kernel_id):
            OPEN.pop(self.session.kernel_id, None)
        self._watcher.cancel()
        running = self._cells.close() if self._cells is not None else []
        task = asyncio.create_task(self._teardown(running))
        _LINGERING.add(task)
        task.add_done_callback(_LINGERING.discard)

    async def _teardown(self, running: list[asyncio.Task[None]]) -> None:
        # A cell that was sent keeps reading its kernel's messages until it ends (its idle, its
        # kernel's death or the session's end bound the wait); then the client goes.
        await asyncio.gather(*running, return_exceptions=True)
        self.unbind()
