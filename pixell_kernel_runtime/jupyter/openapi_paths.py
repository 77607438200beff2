"""The OpenAPI entries of the Jupyter kernels API, for ``api/openapi.py`` to merge.

``PATHS`` goes into the document's ``paths``, ``PARAMETERS`` into ``components/parameters`` and
``SCHEMAS`` into ``components/schemas``. Operations are shaped as ``api/openapi.py``'s ``_op``
shapes them (security per scope, the X-Request-ID parameter, errors as ``E<status>``
references), with Jupyter's own success statuses: 201 for a started kernel, 204 for a delete or
an interrupt, 101 for the channels websocket.
"""

from __future__ import annotations

from typing import Any

from pixell_kernel_runtime.api.openapi_schemas import BOOL, INT, STR, Schema, obj, or_null, ref

_SCOPE = [{"bearer": ["attach"]}]
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Echoed back when it matches ^[A-Za-z0-9._:-]{1,128}$; otherwise replaced.",
    "schema": STR,
}
_HEADERS = {"X-Request-ID": {"required": True, "schema": STR}}
_KERNEL, _SPEC, _RESOURCE = ("kernel_id",), ("kernel_name",), ("kernel_name", "resource")


def _json(schema: Schema, description: str = "OK", **headers: Schema) -> dict[str, Any]:
    extra = {name: {"required": True, "schema": s} for name, s in headers.items()}
    return {
        "description": description,
        "headers": {**_HEADERS, **extra},
        "content": {"application/json": {"schema": schema}},
    }


def _op(
    summary: str,
    success: dict[str, Any],
    errors: tuple[int, ...] = (),
    *,
    params: tuple[str, ...] = (),
    body: Schema | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": _SCOPE,
        "parameters": [
            *({"$ref": f"#/components/parameters/{name}"} for name in params),
            _REQUEST_ID,
        ],
        "responses": {
            **success,
            **{
                str(code): {"$ref": f"#/components/responses/E{code}"}
                for code in (400, 401, 403, *errors)
            },
        },
    }
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return op


_NO_CONTENT = {"204": {"description": "Done", "headers": _HEADERS}}
_KERNEL_STATES = ["starting", "idle", "busy", "dead"]

SCHEMAS: dict[str, Schema] = {
    "JupyterVersion": obj({"version": STR}),
    "KernelSpecFile": obj(
        {
            "argv": {"type": "array", "items": STR, "maxItems": 0},
            "env": obj({}),
            "display_name": STR,
            "language": {"const": "python"},
            "interrupt_mode": {"const": "message"},
            "metadata": obj(
                {
                    "debugger": BOOL,
                    "pixell": obj(
                        {"package_id": STR, "name": STR, "version": STR, "description": STR}
                    ),
                }
            ),
        }
    ),
    "KernelSpec": obj(
        {
            "name": {"type": "string", "pattern": r"^[\w.\-%]+$"},
            "spec": ref("KernelSpecFile"),
            "resources": {"type": "object", "additionalProperties": STR},
        }
    ),
    "KernelSpecs": obj(
        {
            "default": or_null(STR),
            "kernelspecs": {"type": "object", "additionalProperties": ref("KernelSpec")},
        }
    ),
    "Kernel": obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "name": STR,
            # Exactly %Y-%m-%dT%H:%M:%S.%fZ: jupyter_server's gateway client parses it so.
            "last_activity": {
                "type": "string",
                "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$",
            },
            "execution_state": {"enum": _KERNEL_STATES},
            "connections": INT,
            "pixell": obj({"session": STR, "session_id": STR, "package_id": STR}),
        }
    ),
    "KernelStart": {
        # As jupyter_server: a null body, or none, starts the default kernelspec.
        "type": ["object", "null"],
        "properties": {
            "name": {
                "type": ["string", "null"],
                "description": "a kernelspec name; none: the default",
            },
            "env": {
                "type": ["object", "null"],
                "description": "KERNEL_* variables as jupyter_server's gateway client sends "
                "them; only KERNEL_PIXELL_SESSION_ID is read (the session to open or join), "
                "none reaches the kernel",
                "additionalProperties": STR,
                "properties": {
                    "KERNEL_PIXELL_SESSION_ID": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9._@:+=-]{0,128}$",
                    }
                },
            },
            "path": {"type": ["string", "null"], "description": "ignored"},
        },
    },
}


