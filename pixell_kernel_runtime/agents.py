"""The registry of exports, and the package operations that must reach sessions too.

An agent is one export of one installed package: ``name@version/<export>``.
Agents are derived from the store on every look-up, never copied, so the two
cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.auth.access import AccessPolicy
from pixell_kernel_runtime.auth.principal import Principal
from pixell_kernel_runtime.errors import NotFound
from pixell_kernel_runtime.packages.manifest import Export
from pixell_kernel_runtime.packages.store import InstalledPackage, InstallResult, PackageStore


class PackageSessions(Protocol):
    """What package operations need from the session layer."""

    async def shutdown_package(self, package_id: str) -> int: ...

    def package_loaded(self, package: InstalledPackage) -> None: ...


@dataclass(frozen=True)
class Agent:
    package: InstalledPackage
    export: Export

    @property
    def id(self) -> str:
        return f"{self.package.id}/{self.export.name}"

    @property
    def private(self) -> bool:
        return not self.export.public

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package_id": self.package.id,
            "name": self.export.name,
            "description": self.export.description or self.package.manifest.description,
            "status": "ready",
            "private": self.private,
            "kind": self.export.kind,
            "capabilities": list(self.export.capabilities or self.package.manifest.capabilities),
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "version": self.package.manifest.version,
            "display_name": self.package.manifest.display_name,
            "endpoint": self.export.endpoint,
            "handler": f"{self.export.module}:{self.export.function}"
            if self.export.module
            else None,
        }


class Agents:
    """Looks agents up and coordinates package changes with live sessions."""

    def __init__(
        self,
        store: PackageStore,
        sessions: PackageSessions | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.access = access or AccessPolicy()

    def allowed(self, agent: Agent, principal: Principal | None) -> bool:
        return self.access.allows(
            principal,
            agent_id=agent.id,
            package_id=agent.package.id,
            manifest_roles=getattr(agent.package.manifest, "role_required", ()) or (),
        )

    def list(self, principal: Principal | None = None) -> list[Agent]:
        every = [Agent(pkg, export) for pkg in self.store.list() for export in pkg.manifest.exports]
        return [a for a in every if self.allowed(a, principal)]

    def get(self, agent_id: str, principal: Principal | None = None) -> Agent:
        """An agent the principal may not use is not found, exactly as a missing one."""
        package_id, sep, export_name = agent_id.rpartition("/")
        pkg = self.store.find(package_id) if sep else None
        if pkg is not None:
            for export in pkg.manifest.exports:
                if export.name == export_name:
                    agent = Agent(pkg, export)
                    if self.allowed(agent, principal):
                        return agent
        raise NotFound(f"Agent not found: {agent_id}", code="agent_not_found")

    async def load(
        self, path: Path, *, sha256: str | None, source: str, use_sidecar: bool = False
    ) -> InstallResult:
        try:
            result = await self.store.install(
                path, sha256=sha256, source=source, use_sidecar=use_sidecar
            )
        except Exception:
            metrics.PACKAGE_LOADS.labels("refused").inc()
            raise
        metrics.PACKAGE_LOADS.labels(result.status).inc()
        if result.previous is not None:
            # The old code must not keep running under the replaced id.
            await self._retire(result.previous)
        if self.sessions is not None:
            self.sessions.package_loaded(result.package)
        return result

    async def unload(self, package_id: str) -> InstalledPackage:
        pkg = await self.store.unload(package_id)
        await self._retire(pkg)
        return pkg

    async def _retire(self, pkg: InstalledPackage) -> None:
        if self.sessions is not None:
            await self.sessions.shutdown_package(pkg.id)
        await self.store.discard(pkg)
