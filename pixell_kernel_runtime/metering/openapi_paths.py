"""The OpenAPI entry of ``GET /runtime/usage`` (api/usage.py), for ``api/openapi.py`` to merge.

``PATHS`` goes into the document's ``paths``, in the shape ``api/openapi.py``'s ``_op`` gives
(security per scope, the X-Request-ID parameter, errors as ``E<status>`` references). The
answer is closed: a new field fails the contract tests until it is written here.
"""

from __future__ import annotations

from typing import Any

from pixell_kernel_runtime.api.openapi_schemas import BOOL, INT, NUM, STR, Schema, or_null
from pixell_kernel_runtime.metering.ledger import GROUPS

_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Echoed back when it matches ^[A-Za-z0-9._:-]{1,128}$; otherwise replaced.",
    "schema": STR,
}
_HEADERS = {"X-Request-ID": {"required": True, "schema": STR}}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}


def _query(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or STR,
    }


# ledger._measures: what every row and the totals carry.
_MEASURES: dict[str, Schema] = {
    "executions": INT,
    "wall_seconds": NUM,
    "cpu_seconds": NUM,
    "cpu_unmeasured": INT,
    "peak_rss_bytes": {"type": ["integer", "null"]},
    "output_bytes": INT,
    "not_done": INT,
}
_ROW: Schema = {
    "type": "object",
    # The group keys a request asked for (each a string, or null: a notebook cell has no agent).
    "properties": {**{g: _NULLABLE_STR for g in GROUPS}, **_MEASURES},
    "required": list(_MEASURES),
    "additionalProperties": False,
}
_TOTALS: Schema = {
    "type": "object",
    "properties": _MEASURES,
    "required": list(_MEASURES),
    "additionalProperties": False,
}
USAGE_ANSWER: Schema = {
    "type": "object",
    "properties": {
        "tenant": _NULLABLE_STR,
        "from": or_null({"type": "string", "format": "date-time"}),
        "to": or_null({"type": "string", "format": "date-time"}),
        "group_by": {"type": "array", "items": {"enum": list(GROUPS)}},
        "agent": _NULLABLE_STR,
        "rows": {"type": "array", "items": _ROW},
        "totals": _TOTALS,
        "truncated": BOOL,
    },
    "required": ["tenant", "from", "to", "group_by", "agent", "rows", "totals", "truncated"],
    "additionalProperties": False,
}
_BOUND = (
    "an ISO 8601 date (a whole UTC day) or datetime (UTC unless it names its offset); by when "
    "executions ended"
)

# Empty is no bound; years 1970-9999 (what the ledger's epoch seconds hold).
_BOUND_SCHEMA: Schema = {
    "anyOf": [
        {"type": "string", "maxLength": 0},
        {"type": "string", "format": "date", "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-"},
        {"type": "string", "format": "date-time", "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-"},
    ]
}

_ONE = "|".join(GROUPS)

PATHS: dict[str, Any] = {
    "/runtime/usage": {
        "get": {
            "summary": "Usage from the metering ledger, aggregated (by tenant, agent and day by "
            "default); an admin sees every tenant, or one with ?tenant=, anyone else their own",
            "security": [{"bearer": ["usage"]}],
            "parameters": [
                _query("from", f"start, included: {_BOUND}", _BOUND_SCHEMA),
                _query(
                    "to",
                    f"end, excluded (a date as `to` includes that day): {_BOUND}",
                    _BOUND_SCHEMA,
                ),
                _query(
                    "group_by",
                    "comma-separated, of: " + ", ".join(GROUPS) + " (default tenant,agent,day; "
                    "empty: totals only)",
                    {"type": "string", "pattern": f"^(({_ONE})(,({_ONE}))*)?$"},
                ),
                _query("agent", "only this agent id"),
                _query("tenant", "an admin's choice of tenant (anyone else: their own only)"),
                _REQUEST_ID,
            ],
            "responses": {
                "200": {
                    "description": "OK",
                    "headers": _HEADERS,
                    "content": {"application/json": {"schema": USAGE_ANSWER}},
                },
                **{
                    str(code): {"$ref": f"#/components/responses/E{code}"}
                    for code in (400, 401, 403, 422)
                },
            },
        }
    }
}