def _param(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string", "minLength": 1},
    }


PARAMETERS: dict[str, dict[str, Any]] = {
    "kernel_id": _param(
        "kernel_id", "a session's `kernel_id` (a UUID)", {"type": "string", "format": "uuid"}
    ),
    "kernel_name": _param("kernel_name", "a kernelspec name (`name.version` of a package)"),
    "resource": _param("resource", "a resource file of the kernelspec (its logos)"),
}

_KERNEL_MODEL = _json(ref("Kernel"))


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": STR,
    }


# As api/openapi.py's websocket routes: a GET that upgrades, authenticated like every route.
_CHANNELS = {
    "summary": "The channels websocket: Jupyter's legacy JSON protocol, or the "
    "v1.kernel.websocket.jupyter.org subprotocol; execute requests take turns with REST calls "
    "in the session's queue",
    "security": _SCOPE,
    "x-websocket": True,
    "parameters": [
        {"$ref": "#/components/parameters/kernel_id"},
        _query("token", "the token, for clients that cannot set headers"),
        _query("session_id", "the client's session id (jupyter_server's clients send it)"),
    ],
    "responses": {
        "101": {"description": "Switching Protocols (websocket)"},
        **{
            str(code): {"$ref": f"#/components/responses/E{code}"}
            for code in (400, 401, 403, 404, 429, 503)
        },
    },
}

PATHS: dict[str, dict[str, Any]] = {
    "/api": {"get": _op("The Jupyter API's version", {"200": _json(ref("JupyterVersion"))})},
    "/api/kernelspecs": {
        "get": _op("One kernelspec per loaded package", {"200": _json(ref("KernelSpecs"))})
    },
    "/api/kernelspecs/{kernel_name}": {
        "get": _op("One kernelspec", {"200": _json(ref("KernelSpec"))}, (404,), params=_SPEC)
    },
    "/kernelspecs/{kernel_name}/{resource}": {
        "get": _op(
            "A kernelspec's resource file (404 when it has none)",
            {
                "200": {
                    "description": "OK",
                    "headers": _HEADERS,
                    "content": {
                        media: {"schema": {"type": "string", "format": "binary"}}
                        for media in ("image/png", "image/svg+xml")
                    },
                }
            },
            (404,),
            params=_RESOURCE,
        )
    },
    "/api/kernels": {
        "get": _op(
            "The caller's tenant's live sessions, as kernels",
            {"200": _json({"type": "array", "items": ref("Kernel")})},
        ),
        "post": _op(
            "Start a kernelspec: a fresh sandboxed session of its package (or the one "
            "KERNEL_PIXELL_SESSION_ID names), its kernel started",
            {"201": _json(ref("Kernel"), "Started", Location=STR)},
            (404, 413, 422, 429, 503),
            body=ref("KernelStart"),
        ),
    },
    "/api/kernels/{kernel_id}": {
        "get": _op("One kernel", {"200": _KERNEL_MODEL}, (404,), params=_KERNEL),
        "delete": _op(
            "Close the kernel's session (its kernel is shut down)",
            _NO_CONTENT,
            (404,),
            params=_KERNEL,
        ),
    },
    "/api/kernels/{kernel_id}/interrupt": {
        "post": _op("Interrupt the running cell", _NO_CONTENT, (404, 409), params=_KERNEL)
    },
    "/api/kernels/{kernel_id}/restart": {
        "post": _op(
            "Restart the kernel in its turn (its state is lost; the id stays)",
            {"200": _KERNEL_MODEL},
            (404, 429, 503),
            params=_KERNEL,
        )
    },
    "/api/kernels/{kernel_id}/channels": {"get": _CHANNELS},
}
