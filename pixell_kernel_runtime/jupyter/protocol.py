"""Jupyter messages on a channels websocket: the legacy JSON protocol and the v1 binary one.

Legacy: one JSON text message per Jupyter message, its channel under ``"channel"`` (what
jupyter_server's gateway client speaks); a message with buffers travels as a binary frame
(a big-endian count and offsets, the JSON, then the buffers). v1
(``v1.kernel.websocket.jupyter.org``): binary frames of little-endian 64-bit offsets, the
channel name, then header, parent header, metadata, content and buffers, each packed JSON.

What a client sends is bounded by the websocket's message size and checked here before it
reaches a kernel; what a kernel sends arrives parsed (or as a stub) from execution/wire.py.
"""

from __future__ import annotations

import json
import struct
from itertools import pairwise
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from pixell_kernel_runtime.api.base import parse_json
from pixell_kernel_runtime.errors import RuntimeAPIError

V1 = "v1.kernel.websocket.jupyter.org"
# Where a client may send (iopub is the kernel's broadcast: nothing goes to it).
CLIENT_CHANNELS = ("shell", "control", "stdin")
CHANNELS = ("shell", "control", "stdin", "iopub")
# Parts of a message a client may send: the four dicts and at most this many buffers.
MAX_BUFFERS = 64
# The fields of a kernel message a client is sent (not the runtime's own measures).
_FIELDS = ("header", "msg_id", "msg_type", "parent_header", "metadata", "content", "buffers")


class ProtocolError(ValueError):
    """A client message that cannot be a Jupyter message (it is dropped, and logged)."""


def _dicts(msg: dict[str, Any]) -> dict[str, Any]:
    header = msg.get("header")
    if not isinstance(header, dict):
        raise ProtocolError("the header is not an object")
    if not isinstance(header.get("msg_id"), str) or not header["msg_id"]:
        raise ProtocolError("the header has no msg_id")
    if not isinstance(header.get("msg_type"), str) or not header["msg_type"]:
        raise ProtocolError("the header has no msg_type")
    out = {"header": header}
    for name in ("parent_header", "metadata", "content"):
        value = msg.get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ProtocolError(f"the {name} is not an object")
        out[name] = value
    out["msg_id"] = header["msg_id"]
    out["msg_type"] = header["msg_type"]
    return out


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = parse_json(raw)
    except RuntimeAPIError as exc:
        raise ProtocolError(exc.message) from None
    if not isinstance(doc, dict):
        raise ProtocolError("not a JSON object")
    return doc


