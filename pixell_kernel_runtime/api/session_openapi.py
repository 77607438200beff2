"""OpenAPI path entries of the session routes added for attaching and exporting (api/sessions.py):
``/runtime/sessions/{id}/connection`` and ``/runtime/sessions/{id}/notebook``.

Written out in the shape ``api/openapi.py``'s ``_op`` gives (that module merges ``PATHS`` into
its document; importing it from here would be circular).
"""

from __future__ import annotations

from typing import Any

from pixell_kernel_runtime.api.openapi_schemas import INT, STR, Schema, obj, or_null

_SOCKETS = ("shell", "iopub", "stdin", "control", "hb")
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Echoed back when it matches ^[A-Za-z0-9._:-]{1,128}$; otherwise replaced.",
    "schema": STR,
}
_ANSWER_HEADERS = {"X-Request-ID": {"required": True, "schema": STR}}

# api/sessions.connection_info: the fields of a Jupyter connection file.
CONNECTION: Schema = obj(
    {
        "transport": {"enum": ["ipc", "tcp"]},
        "ip": STR,
        **{f"{name}_port": INT for name in _SOCKETS},
        "key": STR,
        "signature_scheme": STR,
        "kernel_name": STR,
    }
)
CONNECTION_ANSWER: Schema = obj(
    {
        "id": STR,
        "kernel_id": STR,
        "connection": CONNECTION,
        # ipc only: the socket paths, <ip>-<port>.
        "paths": or_null(obj({name: STR for name in _SOCKETS})),
    }
)
# execution/notebook.build: nbformat 4.5 (its own schema is nbformat's; checked on export).
NOTEBOOK: Schema = {
    "type": "object",
    "required": ["nbformat", "nbformat_minor", "metadata", "cells"],
    "properties": {
        "nbformat": {"const": 4},
        "nbformat_minor": INT,
        "metadata": {
            "type": "object",
            "required": ["kernelspec", "language_info", "pixell"],
            "properties": {
                "kernelspec": obj({"name": STR, "display_name": STR, "language": STR}),
                "language_info": {"type": "object", "required": ["name"]},
                "pixell": {
                    "type": "object",
                    "required": ["session", "session_id", "package_id", "exported_at"],
                    "properties": {
                        "session": STR,
                        "session_id": STR,
                        "package_id": STR,
                        "exported_at": STR,
                        "executions": INT,
                        "executions_expired": INT,
                        "running_left_out": INT,
                        "executions_not_run": INT,
                        "outputs_omitted": INT,
                        "cells_omitted": INT,
                        "max_export_bytes": INT,
                    },
                },
            },
        },
        "cells": {"type": "array", "items": {"type": "object"}},
    },
}


def _get(
    summary: str,
    scope: str,
    media: str,
    answer: Schema,
    errors: tuple[int, ...],
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"bearer": [scope]}],
        "parameters": [{"$ref": "#/components/parameters/id"}, _REQUEST_ID],
        "responses": {
            "200": {
                "description": "OK",
                "headers": {**_ANSWER_HEADERS, **(headers or {})},
                "content": {media: {"schema": answer}},
            },
            **{str(code): {"$ref": f"#/components/responses/E{code}"} for code in errors},
        },
    }


PATHS: dict[str, Any] = {
    "/runtime/sessions/{id}/connection": {
        "get": _get(
            "What a Jupyter client needs to attach to the session's kernel (`jupyter console "
            "--existing`), from the runtime's kernel manager; 409 `no_kernel` when it has no "
            "live kernel",
            "attach",
            "application/json",
            CONNECTION_ANSWER,
            (400, 401, 403, 404, 409),
        )
    },
    "/runtime/sessions/{id}/notebook": {
        "get": _get(
            "The session's executed cells and outputs as a notebook (nbformat 4.5, validated), "
            "with the package's kernelspec; running calls are left out",
            "sessions",
            "application/x-ipynb+json",
            NOTEBOOK,
            (400, 401, 403, 404),
            {
                "Content-Disposition": {
                    "required": True,
                    "schema": STR,
                    "description": 'attachment; filename="<package_id>-<session_id>.ipynb"',
                }
            },
        )
    },
}
