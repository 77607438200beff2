"""/runtime/executions: a call's state and answer, its events (resumable), its cancel."""

from __future__ import annotations

from pixell_kernel_runtime.api import sse
from pixell_kernel_runtime.api.base import BaseHandler
from pixell_kernel_runtime.errors import Conflict


class ExecutionHandler(BaseHandler):
    route = "/runtime/executions/{id}"
    scopes = {"GET": "invoke"}

    def get(self, execution_id: str) -> None:
        execution = self.runtime.executions.get(execution_id, self.tenant())
        self.write_json(execution.summary())


class EventsHandler(BaseHandler):
    route = "/runtime/executions/{id}/events"
    scopes = {"GET": "invoke"}

    async def get(self, execution_id: str) -> None:
        execution = self.runtime.executions.get(execution_id, self.tenant())
        after = sse.last_event_id(self)
        await sse.send(
            self, execution, after=after, keepalive=self.runtime.settings.sse_keepalive_seconds
        )


class CancelHandler(BaseHandler):
    route = "/runtime/executions/{id}/cancel"
    scopes = {"POST": "invoke"}

    async def post(self, execution_id: str) -> None:
        execution = self.runtime.executions.get(execution_id, self.tenant())
        if not await execution.cancel():
            raise Conflict(
                f"execution {execution_id} has already finished ({execution.state})",
                code="execution_finished",
            )
        self.write_json(
            {"id": execution.id, "state": execution.state, "cancel_requested": True}, status=202
        )
