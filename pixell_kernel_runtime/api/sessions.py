"""/runtime/sessions: list, inspect, delete, interrupt, restart, variables, connection info,
notebook export."""

from __future__ import annotations

import asyncio
from typing import Any

from pixell_kernel_runtime.api.base import BaseHandler
from pixell_kernel_runtime.errors import Conflict
from pixell_kernel_runtime.execution import notebook


class SessionsHandler(BaseHandler):
    route = "/runtime/sessions"
    scopes = {"GET": "sessions"}

    def get(self) -> None:
        host = self.can_see_host()
        sessions = self.runtime.sessions.list(self.listing_tenant())
        idle = self.runtime.settings.session_idle_seconds
        self.write_json({"sessions": [s.summary(host=host, idle_limit=idle) for s in sessions]})


class SessionHandler(BaseHandler):
    route = "/runtime/sessions/{id}"
    scopes = {"GET": "sessions", "DELETE": "sessions"}

    def get(self, key: str) -> None:
        session = self.runtime.sessions.get(key, self.tenant())
        idle = self.runtime.settings.session_idle_seconds
        self.write_json(session.summary(host=self.can_see_host(), idle_limit=idle))

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


_SOCKETS = ("shell", "iopub", "stdin", "control", "hb")


def connection_info(km: Any) -> dict[str, Any]:
    """What a Jupyter client needs to attach, from the kernel manager's memory.

    Never read back from the connection file: the server wrote it, but it is the runtime's own
    record (``km``) that says which sockets the server itself connects to."""
    info = km.get_connection_info(session=False)
    key = info.get("key", b"")
    return {
        "transport": info["transport"],
        "ip": info["ip"],
        **{f"{name}_port": int(info[f"{name}_port"]) for name in _SOCKETS},
        "key": key.decode("ascii") if isinstance(key, bytes) else str(key),
        "signature_scheme": info["signature_scheme"],
        "kernel_name": km.kernel_name,
    }


def socket_paths(connection: dict[str, Any]) -> dict[str, str] | None:
    """The ipc socket paths (``<ip>-<port>``, as zmq names them), for ipc transports."""
    if connection["transport"] != "ipc":
        return None
    return {name: f"{connection['ip']}-{connection[f'{name}_port']}" for name in _SOCKETS}


class ConnectionHandler(BaseHandler):
    """A session kernel's connection info (``jupyter console --existing`` and any Jupyter
    client on this host): the attach scope, since it carries the kernel's signing key."""

    route = "/runtime/sessions/{id}/connection"
    scopes = {"GET": "attach"}

    async def get(self, key: str) -> None:
        session = self.runtime.sessions.get(key, self.tenant())
        kernel = session.kernel
        if kernel is None or kernel.died or not await kernel.is_alive():
            raise Conflict(
                f"session {key} has no running kernel (POST /runtime/sessions/{{id}}/restart"
                " starts one)",
                code="no_kernel",
            )
        connection = connection_info(kernel.km)
        self.write_json(
            {
                "id": session.key,
                "kernel_id": session.kernel_id,
                "connection": connection,
                "paths": socket_paths(connection),
            }
        )


class NotebookHandler(BaseHandler):
    """The session's executed cells and their outputs as a .ipynb (execution/notebook.py)."""

    route = "/runtime/sessions/{id}/notebook"
    scopes = {"GET": "sessions"}

    async def get(self, key: str) -> None:
        tenant = self.tenant()
        session = self.runtime.sessions.get(key, tenant)
        export = notebook.collect(session, self.runtime.executions.for_session(tenant, session.key))
        # Building and validating is CPU work on kernel output (up to the export's cap).
        body = await asyncio.to_thread(notebook.render, export)
        self.set_header("Content-Type", notebook.MEDIA_TYPE)
        self.set_header("Content-Disposition", f'attachment; filename="{export.filename}"')
        self.finish(body)
