"""The OpenAPI 3.1 document of the whole HTTP API, served at ``/runtime/openapi.json``.

Built in code next to the handlers it describes, from the answers they shape (``api/*.py``,
``agents.py``, ``packages/store.py``, ``sessions/manager.py``, ``execution/answers.py``).
tests/test_openapi.py keeps it true: every route of ``make_app`` must be in it with exactly its
methods, and a schemathesis run against a real server checks that every answer conforms.
Answer objects are closed (``additionalProperties: false``) where the runtime owns the shape, so
a new field fails that run until it is documented here.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pixell_kernel_runtime import __version__
from pixell_kernel_runtime.api import base, session_openapi
from pixell_kernel_runtime.api.openapi_schemas import BOOL, SCHEMAS, STR, Schema, obj, ref
from pixell_kernel_runtime.jupyter import openapi_paths as jupyter_openapi
from pixell_kernel_runtime.metering import openapi_paths as metering_openapi

PATH = "/runtime/openapi.json"


_REASONS = {
    401: "No credentials, or credentials that do not verify",
    403: "The credentials lack the operation's scope",
    400: "Refused: the message says what is wrong (a file that is not a package, a bad "
    "digest, a body that cannot be parsed by its Content-Type, a path that is not UTF-8)",
    404: "No such agent, package, session, execution, kernel or kernel spec",
    409: "Conflict with the session's state",
    413: "Body over its cap: MAX_UPLOAD_BYTES for uploads, MAX_BODY_BYTES (or 1,000,000 JSON "
    "values) for JSON bodies",
    415: "Not multipart/form-data",
    422: "The body does not match its schema (`details` lists each problem)",
    429: "The session's queue is full; retry later",
    503: "No sandbox or kernel could be had for the session (`code` says why)",
}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Echoed back when it matches ^[A-Za-z0-9._:-]{1,128}$; otherwise replaced.",
    "schema": STR,
}
_ANSWER_HEADERS = {"X-Request-ID": {"required": True, "schema": STR}}
_RETRY_AFTER = {"Retry-After": {"required": False, "schema": STR, "description": "seconds"}}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": STR}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def _op(
    summary: str,
    answer: Schema,
    errors: tuple[int, ...] = (),
    *,
    scope: str | None,
    params: tuple[str, ...] = (),
    body: tuple[str, Schema, bool] | None = None,
    media: str = "application/json",
    sse: bool = False,
    status: int = 200,
) -> dict[str, Any]:
    """One operation. ``scope``: None is public, "" any valid credentials, else that scope."""
    # Any request can be a 400: a body tornado cannot parse by its Content-Type (a multipart
    # type without a boundary), a path parameter that is not UTF-8.
    errors = (400, *errors)
    if scope is not None:
        errors = (401, 403, *errors) if scope else (401, *errors)
    op: dict[str, Any] = {
        "summary": summary,
        "security": [] if scope is None else [{"bearer": [scope] if scope else []}],
        "parameters": [
            *({"$ref": f"#/components/parameters/{name}"} for name in params),
            _REQUEST_ID,
        ],
        "responses": {
            str(status): {
                "description": "OK" if status == 200 else "Accepted",
                "headers": _ANSWER_HEADERS,
                "content": {
                    media: {"schema": answer},
                    # With Accept: text/event-stream or ?stream=true (the default for agents
                    # with the `streaming` capability): the events, the last `done`.
                    **({"text/event-stream": {"schema": ref("SseEvent")}} if sse else {}),
                },
            },
            **{str(code): {"$ref": f"#/components/responses/E{code}"} for code in errors},
        },
    }
    if body is not None:
        body_media, schema, required = body
        op["requestBody"] = {"required": required, "content": {body_media: {"schema": schema}}}
    return op


def _websocket(summary: str, *, scope: str, params: tuple[str, ...]) -> dict[str, Any]:
    """A websocket route: a GET that upgrades (authenticated like every route)."""
    return {
        "summary": summary,
        "security": [{"bearer": [scope]}],
        "x-websocket": True,
        "parameters": [
            *({"$ref": f"#/components/parameters/{name}"} for name in params),
            {
                "name": "token",
                "in": "query",
                "required": False,
                "description": "the token, for clients that cannot set headers",
                "schema": STR,
            },
        ],
        "responses": {
            "101": {"description": "Switching Protocols (websocket)"},
            **{str(code): {"$ref": f"#/components/responses/E{code}"} for code in (400, 401, 403)},
        },
    }


def _path_param(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "string", "minLength": 1}
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _list(key: str, item: str) -> Schema:
    return obj({key: {"type": "array", "items": ref(item)}})


def _done(**flags: Schema) -> Schema:
    return obj({"status": {"const": "success"}, **flags})


_LOAD_BODY = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "description": "not blank; `~` expands"},
        "sha256": {"type": ["string", "null"], "description": "hex digest the file must have"},
    },
}
_UPLOAD_BODY = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "sha256": STR},
}


def _paths() -> dict[str, Any]:
    health = _op("Liveness (load balancers probe it)", ref("Health"), scope=None)
    agent, package, session = ("agent_id",), ("package_id",), ("id",)
    execution = ("execution_id",)
    sessions, read, write = "sessions", "packages:read", "packages:write"
    return {
        "/runtime/health": {"get": health},
        "/health": {"get": {**health, "summary": "Alias of /runtime/health"}},
        "/runtime/info": {"get": _op("Version, uptime, counters", ref("Info"), scope="")},
        "/runtime/sandbox": {"get": _op("Sandbox layers", ref("Sandbox"), scope="admin")},
        PATH: {"get": _op("This document", {"type": "object", "required": ["openapi"]}, scope="")},
        "/runtime/packages": {
            "get": _op("Loaded packages", _list("packages", "PackageSummary"), scope=read)
        },
        "/runtime/packages/load": {
            "post": _op(
                "Load an .apkg file that is on the server",
                ref("LoadAnswer"),
                (413, 422),
                scope=write,
                body=("application/json", _LOAD_BODY, True),
            )
        },
        "/runtime/packages/upload": {
            "post": _op(
                "Upload an .apkg (streamed to disk)",
                ref("LoadAnswer"),
                (413, 415, 422),
                scope=write,
                body=("multipart/form-data", _UPLOAD_BODY, True),
            )
        },
        "/runtime/packages/{package_id}": {
            "get": _op("One package", ref("PackageDetail"), (404,), scope=read, params=package),
            "delete": _op(
                "Unload a package (its sessions are closed)",
                _done(package_id=STR, unloaded=BOOL),
                (404,),
                scope=write,
                params=package,
            ),
        },
        "/runtime/agents": {
            "get": _op(
                "Every export (private ones marked)", _list("agents", "AgentSummary"), scope=read
            )
        },
        "/runtime/agents/{agent_id}": {
            "get": _op("One agent", ref("AgentDetail"), (404,), scope=read, params=agent)
        },
        "/runtime/agents/{agent_id}/invoke": {
            "post": _op(
                "Invoke an agent in its session's kernel (a user-code exception, a timeout "
                "or a kernel death is a 200 whose output says so)",
                ref("InvokeAnswer"),
                (404, 413, 422, 429, 503),
                scope="invoke",
                params=agent,
                body=("application/json", ref("InvokeRequest"), False),
                sse=True,
            )
        },
        "/runtime/agents/{agent_id}/stream": {
            "get": _websocket(
                "A websocket: send one invoke body (or {execution_id, after} to resume); each "
                "event comes back as {seq, event, data}, and the socket closes after `done`",
                scope="invoke",
                params=agent,
            )
        },
        "/runtime/executions/{execution_id}": {
            "get": _op(
                "A call's state, and once ended its answer (404 `execution_expired` after "
                "EXECUTIONS_KEEP_SECONDS / EXECUTIONS_KEEP_COUNT)",
                ref("Execution"),
                (404,),
                scope="invoke",
                params=execution,
            )
        },
        "/runtime/executions/{execution_id}/events": {
            "get": _op(
                "The call's events as SSE, from the start or after Last-Event-ID (or ?after=), "
                "following it until `done`",
                ref("SseEvent"),
                (404, 422),
                scope="invoke",
                params=execution,
                media="text/event-stream",
            )
        },
        "/runtime/executions/{execution_id}/cancel": {
            "post": _op(
                "Cancel a call: a queued one leaves the queue, a running one is interrupted "
                "(and its kernel restarted if it ignores the interrupt)",
                obj({"id": STR, "state": STR, "cancel_requested": BOOL}),
                (404, 409),
                scope="invoke",
                params=execution,
                status=202,
            )
        },
        "/runtime/sessions": {
            "get": _op("Live sessions", _list("sessions", "Session"), scope=sessions)
        },
        "/runtime/sessions/{id}": {
            "get": _op("One session", ref("Session"), (404,), scope=sessions, params=session),
            "delete": _op(
                "Close a session (its kernel is shut down)",
                _done(id=STR, deleted=BOOL),
                (404,),
                scope=sessions,
                params=session,
            ),
        },
        "/runtime/sessions/{id}/interrupt": {
            "post": _op(
                "Interrupt the running cell",
                _done(id=STR, interrupted=BOOL),
                (404, 409),
                scope=sessions,
                params=session,
            )
        },
        "/runtime/sessions/{id}/restart": {
            "post": _op(
                "Restart the kernel (its state is lost)",
                _done(id=STR, restarted=BOOL),
                (404, 429, 503),
                scope=sessions,
                params=session,
            )
        },
        "/runtime/sessions/{id}/variables": {
            "get": _op(
                "The user's variables (a read: never restarts the kernel)",
                obj({"id": STR, "variables": {"type": "array", "items": ref("Variable")}}),
                (404, 429),
                scope=sessions,
                params=session,
            )
        },
        **session_openapi.PATHS,
        "/metrics": {
            "get": _op(
                "Prometheus text (404 when METRICS_ENABLED is off)",
                STR,
                (404,),
                scope="usage",
                media="text/plain",
            )
        },
    }


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pixell Kernel Runtime",
            "version": __version__,
            "description": "Runs APKG agent packages in sandboxed Jupyter kernels, one per "
            "session. Every error answer is the envelope {error, message, code}.",
        },
        "paths": {**_paths(), **jupyter_openapi.PATHS, **metering_openapi.PATHS},
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from AUTH_TOKENS_FILE, an OIDC access token or the "
                    "token printed at start. Each operation names the scope it needs (none: "
                    "any valid credentials). Not required when the server is bound to "
                    "loopback with neither tokens nor OIDC configured.",
                }
            },
            "schemas": {**SCHEMAS, **jupyter_openapi.SCHEMAS},
            "parameters": {
                "agent_id": _path_param(
                    "agent_id", "`name@version/export`; its `/` may be raw or %2F"
                ),
                "package_id": _path_param("package_id", "`name@version`"),
                "execution_id": _path_param(
                    "execution_id", "an execution's id (`metadata.execution_id`, X-Execution-Id)"
                ),
                "id": _path_param("id", "a session's `id` (`package_id:session_id`)"),
                **jupyter_openapi.PARAMETERS,
            },
            "responses": {
                f"E{code}": {
                    "description": reason,
                    "headers": {**_ANSWER_HEADERS, **_ERROR_HEADERS.get(code, {})},
                    "content": {"application/json": {"schema": ref("Error")}},
                }
                for code, reason in _REASONS.items()
            },
        },
    }


def document() -> dict[str, Any]:
    """The document (a copy: callers may change it)."""
    return copy.deepcopy(_document())


class OpenAPIHandler(base.BaseHandler):
    route = PATH
    scopes = {"GET": base.ANY}

    def get(self) -> None:
        self.write_json(_document())
