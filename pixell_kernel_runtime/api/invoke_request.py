"""An invoke body's ``input``, validated before anything runs: session, deadline, code, tier."""

from __future__ import annotations

import re
from typing import Any

from pixell_kernel_runtime.config import Settings
from pixell_kernel_runtime.errors import ValidationFailed
from pixell_kernel_runtime.execution.invoke import InvokeRequest
from pixell_kernel_runtime.packages.manifest import CODE_EXECUTOR

SESSION_ID_RE = re.compile(r"[A-Za-z0-9._@:+=-]{1,128}")
DEFAULT_SESSION = "default"


def _invalid(field: str, msg: str, type_: str = "value_error") -> ValidationFailed:
    return ValidationFailed([{"loc": ["body", "input", field], "msg": msg, "type": type_}])


def session_id_of(input_: dict[str, Any], context: dict[str, Any]) -> str:
    raw = input_.get("session_id", context.get("session_id"))
    if raw is None or raw == "":
        return DEFAULT_SESSION
    if not isinstance(raw, str) or not SESSION_ID_RE.fullmatch(raw):
        raise _invalid("session_id", "must be 1-128 characters of letters, digits and ._@:+=-")
    return raw


def timeout_of(input_: dict[str, Any], settings: Settings) -> float:
    raw = input_.get("timeout_seconds")
    if raw is None:
        return settings.default_timeout_seconds
    # "not > 0" refuses NaN too, which would switch the deadline off (no time is >= nan).
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not raw > 0:
        raise _invalid("timeout_seconds", "must be a positive number")
    return min(float(raw), settings.max_timeout_seconds)


def parse(
    kind: str, input_: dict[str, Any], context: dict[str, Any], settings: Settings
) -> InvokeRequest:
    session_id = session_id_of(input_, context)
    timeout = timeout_of(input_, settings)
    code = None
    if kind == CODE_EXECUTOR:
        code = input_.get("code")
        if not isinstance(code, str):
            missing = code is None
            raise _invalid(
                "code",
                "field required (a string)",
                "value_error.missing" if missing else "type_error.str",
            )
    tier = input_.get("resource_tier")
    if tier is not None and (isinstance(tier, bool) or tier not in (0, 1, 2)):
        raise _invalid("resource_tier", "must be 0, 1 or 2")
    return InvokeRequest(input_, session_id, timeout, code, tier)