def _legacy_binary(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    if len(data) < 8:
        raise ProtocolError("a binary message too short for its offsets")
    (count,) = struct.unpack("!I", data[:4])
    if not 1 <= count <= MAX_BUFFERS + 1 or len(data) < 4 * (count + 1):
        raise ProtocolError("bad buffer count")
    offsets = list(struct.unpack(f"!{count}I", data[4 : 4 * (count + 1)])) + [len(data)]
    if offsets[0] != 4 * (count + 1) or any(a > b for a, b in pairwise(offsets)):
        raise ProtocolError("bad buffer offsets")
    parts = [data[a:b] for a, b in pairwise(offsets)]
    return _json_object(parts[0]), parts[1:]


def _v1_frames(data: bytes) -> tuple[str, list[bytes]]:
    if len(data) < 8:
        raise ProtocolError("a v1 message too short for its offsets")
    count = int.from_bytes(data[:8], "little")
    # The channel and at least the four message parts.
    if not 6 <= count <= MAX_BUFFERS + 6 or len(data) < 8 * (count + 1):
        raise ProtocolError("bad offset count")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    if offsets[0] != 8 * (count + 1) or offsets[-1] != len(data):
        raise ProtocolError("bad offsets")
    if any(a > b for a, b in pairwise(offsets)):
        raise ProtocolError("offsets out of order")
    try:
        channel = data[offsets[0] : offsets[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("the channel is not UTF-8") from None
    return channel, [data[a:b] for a, b in pairwise(offsets[1:])]


def from_client(message: str | bytes, subprotocol: str | None) -> tuple[str, dict[str, Any]]:
    """A websocket message as (channel, message dict ready for ``Session.send``)."""
    if subprotocol == V1:
        if not isinstance(message, bytes):
            raise ProtocolError("v1 messages are binary")
        channel, parts = _v1_frames(message)
        names = ("header", "parent_header", "metadata", "content")
        msg = {name: _json_object(part) for name, part in zip(names, parts[:4], strict=True)}
        buffers = parts[4:]
    elif isinstance(message, bytes):
        msg, buffers = _legacy_binary(message)
        channel = msg.get("channel")
    else:
        msg = _json_object(message.encode("utf-8", "surrogatepass"))
        buffers = []
        channel = msg.get("channel")
    if channel is None:
        channel = "shell"  # as jupyter_server: a message without one goes to shell
    if channel not in CLIENT_CHANNELS:
        raise ProtocolError(f"no channel {channel!r} to send to")
    out = _dicts(msg)
    out["buffers"] = buffers
    return channel, out


def _legacy_text(doc: dict[str, Any]) -> str:
    # As jupyter_server writes it; "</" escaped so that no client pasting it into HTML ends
    # a <script> early.
    return json.dumps(doc, default=json_default, ensure_ascii=False).replace("</", "<\\/")


def to_client(msg: dict[str, Any], channel: str, subprotocol: str | None, pack: Any) -> str | bytes:
    """A kernel message (or one the runtime made) in the connection's protocol. Costs one
    JSON serialisation of the message: big ones are encoded off the event loop."""
    clean = {k: msg.get(k) for k in _FIELDS}
    buffers = [bytes(b) for b in clean.pop("buffers") or []]
    for name in ("header", "parent_header", "metadata", "content"):
        if not isinstance(clean[name], dict):
            clean[name] = {}
    if subprotocol == V1:
        parts = [pack(clean[name]) for name in ("header", "parent_header", "metadata", "content")]
        return v1_frame(channel, [*parts, *buffers])
    clean["channel"] = channel
    if not buffers:
        return _legacy_text(clean)
    head = json.dumps(clean, default=json_default, ensure_ascii=False).encode("utf-8")
    chunks = [head, *buffers]
    offsets = [4 * (len(chunks) + 1)]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"!{len(chunks) + 1}I", len(chunks), *offsets) + b"".join(chunks)


def v1_frame(channel: str, parts: list[bytes]) -> bytes:
    name = channel.encode("utf-8")
    offsets = [8 * (len(parts) + 3)]
    offsets.append(offsets[0] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + name + b"".join(parts)


# ---- messages the runtime writes itself ----------------------------------------------------


def status(session: Session, state: str, parent: dict[str, Any] | None = None) -> dict[str, Any]:
    return session.msg("status", {"execution_state": state}, parent=parent or {})


def refused_cell(
    session: Session, request: dict[str, Any], ename: str, evalue: str
) -> list[tuple[str, dict[str, Any]]]:
    """What a kernel would send for a cell that fails at once (channel, message): the queue
    was full, or no kernel could be started. The client's cell ends with this error."""
    parent = request["header"]
    error = {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]}
    reply = {"status": "error", "execution_count": None, **error}
    return [
        ("iopub", status(session, "busy", parent)),
        ("iopub", session.msg("error", error, parent=parent)),
        ("shell", session.msg("execute_reply", reply, parent=parent)),
        ("iopub", status(session, "idle", parent)),
    ]


def aborted_cell(session: Session, request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A cell queued behind one that failed with ``stop_on_error``, as ipykernel answers it."""
    parent = request["header"]
    return [
        ("iopub", status(session, "busy", parent)),
        ("shell", session.msg("execute_reply", {"status": "aborted"}, parent=parent)),
        ("iopub", status(session, "idle", parent)),
    ]


def dropped_notice(session: Session, msg: dict[str, Any], channel: str) -> dict[str, Any]:
    """What the client gets for a kernel message too big to parse: on iopub, a note on the
    cell's stderr; a reply keeps its (verified) headers, with an error as its content."""
    kind = msg.get("msg_type") or "message"
    reason = f"a {kind} message of {msg.get('wire_bytes', '?')} bytes was not parsed: "
    reason += str(msg.get("dropped"))
    parent = msg.get("parent_header") if isinstance(msg.get("parent_header"), dict) else {}
    if channel == "iopub":
        text = f"[pixell-kernel-runtime: {reason}]\n"
        return session.msg("stream", {"name": "stderr", "text": text}, parent=parent)
    content = {"status": "error", "ename": "MessageTooLarge", "evalue": reason, "traceback": []}
    return {**msg, "content": content}
