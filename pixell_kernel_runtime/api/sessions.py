"""/runtime/sessions: list, inspect, delete, interrupt, restart, variables."""

from __future__ import annotations

from pixell_kernel_runtime.api.base import BaseHandler


class SessionsHandler(BaseHandler):
    route = "/runtime/sessions"
    scopes = {"GET": "sessions"}

    def get(self) -> None:
        host = self.can_see_host()
        sessions = self.runtime.sessions.list(self.listing_tenant())
        self.write_json({"sessions": [s.summary(host=host) for s in sessions]})


class SessionHandler(BaseHandler):
    route = "/runtime/sessions/{id}"
    scopes = {"GET": "sessions", "DELETE": "sessions"}

    def get(self, key: str) -> None:
        session = self.runtime.sessions.get(key, self.tenant())
        self.write_json(session.summary(host=self.can_see_host()))

    async def delete(self, key: str) -> None:
        await self.runtime.sessions.delete(key, self.tenant())
        self.write_json({"status": "success", "id": key, "deleted": True})


class InterruptHandler(BaseHandler):
    route = "/runtime/sessions/{id}/interrupt"
    scopes = {"POST": "sessions"}

    async def post(self, key: str) -> None:
        await self.runtime.sessions.interrupt(key, self.tenant())
        self.write_json({"status": "success", "id": key, "interrupted": True})


class RestartHandler(BaseHandler):
    route = "/runtime/sessions/{id}/restart"
    scopes = {"POST": "sessions"}

    async def post(self, key: str) -> None:
        await self.runtime.sessions.restart(key, self.tenant())
        self.write_json({"status": "success", "id": key, "restarted": True})


class VariablesHandler(BaseHandler):
    route = "/runtime/sessions/{id}/variables"
    scopes = {"GET": "sessions"}

    async def get(self, key: str) -> None:
        variables = await self.runtime.sessions.variables(key, self.tenant())
        self.write_json({"id": key, "variables": variables})
