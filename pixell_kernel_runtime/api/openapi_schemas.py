"""The component schemas of the OpenAPI document (``api/openapi.py``): the answers' shapes.

Each is read off the code that shapes the answer: ``agents.py`` (agents), ``packages/store.py``
and ``packages/manifest.py`` (packages), ``sessions/manager.py`` (sessions),
``execution/answers.py`` and ``execution/runner.py`` (invoke output), ``sandbox/report.py``.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
ANYTHING: Schema = {}
TIME: Schema = {"type": "string", "format": "date-time"}
STRS: Schema = {"type": "array", "items": STR}
# The session_id rule of sessions/manager.py (empty or absent means "default").
SESSION_ID: Schema = {"type": ["string", "null"], "pattern": "^[A-Za-z0-9._@:+=-]{0,128}$"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """A closed object: these fields, always ``required``, sometimes ``optional``."""
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


def open_obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """The same, open to other fields (shapes that vary by host, such as sandbox layers)."""
    doc = obj(required, optional)
    del doc["additionalProperties"]
    return doc


_TALLY_TEXT = obj({"chars_seen": INT, "chars_kept": INT, "bytes_seen": INT})
_TALLY_OUTPUTS = obj(
    {f"{k}_{s}": INT for k in ("count", "bytes", "values") for s in ("seen", "kept")}
)
_DROPPED = obj(
    {
        "count": INT,
        "bytes": INT,
        "messages": {
            "type": "array",
            "items": obj({"msg_type": STR, "bytes": INT, "reason": STR}),
        },
    }
)
_FAILURE_FIELDS: dict[str, Schema] = {
    "timeout_seconds": NUM,
    "state_lost": BOOL,
    "detail": STR,
    "kernel_exit": or_null(
        obj({"exit_code": or_null(INT), "signal": or_null(INT), "signal_name": or_null(STR)})
    ),
}

# Agents.summary() and InstalledPackage.summary(): the detail answers add to them.
_AGENT: dict[str, Schema] = {
    "id": STR,
    "package_id": STR,
    "name": STR,
    "description": STR,
    "status": {"const": "ready"},
    "private": BOOL,
    "kind": ref("AgentKind"),
    "capabilities": STRS,
}
_PACKAGE: dict[str, Schema] = {
    "id": STR,
    "name": STR,
    "version": STR,
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "size": INT,
    "loaded_at": TIME,
    "source": STR,
    "agents": STRS,
}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        **obj(
            {"error": STR, "message": STR, "code": {"type": "string", "pattern": "^[a-z_]+$"}},
            {"details": ANYTHING, "request_id": or_null(STR)},
        ),
        "description": "The error envelope of every 4xx/5xx answer (`details` on 422).",
    },
    "Health": obj({"status": {"const": "healthy"}, "version": STR, "timestamp": TIME}),
    "Layer": open_obj({"enabled": BOOL, "reason": or_null(STR)}),
    "Sandbox": open_obj(
        {
            "mode": {"enum": ["strict", "best_effort", "off"]},
            "isolation": or_null({"enum": ["bwrap", "unshare", "none"]}),
            "layers": {"type": "object", "additionalProperties": ref("Layer")},
        },
        {
            "probe_ms": or_null(NUM),
            "verified": open_obj({"ok": BOOL, "error": ANYTHING, "checked": ANYTHING}),
            "missing": STRS,
            "kernel_spec": or_null(open_obj({"name": STR, "source": STR, "provisioner": STR})),
        },
    ),
    "Info": obj(
        {
            "version": STR,
            "start_time": TIME,
            "uptime_seconds": NUM,
            "packages_loaded": INT,
            "agents_mounted": INT,
            "total_invocations": INT,
            "status": {"const": "running"},
            "sessions": obj({"total": INT, "active": INT, "created": INT}),
            # The warm pool: kernels per package (0: off), ready now, sessions that took one.
            "pool": obj({"size": INT}, {"ready": INT, "hits": INT, "misses": INT}),
            "sandbox": ref("Sandbox"),
        }
    ),
    "PackageSummary": obj(_PACKAGE),
    "Export": obj(
        {
            "name": STR,
            "description": STR,
            "kind": ref("AgentKind"),
            "public": BOOL,
            "capabilities": STRS,
            "endpoint": or_null(STR),
            "handler": or_null(STR),
        }
    ),
    "PackageDetail": obj(
        {
            **_PACKAGE,
            "warnings": STRS,
            "manifest": obj(
                {
                    **{k: STR for k in ("name", "version", "display_name", "description")},
                    **{k: or_null(STR) for k in ("author", "license", "runtime", "entrypoint")},
                    "capabilities": STRS,
                    "dependencies": STRS,
                    "environment_keys": STRS,
                    "resource_tier": or_null(INT),
                    "role_required": STRS,
                    "producer": STR,
                    "exports": {"type": "array", "items": ref("Export")},
                }
            ),
        }
    ),
    "LoadAnswer": obj(
        {
            "status": {"const": "success"},
            "package_id": STR,
            "agents": STRS,
            "sha256": STR,
            "warnings": STRS,
            "result": {"enum": ["installed", "unchanged", "replaced"]},
        }
    ),
    "AgentKind": {"enum": ["code-executor", "handler"]},
    "AgentSummary": obj(_AGENT),
    "AgentDetail": obj(
        {
            **_AGENT,
            "version": STR,
            "display_name": STR,
            "endpoint": or_null(STR),
            "handler": or_null(STR),
        }
    ),
    "InvokeRequest": {
        "type": "object",
        "description": "Unknown fields are ignored; a null field is as if absent.",
        "properties": {
            "input": {
                "type": ["object", "null"],
                "description": "The agent's input. A handler receives the whole object; every "
                "agent reads session_id, timeout_seconds and resource_tier from it, and a "
                "code executor requires `code`.",
                "properties": {
                    "code": {"type": "string", "description": "code executors: the cell to run"},
                    "session_id": SESSION_ID,
                    "timeout_seconds": {
                        "type": ["number", "null"],
                        "exclusiveMinimum": 0,
                        "description": "capped at the server's MAX_TIMEOUT_SECONDS",
                    },
                    "resource_tier": {"enum": [0, 1, 2, None]},
                },
            },
            "context": {
                "type": ["object", "null"],
                "properties": {"session_id": SESSION_ID},
            },
            "trace_id": {"type": ["string", "null"]},
        },
    },
    "ExceptionInfo": obj({"ename": STR, "evalue": STR, "traceback": STR}),
    "Output": obj(
        {"type": {"enum": ["display_data", "execute_result"]}, "data": {"type": "object"}},
        {"metadata": {"type": "object"}},
    ),
    "Truncation": obj(
        {
            "stdout": _TALLY_TEXT,
            "stderr": _TALLY_TEXT,
            "exception": _TALLY_TEXT,
            "outputs": _TALLY_OUTPUTS,
            "dropped": _DROPPED,
            "limits": {"type": "object", "additionalProperties": INT},
        }
    ),
    "CodeOutput": {
        **obj(
            {
                "status": {"enum": ["success", "error"]},
                "stdout": STR,
                "stderr": STR,
                "session_id": STR,
                "execution_count": or_null(INT),
                "outputs": {"type": "array", "items": ref("Output")},
                "exception": or_null(ref("ExceptionInfo")),
                "duration_ms": NUM,
                "session_restarted": BOOL,
            },
            {
                "result": ANYTHING,
                "error": STR,
                "truncated": {"const": True},
                "truncation": ref("Truncation"),
                **_FAILURE_FIELDS,
            },
        ),
        "description": "A code executor's `output`: `result` on success, `error` otherwise.",
        "if": {"properties": {"status": {"const": "success"}}},
        "then": {"required": ["result"], "not": {"required": ["error"]}},
        "else": {"required": ["error"], "not": {"required": ["result"]}},
    },
    "HandlerError": obj(
        {
            "status": {"const": "error"},
            "error": STR,
            "exception": or_null(ref("ExceptionInfo")),
        },
        _FAILURE_FIELDS,
    ),
    "InvokeAnswer": {
        **obj(
            {
                "agent_id": STR,
                "output": ANYTHING,
                "duration_ms": NUM,
                "trace_id": STR,
                "metadata": obj(
                    {
                        "session_id": STR,
                        "session": STR,
                        "kind": ref("AgentKind"),
                        # GET /runtime/executions/{id} reads the call again, by this id.
                        "execution_id": STR,
                        "execution_count": or_null(INT),
                        "session_restarted": BOOL,
                    },
                    {
                        "restart_reason": STR,
                        "stdout": STR,
                        "stderr": STR,
                        "outputs": {"type": "array", "items": ref("Output")},
                        "truncated": {"const": True},
                        "truncation": ref("Truncation"),
                        "error": {"const": True},
                    },
                ),
            }
        ),
        "description": "A handler's `output` is its return value (any JSON), or a "
        "HandlerError when `metadata.error` is true; a code executor's is a CodeOutput.",
        "allOf": [
            {
                "if": {"properties": {"metadata": {"properties": {"kind": {"const": "handler"}}}}},
                "then": {
                    "if": {"properties": {"metadata": {"required": ["error"]}}},
                    "then": {"properties": {"output": ref("HandlerError")}},
                },
                "else": {"properties": {"output": ref("CodeOutput")}},
            }
        ],
    },
    "Session": obj(
        {
            "id": STR,
            "session_id": STR,
            # Its id on the Jupyter kernels API (/api/kernels/{kernel_id}).
            "kernel_id": STR,
            "tenant": STR,
            "package_id": STR,
            "kernel_state": {"enum": ["not_started", "idle", "busy", "dead", "closed"]},
            "created": TIME,
            "last_used": TIME,
            # Any client's activity (a console's too), from the kernel's iopub status.
            "last_activity": TIME,
            "kernel_execution_state": or_null(STR),
            "executions": INT,
            "restarts": INT,
            "queued": INT,
            # Seconds before the culler closes it if nothing happens; null while it is busy.
            "idle_seconds_left": or_null(NUM),
        },
        # Host facts: only for principals with the attach or admin scope.
        {
            "kernel_pid": or_null(INT),
            "connection_file": or_null(STR),
            "kernel_rss_bytes": or_null(INT),
        },
    ),
    # One SSE event as schemathesis (and any SSE parser) reads it: `data` is the JSON text.
    "SseEvent": open_obj(
        {
            "event": {
                "enum": ["status", "stdout", "stderr", "display", "result", "error", "done", "gap"]
            },
            "data": STR,
        },
        {"id": STR},
    ),
    "Execution": obj(
        {
            "id": STR,
            "state": {
                "enum": [
                    "queued",
                    "running",
                    "done",
                    "error",
                    "timeout",
                    "cancelled",
                    "kernel_died",
                ]
            },
            "agent_id": or_null(STR),
            "session": STR,
            "session_id": STR,
            "kind": STR,
            "created": TIME,
            "started": or_null(TIME),
            "ended": or_null(TIME),
            "events": INT,
            "execution_count": or_null(INT),
        },
        # Once it has ended: what a plain invoke answered (an InvokeAnswer), or the error
        # envelope (with its HTTP status) of what ended it before it ran.
        {"answer": ANYTHING},
    ),
    "Variable": open_obj(
        {"name": STR, "type": STR},
        {
            "shape": or_null({"type": "array", "items": INT}),
            "length": or_null(INT),
            "size_bytes": or_null(INT),
        },
    ),
}
