"""Per-agent roles: the operator's access policy, narrowed further by a manifest.

``ACCESS_POLICY`` (YAML, or JSON by its name) maps globs on package or agent ids to the roles
that may use them (any one of them is enough)::

    roles:
      "finance-*": [analyst, finance]
      "*/code-executor": [developer]

Every rule whose glob matches must be satisfied, and a manifest's ``role_required`` adds one
more requirement: it can only narrow access, never widen it. A principal that fails gets 404
for that agent, as for a private one. Administrators, and every request when authentication is
off, pass.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from .principal import Principal


class AccessPolicyError(ValueError):
    pass


class AccessPolicy:
    def __init__(self, rules: list[tuple[str, frozenset[str]]] | None = None) -> None:
        self.rules = rules or []

    @classmethod
    def load(cls, path: Path | None) -> AccessPolicy:
        if path is None:
            return cls()
        text = Path(path).read_text(encoding="utf-8")
        doc = (json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)) or {}
        raw = doc.get("roles", {}) if isinstance(doc, dict) else None
        if not isinstance(raw, dict):
            raise AccessPolicyError(f"{path}: expected a mapping 'roles: {{glob: [role, ...]}}'")
        rules = []
        for glob, roles in raw.items():
            names = [roles] if isinstance(roles, str) else roles
            if (
                not isinstance(names, list)
                or not names
                or not all(isinstance(r, str) and r for r in names)
            ):
                raise AccessPolicyError(f"{path}: roles for {glob!r} must be a name or a list")
            rules.append((str(glob), frozenset(names)))
        return cls(rules)

    def allows(
        self,
        principal: Principal | None,
        *,
        agent_id: str,
        package_id: str,
        manifest_roles: Iterable[str] = (),
    ) -> bool:
        if principal is None or principal.via == "open" or principal.admin:
            return True
        for glob, roles in self.rules:
            hit = fnmatch.fnmatchcase(agent_id, glob) or fnmatch.fnmatchcase(package_id, glob)
            if hit and not principal.roles & roles:
                return False
        required = frozenset(manifest_roles)
        return not required or bool(principal.roles & required)
