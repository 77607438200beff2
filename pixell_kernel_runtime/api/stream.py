"""``/runtime/agents/{id}/stream``: an invoke's events over a websocket.

The client sends one text message: an invoke body (``{"input", "context", "trace_id"}``), or
``{"execution_id", "after"}`` to follow a call already running (a resume). The server answers
each event as ``{"seq", "event", "data"}`` (the same events as SSE) and closes after ``done``.
A refusal is one ``{"event": "error", "data": <the error envelope>}`` and a close.
"""

from __future__ import annotations

import asyncio
from typing import Any

import tornado.iostream
import tornado.websocket

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.api.agents import callable_agent, start_invoke
from pixell_kernel_runtime.api.base import json_text, parse_json
from pixell_kernel_runtime.api.ws import WebSocketBase
from pixell_kernel_runtime.errors import RuntimeAPIError, ValidationFailed
from pixell_kernel_runtime.execution.record import Execution


def _invalid(msg: str) -> ValidationFailed:
    return ValidationFailed([{"loc": ["message"], "msg": msg, "type": "value_error"}])


class StreamSocket(WebSocketBase):
    route = "/runtime/agents/{id}/stream"
    scopes = {"GET": "invoke"}

    def open(self, agent_id: str) -> None:  # type: ignore[override]
        super().open()
        self.agent_id = agent_id
        self._task: asyncio.Task[None] | None = None

    def on_message(self, message: str | bytes) -> None:
        if self._task is not None:
            return  # one call per connection: later messages are ignored
        self._task = asyncio.ensure_future(self._serve(message))

    async def _serve(self, message: str | bytes) -> None:
        try:
            execution, after = await self._begin(message)
        except RuntimeAPIError as exc:
            env = {"error": exc.kind, "message": exc.message, "code": exc.code}
            if exc.details is not None:
                env["details"] = exc.details
            await self._send({"seq": 0, "event": "error", "data": {**env, "status": exc.status}})
            self.close(1008 if exc.status < 500 else 1011, exc.code[:100])
            return
        keepalive = self.runtime.settings.sse_keepalive_seconds
        stream: Any = execution.follow(after, keepalive)
        try:
            async for event in stream:
                if event.kind == "keepalive":
                    self.ping()
                    continue
                await self._send(event.to_json())
        except tornado.websocket.WebSocketClosedError:
            return  # the reader left; the execution runs on
        finally:
            await stream.aclose()
        self.close(1000)

    async def _send(self, doc: dict[str, Any]) -> None:
        # Awaited, so a slow reader holds one message here and falls behind in the log.
        text = json_text(doc)
        try:
            await self.write_message(text)
            metrics.STREAM_BYTES.labels("websocket").inc(len(text))
        except tornado.iostream.StreamClosedError:
            raise tornado.websocket.WebSocketClosedError() from None

    async def _begin(self, message: str | bytes) -> tuple[Execution, int]:
        raw = message.encode() if isinstance(message, str) else message
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise _invalid("the message must be a JSON object")
        if "execution_id" in body:
            after = body.get("after", 0)
            if not isinstance(body["execution_id"], str) or not isinstance(after, int):
                raise _invalid("execution_id must be a string and after an integer")
            return self.runtime.executions.get(body["execution_id"], self.tenant()), after
        agent = callable_agent(self.runtime, self.agent_id, self.principal)
        for name, kind in (("input", dict), ("context", dict), ("trace_id", str)):
            if body.get(name) is not None and not isinstance(body[name], kind):
                raise _invalid(f"{name} must be {'an object' if kind is dict else 'a string'}")
        execution, _ = await start_invoke(self, agent, body)
        return execution, 0

    def on_close(self) -> None:
        pass  # the call is not cancelled: POST /runtime/executions/{id}/cancel does that
