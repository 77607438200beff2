"""agent.yaml -> a typed Manifest with its exports, for every producer variant.

Producers seen in the wild: pixell-kit 0.4.12, pixell-sdk 0.5.4 (sub_agents
lost in re-serialisation), old kit, and hand-zipped packages like the original
runtime's own (top-level ``version``, ``runtime: {python: ">=3.8"}`` and
``exports`` with dotted handlers). docs/apkg-format.md describes what is
accepted. Package code is never imported here: whether a module exists is
judged from the archive's file list alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from pixell_kernel_runtime.errors import PackageError
from pixell_kernel_runtime.packages.dotenv import ENV_KEY_RE, expand_env, parse_dotenv
from pixell_kernel_runtime.packages.fields import (
    parse_runtime,
    parse_target,
    require_module,
    str_field,
    str_list,
)

CODE_EXECUTOR = "code-executor"
HANDLER = "handler"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
_EXPORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Export:
    name: str
    description: str
    kind: str  # CODE_EXECUTOR | HANDLER
    public: bool
    capabilities: tuple[str, ...]
    # For handlers: the module and function called inside the session kernel.
    module: str | None = None
    function: str | None = None
    endpoint: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "public": self.public,
            "capabilities": list(self.capabilities),
            "endpoint": self.endpoint,
            "handler": f"{self.module}:{self.function}" if self.module else None,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    display_name: str
    description: str
    author: str | None
    license: str | None
    runtime: str | None
    entrypoint: str | None
    capabilities: tuple[str, ...]
    environment: dict[str, str]
    dependencies: tuple[str, ...]
    exports: tuple[Export, ...]
    producer: str
    resource_tier: int | None = None
    warnings: tuple[str, ...] = field(default=())
    # Roles a caller needs (any one) besides the operator's policy: it can only narrow access.
    role_required: tuple[str, ...] = ()

    @property
    def package_id(self) -> str:
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "display_name": self.display_name,
            "description": self.description,
            "author": self.author,
            "license": self.license,
            "runtime": self.runtime,
            "entrypoint": self.entrypoint,
            "capabilities": list(self.capabilities),
            "dependencies": list(self.dependencies),
            "environment_keys": sorted(self.environment),
            "resource_tier": self.resource_tier,
            "role_required": list(self.role_required),
            "producer": self.producer,
            "exports": [e.summary() for e in self.exports],
        }


def _producer(package_json: bytes | None, names: set[str]) -> str:
    """Who built the archive, for the record (nothing depends on it)."""
    if package_json is not None:
        try:
            meta = json.loads(package_json)
        except ValueError:
            meta = None
        created_by = meta.get("created_by") if isinstance(meta, dict) else None
        manifest = meta.get("manifest") if isinstance(meta, dict) else None
        # pixell-sdk 0.5.4 writes created_by "pixell-kit" too. The kit (0.4.12) dumps every field
        # of its schema into the copy, unset ones as null; the sdk leaves unset fields out.
        if created_by == "pixell-kit" and isinstance(manifest, dict):
            metadata = manifest.get("metadata")
            values = [
                *manifest.values(),
                *(metadata.values() if isinstance(metadata, dict) else ()),
            ]
            if None not in values:
                return "pixell-sdk"
        if isinstance(created_by, str) and created_by:
            return created_by
        return "pixell-kit"
    if "setup.py" in names or any(n.startswith("dist/") for n in names):
        return "pixell-kit"
    return "hand-made"


def parse_manifest(
    data: bytes,
    names: set[str],
    *,
    dotenv: bytes | None = None,
    package_json: bytes | None = None,
) -> Manifest:
    """Parse agent.yaml bytes, given the set of file names in the archive."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise PackageError("agent.yaml is too large", code="invalid_manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageError(
            f"agent.yaml is not valid UTF-8 (byte {exc.start})", code="invalid_manifest"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise PackageError(
            f"agent.yaml cannot be parsed{where}: {reason}", code="invalid_manifest"
        ) from None
    if not isinstance(doc, dict):
        raise PackageError(
            f"agent.yaml must be a mapping, got {type(doc).__name__}", code="invalid_manifest"
        )
    warnings: list[str] = []

    name = str_field(doc, "name")
    if not name:
        raise PackageError("agent.yaml field name is missing", code="invalid_manifest")
    if not _NAME_RE.match(name):
        raise PackageError(
            f"agent.yaml field name is invalid: {name!r} (letters, digits, '-' and '_' only,"
            " starting with a letter or digit)",
            code="invalid_manifest",
        )

    metadata = doc.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise PackageError("agent.yaml field metadata must be a mapping", code="invalid_manifest")
    version = str_field(metadata, "version", where="metadata.") or str_field(doc, "version")
    if not version:
        raise PackageError(
            "agent.yaml has no version (metadata.version or version)", code="invalid_manifest"
        )
    if not _VERSION_RE.match(version) or ".." in version:
        raise PackageError(
            f"agent.yaml version is invalid: {version!r} (letters, digits, '.', '+', '-', '_')",
            code="invalid_manifest",
        )

    runtime = parse_runtime(doc.get("runtime"), warnings)

    entrypoint = str_field(doc, "entrypoint")
    entry_target: tuple[str, str] | None = None
    if entrypoint:
        entry_target = parse_target(entrypoint, field_name="entrypoint")
        require_module(entry_target[0], names, field_name="entrypoint")

    capabilities = str_list(doc.get("capabilities"), field_name="capabilities")
    dependencies = str_list(doc.get("dependencies"), field_name="dependencies")
    if dependencies:
        warnings.append(
            "dependencies are not installed by the runtime; kernels use what the host provides: "
            + ", ".join(dependencies[:10])
        )

    environment_raw = doc.get("environment") or {}
    if not isinstance(environment_raw, dict) or not all(
        isinstance(k, str) and ENV_KEY_RE.match(k) and isinstance(v, str | int | float | bool)
        for k, v in environment_raw.items()
    ):
        raise PackageError(
            "agent.yaml field environment must map variable names to strings",
            code="invalid_manifest",
        )
    dotenv_vars = parse_dotenv(dotenv) if dotenv is not None else {}
    environment = expand_env({k: str(v) for k, v in environment_raw.items()}, dotenv_vars)

    code_package = "code-execution" in capabilities
    exports = _parse_exports(doc, metadata, names, code_package, entry_target)
    if not exports:
        raise PackageError("agent.yaml declares no agents", code="invalid_manifest")

    resource_tier = doc.get("resource_tier", metadata.get("resource_tier"))
    if resource_tier is not None and resource_tier not in (0, 1, 2):
        warnings.append(f"resource_tier {resource_tier!r} ignored (0, 1 or 2)")
        resource_tier = None
    raw_roles = doc.get("role_required", metadata.get("role_required"))
    roles = [raw_roles] if isinstance(raw_roles, str) else raw_roles or []
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise PackageError(
            "role_required must be a role name or a list of them", code="invalid_manifest"
        )

    return Manifest(
        name=name,
        version=version,
        display_name=str_field(doc, "display_name") or name,
        description=str_field(doc, "description") or "",
        author=str_field(doc, "author"),
        license=str_field(doc, "license"),
        runtime=runtime,
        entrypoint=entrypoint,
        capabilities=capabilities,
        environment={**dotenv_vars, **environment},
        dependencies=dependencies,
        exports=tuple(exports),
        producer=_producer(package_json, names),
        resource_tier=resource_tier,
        warnings=tuple(warnings),
        role_required=tuple(roles),
    )


def _parse_exports(
    doc: dict[str, Any],
    metadata: dict[str, Any],
    names: set[str],
    code_package: bool,
    entry_target: tuple[str, str] | None,
) -> list[Export]:
    sub_agents = metadata.get("sub_agents")
    exports_raw = doc.get("exports")
    seen: set[str] = set()
    out: list[Export] = []

    def add(export: Export) -> None:
        if export.name in seen:
            raise PackageError(
                f"agent.yaml declares agent {export.name!r} twice", code="invalid_manifest"
            )
        seen.add(export.name)
        out.append(export)

    def handler_target(target: str | None, field_name: str) -> tuple[str, str]:
        if target:
            module, function = parse_target(target, field_name=field_name)
            require_module(module, names, field_name=field_name)
            return module, function
        if entry_target is None:
            raise PackageError(
                f"agent.yaml field {field_name}: no handler and no entrypoint to call",
                code="invalid_manifest",
            )
        return entry_target

    # metadata.sub_agents (kit) wins over a top-level exports list (hand-made packages); both
    # are lists of mappings with the same fields but for where the handler is named.
    if sub_agents is not None:
        declared, list_field, target_key = sub_agents, "metadata.sub_agents", "endpoint"
    elif exports_raw is not None:
        declared, list_field, target_key = exports_raw, "exports", "handler"
    else:
        declared = None
    if declared is not None:
        if not isinstance(declared, list):
            raise PackageError(
                f"agent.yaml field {list_field} must be a list", code="invalid_manifest"
            )
        for i, item in enumerate(declared):
            where = f"{list_field}[{i}]"
            if not isinstance(item, dict):
                raise PackageError(
                    f"agent.yaml field {where} must be a mapping", code="invalid_manifest"
                )
            name = str_field(item, "name", where=where + ".")
            if not name or not _EXPORT_RE.match(name) or ".." in name:
                raise PackageError(
                    f"agent.yaml field {where}.name is missing or invalid: {name!r}",
                    code="invalid_manifest",
                )
            caps = str_list(item.get("capabilities"), field_name=where + ".capabilities")
            public = item.get("public", True)
            if not isinstance(public, bool):
                raise PackageError(
                    f"agent.yaml field {where}.public must be true or false",
                    code="invalid_manifest",
                )
            description = str_field(item, "description", where=where + ".") or ""
            kind = str_field(item, "type", where=where + ".")
            if kind is not None and kind != "function":
                raise PackageError(
                    f"agent.yaml field {where}.type is {kind!r}: only 'function' exports"
                    " (a module function called with the invoke input) run here",
                    code="unsupported_export",
                )
            named = str_field(item, target_key, where=where + ".")
            endpoint = named if target_key == "endpoint" else None
            if code_package or "python-execution" in caps:
                add(Export(name, description, CODE_EXECUTOR, public, caps, endpoint=endpoint))
                continue
            # A sub-agent endpoint that is a URL path names a route of the agent's own
            # server; inside a kernel the package entrypoint serves it.
            target = named if target_key == "handler" or (named and ":" in named) else None
            module, function = handler_target(target, f"{where}.{target_key}")
            add(Export(name, description, HANDLER, public, caps, module, function, endpoint))
        return out

    description = str_field(doc, "description") or ""
    if code_package:
        add(Export("default", description, CODE_EXECUTOR, True, ()))
    else:
        if entry_target is None:
            raise PackageError(
                "agent.yaml has no entrypoint, metadata.sub_agents or exports: nothing to run",
                code="invalid_manifest",
            )
        add(Export("default", description, HANDLER, True, (), *entry_target))
    return out
