"""agent.yaml -> a typed Manifest with its exports, for every producer variant.

Producers seen in the wild: pixell-kit 0.4.12, pixell-sdk 0.5.4 (sub_agents
lost in re-serialisation), old kit, and hand-zipped packages (top-level
``version`` and ``exports``). Package code is never imported here: whether a
module exists is judged from the archive's file list alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from pixell_kernel_runtime.errors import PackageError

CODE_EXECUTOR = "code-executor"
HANDLER = "handler"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
_EXPORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
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
            "producer": self.producer,
            "exports": [e.summary() for e in self.exports],
        }


def _str_field(doc: dict[str, Any], key: str, *, where: str = "") -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PackageError(
            f"agent.yaml field {where}{key} must be a string, got {type(value).__name__}",
            code="invalid_manifest",
        )
    return value


def _str_list(value: Any, *, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PackageError(
            f"agent.yaml field {field_name} must be a list of strings", code="invalid_manifest"
        )
    return tuple(value)


def module_path_candidates(module: str) -> tuple[str, str]:
    base = module.replace(".", "/")
    return (f"{base}.py", f"{base}/__init__.py")


def parse_target(target: str, *, field_name: str) -> tuple[str, str]:
    """``module:function`` (or the hand-made ``module.function``) -> (module, function)."""
    if ":" in target:
        module, _, function = target.partition(":")
    elif "." in target:
        module, _, function = target.rpartition(".")
    else:
        raise PackageError(
            f"agent.yaml field {field_name} must be 'module:function', got {target!r}",
            code="invalid_manifest",
        )
    parts = module.split(".")
    if not all(_IDENT_RE.match(p) for p in parts) or not _IDENT_RE.match(function):
        raise PackageError(
            f"agent.yaml field {field_name} must be 'module:function' with Python identifiers,"
            f" got {target!r}",
            code="invalid_manifest",
        )
    return module, function


def parse_dotenv(data: bytes) -> dict[str, str]:
    """KEY=VALUE lines, ``#`` comments, optional ``export``, surrounding quotes stripped."""
    text = data.decode("utf-8", errors="replace")
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        env[key] = value
    return env


def expand_env(environment: dict[str, str], dotenv: dict[str, str]) -> dict[str, str]:
    """Resolve ``${VAR:-default}`` against the package's own variables only.

    The server's environment is never consulted: a package must not be able to
    read the host's secrets through its manifest.
    """
    known = dict(dotenv)
    out: dict[str, str] = {}
    for key, value in environment.items():

        def repl(m: re.Match[str]) -> str:
            return known.get(m.group(1)) or (m.group(2) or "")

        out[key] = _ENV_REF_RE.sub(repl, value)
        known[key] = out[key]
    return out


def _producer(package_json: bytes | None, names: set[str]) -> str:
    if package_json is not None:
        try:
            created_by = json.loads(package_json).get("created_by")
        except (ValueError, AttributeError):
            created_by = None
        if isinstance(created_by, str) and created_by:
            return created_by
        return "pixell-kit"
    if "setup.py" in names or any(n.startswith("dist/") for n in names):
        return "pixell-kit"
    return "hand-made"


def _require_module(module: str, names: set[str], *, field_name: str) -> None:
    if not any(c in names for c in module_path_candidates(module)):
        py, pkg = module_path_candidates(module)
        raise PackageError(
            f"agent.yaml field {field_name}: module {module!r} is missing from the archive"
            f" (expected {py} or {pkg})",
            code="missing_module",
        )


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

    name = _str_field(doc, "name")
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
    version = _str_field(metadata, "version", where="metadata.") or _str_field(doc, "version")
    if not version:
        raise PackageError(
            "agent.yaml has no version (metadata.version or version)", code="invalid_manifest"
        )
    if not _VERSION_RE.match(version) or ".." in version:
        raise PackageError(
            f"agent.yaml version is invalid: {version!r} (letters, digits, '.', '+', '-', '_')",
            code="invalid_manifest",
        )

    runtime = _str_field(doc, "runtime")
    if runtime is not None and not runtime.lower().startswith("python"):
        raise PackageError(
            f"agent.yaml field runtime is {runtime!r}: only Python agents run here"
            " (runtime python3.x)",
            code="unsupported_runtime",
        )

    entrypoint = _str_field(doc, "entrypoint")
    entry_target: tuple[str, str] | None = None
    if entrypoint:
        entry_target = parse_target(entrypoint, field_name="entrypoint")
        _require_module(entry_target[0], names, field_name="entrypoint")

    capabilities = _str_list(doc.get("capabilities"), field_name="capabilities")
    dependencies = _str_list(doc.get("dependencies"), field_name="dependencies")
    if dependencies:
        warnings.append(
            "dependencies are not installed by the runtime; kernels use what the host provides: "
            + ", ".join(dependencies[:10])
        )

    environment_raw = doc.get("environment") or {}
    if not isinstance(environment_raw, dict) or not all(
        isinstance(k, str) and _ENV_KEY_RE.match(k) and isinstance(v, str | int | float | bool)
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

    return Manifest(
        name=name,
        version=version,
        display_name=_str_field(doc, "display_name") or name,
        description=_str_field(doc, "description") or "",
        author=_str_field(doc, "author"),
        license=_str_field(doc, "license"),
        runtime=runtime,
        entrypoint=entrypoint,
        capabilities=capabilities,
        environment={**dotenv_vars, **environment},
        dependencies=dependencies,
        exports=tuple(exports),
        producer=_producer(package_json, names),
        resource_tier=resource_tier,
        warnings=tuple(warnings),
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
            _require_module(module, names, field_name=field_name)
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
            name = _str_field(item, "name", where=where + ".")
            if not name or not _EXPORT_RE.match(name) or ".." in name:
                raise PackageError(
                    f"agent.yaml field {where}.name is missing or invalid: {name!r}",
                    code="invalid_manifest",
                )
            caps = _str_list(item.get("capabilities"), field_name=where + ".capabilities")
            public = item.get("public", True)
            if not isinstance(public, bool):
                raise PackageError(
                    f"agent.yaml field {where}.public must be true or false",
                    code="invalid_manifest",
                )
            description = _str_field(item, "description", where=where + ".") or ""
            named = _str_field(item, target_key, where=where + ".")
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

    description = _str_field(doc, "description") or ""
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
