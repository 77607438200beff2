"""What the Jupyter kernels API says about packages and sessions: kernelspecs and kernel models.

A kernelspec is a loaded package: starting it opens a fresh session of that package. Its name
is the package id in the characters Jupyter allows in kernel names (``[\\w.\\-%]+``): package
names hold no ``.``, so ``name@version`` becomes ``name.version`` without ambiguity, and the one
other character a version may hold, ``+``, is percent-encoded. A kernel is a session, under the
session's ``kernel_id`` (a UUID: jupyter_server's routes take only ids of that shape).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote

from pixell_kernel_runtime.agents import Agent
from pixell_kernel_runtime.auth import Principal
from pixell_kernel_runtime.errors import NotFound
from pixell_kernel_runtime.packages.store import InstalledPackage
from pixell_kernel_runtime.sessions.session import Session

# Kernelspec resources are IPython's logos from the installed ipykernel (read-only package
# data of the server's environment, never a path a kernel can write), by a fixed list of names.
RESOURCES = {
    "logo-32x32.png": "image/png",
    "logo-64x64.png": "image/png",
    "logo-svg.svg": "image/svg+xml",
}
# A resource file is read once, and never more than this (ipykernel's are a few kB).
RESOURCE_BYTES = 256 * 1024
_resource_cache: dict[str, bytes | None] = {}


def kernel_name(package_id: str) -> str:
    """The kernelspec name of a package: ``name@version`` -> ``name.version``."""
    name, _, version = package_id.partition("@")
    return f"{name}.{version.replace('+', '%2B')}"


def iso(ts: float) -> str:
    """Jupyter's timestamp format, exactly (the gateway client parses it with strptime)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def may_use(runtime: Any, package: InstalledPackage, principal: Principal | None) -> bool:
    """A kernel runs any code in the package's session: the principal must be allowed every
    one of the package's agents (the access policy and the manifest's roles)."""
    return all(
        runtime.agents.allowed(Agent(package, export), principal)
        for export in package.manifest.exports
    )


def packages(runtime: Any, principal: Principal | None) -> list[InstalledPackage]:
    """The packages the principal may start kernels of, in the store's order."""
    return [p for p in runtime.store.list() if may_use(runtime, p, principal)]


def find_package(runtime: Any, name: str, principal: Principal | None) -> InstalledPackage:
    """The package of a kernelspec name; one the principal may not use is not found."""
    for package in packages(runtime, principal):
        spec = kernel_name(package.id)
        # Clients differ in how many times they escape a name's %: both forms are accepted.
        if name in (spec, unquote(spec)):
            return package
    raise NotFound(f"No such kernelspec: {name}", code="kernelspec_not_found")


def find_session(runtime: Any, kernel_id: str, tenant: str, principal: Principal | None) -> Session:
    """The session of a kernel id, in the caller's tenant and of a package they may use."""
    session = runtime.sessions.by_kernel_id(kernel_id, tenant)
    if not may_use(runtime, session.package, principal):
        raise NotFound(f"Kernel does not exist: {kernel_id}", code="kernel_not_found")
    return session


def kernelspec(package: InstalledPackage, base_url: str = "/") -> dict[str, Any]:
    manifest = package.manifest
    name = kernel_name(package.id)
    where = f"{base_url.rstrip('/')}/kernelspecs/{quote(name, safe='')}"
    return {
        "name": name,
        "spec": {
            # Nothing to launch from this spec on a client's host: the runtime starts the
            # kernel, sandboxed, when the spec is started through this API.
            "argv": [],
            "env": {},
            "display_name": f"{manifest.display_name or manifest.name} {manifest.version}",
            "language": "python",
            "interrupt_mode": "message",
            "metadata": {
                "debugger": False,
                "pixell": {
                    "package_id": package.id,
                    "name": manifest.name,
                    "version": manifest.version,
                    "description": manifest.description,
                },
            },
        },
        "resources": {file.rsplit(".", 1)[0]: f"{where}/{file}" for file in RESOURCES},
    }


def kernelspecs(runtime: Any, principal: Principal | None) -> dict[str, Any]:
    found = packages(runtime, principal)
    return {
        "default": kernel_name(found[0].id) if found else None,
        "kernelspecs": {kernel_name(p.id): kernelspec(p) for p in found},
    }


def read_resource(file: str) -> bytes | None:
    """An allowed resource's bytes (call it off the event loop), or None when it has none."""
    if file not in RESOURCES:
        return None
    if file not in _resource_cache:
        try:
            with resources.files("ipykernel").joinpath("resources", file).open("rb") as fh:
                data = fh.read(RESOURCE_BYTES + 1)
        except (ModuleNotFoundError, OSError):
            data = None
        _resource_cache[file] = data if data is not None and len(data) <= RESOURCE_BYTES else None
    return _resource_cache[file]


def execution_state(session: Session) -> str:
    """Jupyter's execution_state: starting, idle, busy or dead."""
    kernel = session.kernel
    if session.closed or (kernel is not None and kernel.died):
        return "dead"
    if kernel is None:
        # The runtime starts kernels when they are needed: only one that died says so.
        return "dead" if session.ended else "starting"
    state = kernel.execution_state
    return state if state in ("starting", "idle", "busy") else "idle"


def kernel_model(session: Session, connections: int) -> dict[str, Any]:
    return {
        "id": session.kernel_id,
        "name": kernel_name(session.package.id),
        "last_activity": iso(session.last_active()),
        "execution_state": execution_state(session),
        "connections": connections,
        # Which session this kernel is (the runtime's REST API names it by ``session``).
        "pixell": {
            "session": session.key,
            "session_id": session.session_id,
            "package_id": session.package.id,
        },
    }
