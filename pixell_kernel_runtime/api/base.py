"""The error envelope, X-Request-ID, JSON bodies and metrics: one place for every handler."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

import tornado.web

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.errors import RuntimeAPIError, ValidationFailed

log = logging.getLogger("pixell_kernel_runtime.http")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    411: "LengthRequired",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def dumps(obj: Any) -> str:
    # allow_nan=False: a NaN would make the answer invalid JSON for strict clients.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str)


class Field:
    """One field of a JSON body: its accepted types and whether it is required."""

    def __init__(self, types: type | tuple[type, ...], *, required: bool = False) -> None:
        self.types = types if isinstance(types, tuple) else (types,)
        self.required = required

    @property
    def type_name(self) -> str:
        names = {
            dict: "object",
            str: "string",
            int: "integer",
            float: "number",
            list: "array",
            bool: "boolean",
        }
        return " or ".join(names.get(t, t.__name__) for t in self.types)


class BaseHandler(tornado.web.RequestHandler):
    """JSON in, JSON out, every error in the contract's envelope."""

    #: The route pattern used as a metrics label (never the raw path).
    route = "unknown"

    def initialize(self, **kwargs: Any) -> None:
        self.runtime = kwargs.get("runtime") or self.application.settings["runtime"]

    def prepare(self) -> None:
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        self._started = time.perf_counter()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(dumps(obj))

    # ---- request bodies -------------------------------------------------

    def json_body(self, schema: dict[str, Field]) -> dict[str, Any]:
        """Parse the body as a JSON object and check it against ``schema``."""
        raw = self.request.body
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValidationFailed(
                [
                    {
                        "loc": ["body"],
                        "msg": f"body is not valid JSON: {exc}",
                        "type": "value_error.jsondecode",
                    }
                ]
            ) from None
        if body is None:
            body = {}
            if any(f.required for f in schema.values()):
                raise ValidationFailed(
                    [
                        {
                            "loc": ["body"],
                            "msg": "a JSON object body is required",
                            "type": "value_error.missing",
                        }
                    ]
                )
        if not isinstance(body, dict):
            raise ValidationFailed(
                [{"loc": ["body"], "msg": "body must be a JSON object", "type": "type_error.dict"}]
            )
        details = []
        for name, field in schema.items():
            if name not in body or body[name] is None:
                if field.required:
                    details.append(
                        {
                            "loc": ["body", name],
                            "msg": "field required",
                            "type": "value_error.missing",
                        }
                    )
                continue
            value = body[name]
            # bool is an int in Python; a JSON true is not a valid integer here.
            ok = isinstance(value, field.types) and not (
                isinstance(value, bool) and bool not in field.types
            )
            if not ok:
                details.append(
                    {
                        "loc": ["body", name],
                        "msg": f"must be {field.type_name}",
                        "type": f"type_error.{field.types[0].__name__}",
                    }
                )
        if details:
            raise ValidationFailed(details)
        return body

    # ---- errors ---------------------------------------------------------

    def error_envelope(
        self, status: int, kind: str, message: str, code: str, details: Any = None
    ) -> None:
        body: dict[str, Any] = {"error": kind, "message": message, "code": code}
        if details is not None:
            body["details"] = details
        body["request_id"] = getattr(self, "request_id", None)
        self.clear()
        self.set_default_headers()
        if getattr(self, "request_id", None):
            self.set_header("X-Request-ID", self.request_id)
        self.set_status(status)
        self.finish(dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RuntimeAPIError):
            self.error_envelope(exc.status, exc.kind, exc.message, exc.code, exc.details)
            return
        if isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            message = (
                exc.log_message % exc.args
                if exc.log_message and exc.args
                else (exc.log_message or exc.reason or self._reason)
            )
            if status_code == 405:
                message = f"Method {self.request.method} is not allowed on {self.request.path}"
            kind = _REASONS.get(status_code, "HTTPError")
            self.error_envelope(status_code, kind, message, kind.lower())
            return
        self.error_envelope(
            500,
            "InternalError",
            "The server failed to handle this request; see its log for "
            f"request id {getattr(self, 'request_id', '?')}",
            "internal_error",
        )

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Expected errors are answers, not incidents: no traceback in the log.
        if isinstance(value, RuntimeAPIError):
            log.info(
                "%s %s -> %d %s",
                self.request.method,
                self.request.path,
                value.status,
                value.message,
            )
            return
        if isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            return
        super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        status = self.get_status()
        if self.application.settings.get("metrics_enabled", True):
            metrics.HTTP_REQUESTS.labels(self.request.method, self.route, str(status)).inc()
            metrics.HTTP_DURATION.labels(self.request.method, self.route).observe(
                time.perf_counter() - getattr(self, "_started", time.perf_counter())
            )


class NotFoundHandler(BaseHandler):
    """Unknown routes answer 404 in the envelope, for every method."""

    route = "not_found"

    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(
            404, "No route for %s %s", self.request.method, self.request.path
        )
