"""Kernel messages as hostile data: measured before parsing, big ones parsed off the loop.

jupyter_client's channels ``json.loads`` every message on the event loop as it arrives. Here
the channel takes the raw frames and measures them first. A message over ``MESSAGE_LIMIT``
bytes, or that may hold more than ``MESSAGE_VALUES_LIMIT`` JSON values, is never parsed: the
caller gets a stub with its (signed) header and parent header, its size and the reason, and
``content = {}``. Messages over ``INLINE_BYTES`` are parsed in a worker thread; small ones
inline, since a warm call is a few milliseconds and a thread hop would show in it.

A thread is not enough by itself: ``json.loads`` holds the GIL for its whole run, so a 16 MiB
``[{}, {}, ...]`` stalled the loop 1.4 s even from a thread. Its cost is in the number of
values, not in bytes (a flat 16 MiB string parses in ~16 ms), hence the second limit, counted
as an upper bound (every ``,`` ``[`` ``{``) with three ``bytes.count`` passes.

Every message gets ``wire_bytes`` (the sum of its frames, buffers included) and
``wire_values`` so that the runner's caps count whole messages.

Use :class:`BoundedKernelClient` as the kernel manager's ``client_class``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from queue import Empty
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.adapter import adapt
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.session import Session
from traitlets import Type

log = logging.getLogger(__name__)

# Above this a message is dropped unparsed (a legit one holds at most a big figure or page).
MESSAGE_LIMIT = 8 * 1024 * 1024
# ... or above this many JSON values: at most ~50 ms holding the GIL and ~20 MB of objects.
MESSAGE_VALUES_LIMIT = 500_000
# Up to this a message is parsed on the loop (what a warm call's messages weigh).
INLINE_BYTES = 64 * 1024
# A dropped message's header and parent header are read only up to this size each.
HEADER_LIMIT = 64 * 1024
_DELIM = b"<IDS|MSG>"
# A status broadcast is ~30 bytes of content; :func:`broadcast_state` reads nothing bigger.
STATUS_CONTENT_BYTES = 256
KERNEL_STATES = ("busy", "idle", "starting")
# How many dropped or invalid messages a channel logs before it goes quiet about them.
_LOGGED = 5

# Parsing is GIL-bound, so two workers are plenty; ours, so file work elsewhere never waits.
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pixell-wire")

Frame = zmq.Frame | bytes
# Plain ints: pyzmq's enum members cost an enum operation on every use, on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


def _raw(frame: Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def count_values(parts: list[bytes]) -> int:
    """At least as many JSON values as the parts can hold once parsed (strings count too)."""
    return sum(p.count(b",") + p.count(b"[") + p.count(b"{") for p in parts)


def _split(frames: list[Frame]) -> list[Frame]:
    """The message parts after the routing identities (jupyter_client's feed_identities,
    without copying every frame to compare it)."""
    for i, frame in enumerate(frames):
        if len(frame) == len(_DELIM) and _raw(frame) == _DELIM:
            parts = frames[i + 1 :]
            if len(parts) < 5:
                raise ValueError(f"malformed message: {len(parts)} parts after the delimiter")
            return parts
    raise ValueError("malformed message: no delimiter")


def broadcast_state(frames: list[Frame]) -> str | None:
    """``busy``/``idle``/``starting`` from one unparsed iopub message, if it is a status
    broadcast.

    Only the topic and a tiny content frame are read: the rest of the message (the kernel's
    to forge) is never parsed, nor its signature checked; a forged status only misleads the
    culler about its own kernel."""
    if not frames or not _raw(frames[0]).endswith(b".status"):
        return None
    try:
        content = _split(frames)[4]
    except ValueError:
        return None
    if len(content) > STATUS_CONTENT_BYTES:
        return None
    try:
        state = json.loads(_raw(content)).get("execution_state")
    except (ValueError, AttributeError):
        return None
    return state if state in KERNEL_STATES else None


def _verify(session: Session, parts: list[Frame]) -> None:
    """The signature check of ``Session.deserialize``, for a message that is not parsed (its
    big frames are signed in place, never copied)."""
    _check_signature(session, [_raw(parts[0]), *parts[1:5]])


def _check_signature(session: Session, head: list[Any]) -> None:
    """``head``: the signature (bytes), then the four signed parts (bytes or frames)."""
    if session.auth is None:
        return
    signature = head[0]
    if not signature:
        raise ValueError("unsigned message")
    if signature in session.digest_history:
        raise ValueError("duplicate signature")
    session._add_digest(signature)
    if not hmac.compare_digest(signature, session.sign(head[1:5])):
        raise ValueError("invalid signature")


def _deserialize(session: Session, head: list[bytes], rest: list[Frame]) -> dict[str, Any]:
    """``Session.deserialize`` (the same signature, replay and shape checks) without turning
    the headers' dates into datetimes: that took a third of its time, and nothing here reads
    them (they stay ISO strings)."""
    _check_signature(session, head)
    header = session.unpack(head[1])
    message = {
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": header["msg_type"],
        "parent_header": session.unpack(head[2]),
        "metadata": session.unpack(head[3]),
        "content": session.unpack(head[4]),
        "buffers": [memoryview(_raw(b)) for b in rest],
    }
    return adapt(message)


def _small_dict(session: Session, frame: Frame) -> dict[str, Any]:
    if len(frame) > HEADER_LIMIT:
        return {}
    value = session.unpack(_raw(frame))
    return value if isinstance(value, dict) else {}


def _stub(header: dict[str, Any], parent: dict[str, Any], **extra: Any) -> dict[str, Any]:
    msg_type = header.get("msg_type")
    return {
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": msg_type if isinstance(msg_type, str) else "",
        "parent_header": parent,
        "metadata": {},
        "content": {},
        "buffers": [],
        **extra,
    }


def _dropped(
    session: Session,
    parts: list[Any],
    header: Any,
    parent: Any,
    wire: int,
    values: int | None,
    reason: str,
) -> dict[str, Any]:
    """A signature-checked message too big to parse: its headers only, and why."""
    _verify(session, parts)
    return _stub(
        _small_dict(session, header),
        _small_dict(session, parent),
        wire_bytes=wire,
        wire_values=values,
        dropped=reason,
    )


def parse(session: Session, frames: list[Frame]) -> dict[str, Any]:
    """One received message as jupyter_client's dict, or a stub; never raises.

    A stub carries ``dropped`` (a reason: too big, too many values) with the verified header
    and parent header, or ``invalid`` (malformed, bad signature) with empty headers.
    """
    wire = sum(len(frame) for frame in frames)
    try:
        parts = _split(frames)
        if wire > MESSAGE_LIMIT:
            reason = f"{wire} bytes, over the {MESSAGE_LIMIT}-byte message limit"
            return _dropped(session, parts, parts[1], parts[2], wire, None, reason)
        head = [_raw(p) for p in parts[:5]]
        values = count_values(head[1:])
        if values > MESSAGE_VALUES_LIMIT:
            reason = f"up to {values} JSON values, over the {MESSAGE_VALUES_LIMIT}-value limit"
            return _dropped(session, parts, head[1], head[2], wire, values, reason)
        msg = _deserialize(session, head, parts[5:])
    except Exception as exc:  # noqa: BLE001 - whatever the kernel sent, the caller gets a dict
        return _stub({}, {}, wire_bytes=wire, wire_values=None, invalid=f"{exc}"[:200])
    msg["wire_bytes"] = wire
    msg["wire_values"] = values
    return msg


class Readable:
    """Waits until a zmq socket has a message, for a reader that takes it with the blocking
    API and ``NOBLOCK`` (a shadow of an asyncio socket will do).

    pyzmq's own ``poll`` builds a poller, three futures and their callbacks per wait, and
    handles the file descriptor for every socket it serves; that and its ``recv`` futures
    were a fifth of a warm call's server CPU. Here a wait is one future, one timer and the
    event loop's reader on the socket's descriptor, registered only while someone waits.
    The descriptor is edge-triggered (it signals libzmq's commands, not messages), so every
    wait first asks the socket's ``EVENTS``, which is exact and clears the descriptor: after
    that, a new message always signals it again.

    The socket must not also be awaited through pyzmq's asyncio API (both would register the
    same descriptor). ``close()`` before the socket closes; waiters then see False.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock: zmq.Socket | None = sock
        self._fd: int = sock.FD
        self._waiters: set[asyncio.Future[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def ready(self) -> bool:
        return self._sock is not None and bool(self._sock.get(_EVENTS) & _POLLIN)

    def _wake(self) -> None:
        if self.ready():
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(True)

    async def wait(self, timeout: float | None) -> bool:
        """True once a message can be taken, False after ``timeout`` seconds (None: no limit)
        or when closed."""
        return self.ready() or await self.signalled(timeout)

    async def signalled(self, timeout: float | None) -> bool:
        """:meth:`wait`, for a caller that has just seen ``ready()`` False."""
        if self._sock is None or timeout is not None and timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        if not self._waiters:
            loop.add_reader(self._fd, self._wake)
            self._loop = loop
        self._waiters.add(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.discard(waiter)
            if not self._waiters:
                self._unregister()

    def _unregister(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._fd)

    def close(self) -> None:
        self._sock = None
        self._unregister()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class BoundedChannel(AsyncZMQSocketChannel):
    """A channel whose messages are measured first and parsed by :func:`parse`."""

    def __init__(self, socket: zmq.asyncio.Socket, session: Session, loop: Any = None) -> None:
        super().__init__(socket, session, loop)
        # The same libzmq socket, blocking API: a message already queued is taken without a
        # future, and a wait is a :class:`Readable`'s.
        self._now: zmq.Socket | None = zmq.Socket.shadow(socket.underlying)
        self._readable = Readable(self._now)
        # A big message's parse, kept when the waiter was cancelled so it is not lost.
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._complaints = 0
        # Told the execution_state of every status message this channel parses.
        self.status_listener: Callable[[str], None] | None = None

    @property
    def readable(self) -> Readable:
        return self._readable

    def take_unparsed(self) -> list[Frame] | None:
        """The next queued message's frames, not parsed nor checked (None: none queued, or
        closed); never waits."""
        if self._now is None:
            return None
        try:
            return self._now.recv_multipart(_NOBLOCK, copy=False)
        except zmq.Again:
            return None

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        if self._pending is None:
            # Asked first: a recv that finds nothing raises, which costs twice as much.
            if not self._readable.ready() and not await self._readable.signalled(timeout):
                raise Empty
            frames = self.take_unparsed()
            if frames is None:  # closed meanwhile, or taken by another reader
                raise Empty
            if sum(len(frame) for frame in frames) <= INLINE_BYTES:
                return self._checked(parse(self.session, frames))
            loop = asyncio.get_running_loop()
            self._pending = loop.run_in_executor(_PARSER, parse, self.session, frames)
        pending = self._pending
        try:
            msg = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending = None
        return self._checked(msg)

    def queued(self) -> bool:
        """A message can be had without waiting for the kernel: on the socket, or one taken
        whose parse (off the loop) a cancelled reader left behind."""
        return self._pending is not None or self._readable.ready()

    async def msg_ready(self) -> bool:  # type: ignore[override]
        return self.queued()

    def close(self) -> None:
        # The shadow must never touch the socket once libzmq has closed it.
        self._readable.close()
        self._now = None
        super().close()

    def _checked(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.status_listener is not None and msg["msg_type"] == "status":
            content = msg["content"]
            state = content.get("execution_state") if isinstance(content, dict) else None
            if state in KERNEL_STATES:
                self.status_listener(state)
        reason = msg.get("invalid") or msg.get("dropped")
        if reason:
            self._complaints += 1
            if self._complaints <= _LOGGED:
                kind = "invalid" if "invalid" in msg else f"{msg['msg_type'] or 'unknown'}"
                log.warning("kernel message (%s) dropped unparsed: %s", kind, reason)
        return msg


class BoundedKernelClient(AsyncKernelClient):
    """An AsyncKernelClient whose every channel reads messages through :func:`parse`."""

    shell_channel_class = Type(BoundedChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(BoundedChannel)  # type: ignore[assignment]
    stdin_channel_class = Type(BoundedChannel)  # type: ignore[assignment]
    control_channel_class = Type(BoundedChannel)  # type: ignore[assignment]
