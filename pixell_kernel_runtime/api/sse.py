"""Server-Sent Events from an execution's log: what a streaming invoke and a resume answer.

Each event is written and flushed as the log gets it; the writer awaits each flush, so a slow
reader holds at most one event in the server's buffers and falls behind in the log (where it
then meets a ``gap`` event), never slowing the call. A reader that leaves ends only its own
stream: the execution runs on.
"""

from __future__ import annotations

from typing import Any

import tornado.iostream
import tornado.web

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.api.base import json_text
from pixell_kernel_runtime.errors import ValidationFailed
from pixell_kernel_runtime.execution.record import Event, Execution


def last_event_id(handler: tornado.web.RequestHandler) -> int:
    """Where a reader resumes: ``Last-Event-ID`` (what browsers send), else ``?after=``."""
    raw = handler.request.headers.get("Last-Event-ID") or handler.get_query_argument("after", "")
    raw = raw.strip()
    if not raw:
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise ValidationFailed(
            [
                {
                    "loc": ["header", "Last-Event-ID"],
                    "msg": "must be an event id (a non-negative integer) this stream sent",
                    "type": "value_error",
                }
            ]
        )
    return int(raw)


def frame(event: Event) -> str:
    """One event in the text/event-stream format (a comment line for a keepalive)."""
    if event.kind == "keepalive":
        return ": keepalive\n\n"
    # A gap has no seq of its own: its id is the last one it skips, so a resume goes past it.
    ident = event.seq or int(event.data.get("to", 0))
    return f"id: {ident}\nevent: {event.kind}\ndata: {json_text(event.data)}\n\n"


def wants_stream(handler: tornado.web.RequestHandler, default: bool) -> bool:
    """``?stream=true|false`` first, then ``Accept``; ``default`` for ``*/*`` or none."""
    asked = handler.get_query_argument("stream", "").strip().lower()
    if asked in ("1", "true", "yes"):
        return True
    if asked in ("0", "false", "no"):
        return False
    accept = handler.request.headers.get("Accept", "")
    if "text/event-stream" in accept:
        return True
    if "application/json" in accept:
        return False
    return default


async def send(
    handler: tornado.web.RequestHandler, execution: Execution, *, after: int, keepalive: float
) -> None:
    """Answer ``execution``'s events after ``after`` until its ``done``, as SSE."""
    handler.set_status(200)
    handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
    handler.set_header("Cache-Control", "no-store")
    handler.set_header("X-Accel-Buffering", "no")  # proxies: do not buffer the stream
    handler.set_header("X-Execution-Id", execution.id)
    stream: Any = execution.follow(after, keepalive)
    try:
        handler.write(": stream of execution " + execution.id + "\n\n")
        await handler.flush()
        async for event in stream:
            chunk = frame(event).encode()
            handler.write(chunk)
            await handler.flush()
            metrics.STREAM_BYTES.labels("sse").inc(len(chunk))
    except tornado.iostream.StreamClosedError:
        return  # the reader left; the execution runs on, and can be resumed
    finally:
        await stream.aclose()
    handler.finish()
