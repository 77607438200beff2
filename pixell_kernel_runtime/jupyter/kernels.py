"""The Jupyter Server REST API over the session kernels: /api, kernelspecs, kernels.

What jupyter_server's ``GatewayClient`` (``jupyter server --gateway-url=...``) and Kernel
Gateway clients call, with their status codes (201 for a started kernel, 204 for a delete or an
interrupt). Errors keep the runtime's envelope: its ``message`` is what the gateway client
reports. Every route needs the ``attach`` scope and acts in the caller's tenant.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import quote

from pixell_kernel_runtime import __version__
from pixell_kernel_runtime.api.base import BaseHandler, Field
from pixell_kernel_runtime.api.invoke_request import SESSION_ID_RE
from pixell_kernel_runtime.errors import NotFound, RuntimeAPIError, ValidationFailed
from pixell_kernel_runtime.jupyter import models
from pixell_kernel_runtime.jupyter.channels import connections
from pixell_kernel_runtime.sessions.session import Session, session_key

# The env name a client sets to open (or join) the session of its choice; any other
# ``KERNEL_*`` the gateway client sends is accepted and ignored (a kernel's environment is the
# package's and the operator's, never a client's).
SESSION_ENV = "KERNEL_PIXELL_SESSION_ID"
NEW_SESSION_PREFIX = "jupyter-"
_ATTACH = "attach"


def model(session: Session) -> dict[str, Any]:
    return models.kernel_model(session, connections(session.kernel_id))


class APIVersionHandler(BaseHandler):
    route = "/api"
    scopes = {"GET": _ATTACH}

    def get(self) -> None:
        self.write_json({"version": __version__})


class KernelSpecsHandler(BaseHandler):
    route = "/api/kernelspecs"
    scopes = {"GET": _ATTACH}

    def get(self) -> None:
        self.write_json(models.kernelspecs(self.runtime, self.principal))


class KernelSpecHandler(BaseHandler):
    route = "/api/kernelspecs/{kernel_name}"
    scopes = {"GET": _ATTACH}

    def get(self, name: str) -> None:
        package = models.find_package(self.runtime, name, self.principal)
        self.write_json(models.kernelspec(package))


class KernelSpecResourceHandler(BaseHandler):
    route = "/kernelspecs/{kernel_name}/{resource}"
    scopes = {"GET": _ATTACH}

    async def get(self, name: str, resource: str) -> None:
        models.find_package(self.runtime, name, self.principal)
        data = await asyncio.to_thread(models.read_resource, resource)
        if data is None:
            raise NotFound(f"No resource {resource} for kernelspec {name}", code="no_resource")
        self.set_header("Content-Type", models.RESOURCES[resource])
        self.set_header("Cache-Control", "max-age=3600")
        self.finish(data)


class KernelsHandler(BaseHandler):
    route = "/api/kernels"
    scopes = {"GET": _ATTACH, "POST": _ATTACH}

    def get(self) -> None:
        found = [
            s
            for s in self.runtime.sessions.list(self.tenant())
            if not s.closed and models.may_use(self.runtime, s.package, self.principal)
        ]
        self.write_json([model(s) for s in found])

    async def post(self) -> None:
        body = self.json_body({"name": Field(str), "env": Field(dict), "path": Field(str)})
        name = body.get("name")
        if name is None:
            specs = models.packages(self.runtime, self.principal)
            if not specs:
                raise NotFound("No kernelspec: no package is loaded", code="kernelspec_not_found")
            package = specs[0]
        else:
            package = models.find_package(self.runtime, name, self.principal)
        tenant = self.tenant()
        session_id = self._session_id(body.get("env") or {}, package.id, tenant)
        sessions = self.runtime.sessions
        fresh = all(s.key != session_key(package.id, session_id) for s in sessions.list(tenant))
        session = await sessions.session_for(package, session_id, None, tenant)
        try:
            async with sessions.turn(session):
                await sessions.ensure_kernel(session)
        except RuntimeAPIError:
            if fresh and not session.closed:  # a kernel that never started leaves no session
                await sessions.delete(session.key, tenant)
            raise
        self.set_header("Location", f"/api/kernels/{quote(session.kernel_id)}")
        self.write_json(model(session), status=201)

    def _session_id(self, env: dict[str, Any], package_id: str, tenant: str) -> str:
        for key, value in env.items():
            if not isinstance(value, str):
                raise ValidationFailed(
                    [
                        {
                            "loc": ["body", "env", key],
                            "msg": "must be a string",
                            "type": "type_error.str",
                        }
                    ]
                )
        chosen = env.get(SESSION_ENV)
        if chosen:
            if not SESSION_ID_RE.fullmatch(chosen):
                raise ValidationFailed(
                    [
                        {
                            "loc": ["body", "env", SESSION_ENV],
                            "msg": "must be 1-128 characters of letters, digits and ._@:+=-",
                            "type": "value_error",
                        }
                    ]
                )
            return chosen
        taken = {s.key for s in self.runtime.sessions.list(tenant)}
        while True:
            candidate = f"{NEW_SESSION_PREFIX}{uuid.uuid4().hex[:8]}"
            if session_key(package_id, candidate) not in taken:
                return candidate


class _OneKernel(BaseHandler):
    def _session(self, kernel_id: str) -> Session:
        return models.find_session(self.runtime, kernel_id, self.tenant(), self.principal)


class KernelHandler(_OneKernel):
    route = "/api/kernels/{kernel_id}"
    scopes = {"GET": _ATTACH, "DELETE": _ATTACH}

    def get(self, kernel_id: str) -> None:
        self.write_json(model(self._session(kernel_id)))

    async def delete(self, kernel_id: str) -> None:
        session = self._session(kernel_id)
        await self.runtime.sessions.delete(session.key, self.tenant())
        self.set_status(204)
        self.finish()


class InterruptHandler(_OneKernel):
    route = "/api/kernels/{kernel_id}/interrupt"
    scopes = {"POST": _ATTACH}

    async def post(self, kernel_id: str) -> None:
        session = self._session(kernel_id)
        await self.runtime.sessions.interrupt(session.key, self.tenant())
        self.set_status(204)
        self.finish()


class RestartHandler(_OneKernel):
    route = "/api/kernels/{kernel_id}/restart"
    scopes = {"POST": _ATTACH}

    async def post(self, kernel_id: str) -> None:
        session = self._session(kernel_id)
        # In its turn, as the sessions API's restart: after the cell that runs, if one does.
        await self.runtime.sessions.restart(session.key, self.tenant())
        self.write_json(model(session))
