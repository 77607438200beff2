"""/runtime/sessions: list, inspect, delete, interrupt, restart, variables."""

from __future__ import annotations

from pixell_kernel_runtime.api.base import BaseHandler


class SessionsHandler(BaseHandler):
    route = "/runtime/sessions"

    def get(self) -> None:
        self.write_json({"sessions": [s.summary() for s in self.runtime.sessions.list()]})


class SessionHandler(BaseHandler):
    route = "/runtime/sessions/{id}"

    def get(self, key: str) -> None:
        self.write_json(self.runtime.sessions.get(key).summary())

    async def delete(self, key: str) -> None:
        await self.runtime.sessions.delete(key)
        self.write_json({"status": "success", "id": key, "deleted": True})


class InterruptHandler(BaseHandler):
    route = "/runtime/sessions/{id}/interrupt"

    async def post(self, key: str) -> None:
        await self.runtime.sessions.interrupt(key)
        self.write_json({"status": "success", "id": key, "interrupted": True})


class RestartHandler(BaseHandler):
    route = "/runtime/sessions/{id}/restart"

    async def post(self, key: str) -> None:
        await self.runtime.sessions.restart(key)
        self.write_json({"status": "success", "id": key, "restarted": True})


class VariablesHandler(BaseHandler):
    route = "/runtime/sessions/{id}/variables"

    async def get(self, key: str) -> None:
        variables = await self.runtime.sessions.variables(key)
        self.write_json({"id": key, "variables": variables})
