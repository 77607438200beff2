"""Typed readers for agent.yaml fields: each refuses a wrong shape with a PackageError naming it."""

from __future__ import annotations

import re
from typing import Any

from pixell_kernel_runtime.errors import PackageError

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def str_field(doc: dict[str, Any], key: str, *, where: str = "") -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PackageError(
            f"agent.yaml field {where}{key} must be a string, got {type(value).__name__}",
            code="invalid_manifest",
        )
    return value


def str_list(value: Any, *, field_name: str) -> tuple[str, ...]:
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


def parse_runtime(value: Any, warnings: list[str]) -> str | None:
    """``python3.11`` (the kit) or ``{python: ">=3.8"}`` (the original runtime) -> one string.

    The mapping names the language and its version constraint: ``python>=3.8``. Neither form is
    enforced against the kernel's interpreter; a non-Python runtime is refused, because a Jupyter
    Python kernel cannot run it.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.lower().startswith("python"):
            raise PackageError(
                f"agent.yaml field runtime is {value!r}: only Python agents run here"
                " (runtime python3.x, or a mapping {python: '>=3.8'})",
                code="unsupported_runtime",
            )
        return value
    if not isinstance(value, dict):
        raise PackageError(
            "agent.yaml field runtime must be a string (python3.11) or a mapping"
            f" ({{python: '>=3.8'}}), got {type(value).__name__}",
            code="invalid_manifest",
        )
    if not value or not all(isinstance(k, str) for k in value):
        raise PackageError(
            "agent.yaml field runtime must map a language name to its version,"
            " e.g. {python: '>=3.8'}",
            code="invalid_manifest",
        )
    keys = {k.lower(): k for k in value}
    if "python" not in keys:
        raise PackageError(
            f"agent.yaml field runtime names {', '.join(sorted(value))}: only Python agents"
            " run here (runtime {python: '>=3.8'} or python3.x)",
            code="unsupported_runtime",
        )
    spec = value[keys["python"]]
    if spec is not None and (isinstance(spec, bool) or not isinstance(spec, str | int | float)):
        raise PackageError(
            "agent.yaml field runtime.python must be a version or a constraint such as '>=3.8',"
            f" got {type(spec).__name__}",
            code="invalid_manifest",
        )
    others = sorted(k for k in value if k.lower() != "python")
    if others:
        warnings.append(f"runtime entries other than python ignored: {', '.join(others)}")
    return "python" + ("" if spec is None else str(spec).strip())


def require_module(module: str, names: set[str], *, field_name: str) -> None:
    if not any(c in names for c in module_path_candidates(module)):
        py, pkg = module_path_candidates(module)
        raise PackageError(
            f"agent.yaml field {field_name}: module {module!r} is missing from the archive"
            f" (expected {py} or {pkg})",
            code="missing_module",
        )
