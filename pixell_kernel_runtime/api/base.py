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
from pixell_kernel_runtime.api.authorised import (
    ANY,
    PUBLIC,
    REQUEST_ID_RE,
    Authorised,
    implemented,
)
from pixell_kernel_runtime.errors import RuntimeAPIError, ServiceUnavailable, ValidationFailed

log = logging.getLogger("pixell_kernel_runtime.http")
__all__ = ["ANY", "PUBLIC", "BaseHandler", "Field", "NotFoundHandler", "dumps", "parse_json"]

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
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


def json_text(doc: Any) -> str:
    """``dumps``, for a stream event: one holding NaN or Infinity (a kernel's output) is not
    JSON, so the event says so instead of failing the stream."""
    try:
        return dumps(doc)
    except ValueError:
        return json.dumps({"unserialisable": True, "detail": "the event held NaN or Infinity"})


# Bounds of a JSON request body (the byte size is the server's MAX_BODY_BYTES). Deeper nesting
# raised RecursionError (a 500) and reached the kernel's json.loads too; the value count bounds
# the parse and what a handler's input costs to re-encode for the kernel.
MAX_JSON_DEPTH = 64
MAX_JSON_VALUES = 1_000_000
# A JSON string (with its escapes), to not count the commas and brackets inside strings.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class _NotFinite(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    # json.loads accepts NaN, Infinity and -Infinity; none is JSON, and a NaN timeout_seconds
    # switched the deadline off (min(nan, 600) is nan, and no time is >= nan).
    raise _NotFinite(token)


def _value_bound(raw: bytes) -> int:
    """At least as many JSON values as ``raw`` holds (every value but one follows a , [ or {)."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def _depth(doc: Any) -> int:
    """How many containers deep ``doc`` nests (iteratively: no recursion on hostile input)."""
    deepest = 0
    stack = [(doc, 1)] if isinstance(doc, dict | list) else []
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return deepest


def _invalid(msg: str, type_: str) -> ValidationFailed:
    return ValidationFailed([{"loc": ["body"], "msg": msg, "type": type_}])


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, within the bounds: 422 for what is not JSON (NaN and Infinity
    included) or nests deeper than ``MAX_JSON_DEPTH``, 413 past ``MAX_JSON_VALUES`` values."""
    too_many = _value_bound(raw) > MAX_JSON_VALUES
    if too_many:
        # The cheap bound counted what sits inside strings too (a long code cell): recount.
        too_many = _value_bound(_JSON_STRING.sub(b'""', raw)) > MAX_JSON_VALUES
    if too_many:
        raise RuntimeAPIError(
            f"the JSON body holds more than {MAX_JSON_VALUES} values",
            status=413,
            kind="PayloadTooLarge",
            code="json_too_large",
        )
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except _NotFinite as exc:
        raise _invalid(
            f"{exc} is not a JSON number (use a finite number or null)",
            "value_error.number.not_finite",
        ) from None
    except RecursionError:
        raise _invalid(
            f"the body is nested deeper than {MAX_JSON_DEPTH} levels", "value_error.json.depth"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"body is not valid JSON: {exc}", "value_error.jsondecode") from None
    # Only a body with that many brackets can nest that deep: the walk is for those alone.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(doc) > MAX_JSON_DEPTH:
        raise _invalid(
            f"the body is nested deeper than {MAX_JSON_DEPTH} levels", "value_error.json.depth"
        )
    return doc


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


@tornado.web.stream_request_body
class BaseHandler(Authorised, tornado.web.RequestHandler):
    """JSON in, JSON out, every error in the contract's envelope.

    Bodies are streamed (tornado's stream_request_body) so that a body over its cap is a 413 in
    the envelope, decided from Content-Length before a byte is read (or as it arrives), not
    tornado's bare 400 and a closed connection; only what fits the cap is ever held."""

    _body_too_large = False
    #: The body is buffered (up to MAX_BODY_BYTES) for json_body; False: the handler streams it.
    buffers_body = True

    def initialize(self, **kwargs: Any) -> None:
        self.runtime = kwargs.get("runtime") or self.application.settings["runtime"]
        self._body = bytearray()

    async def prepare(self) -> None:
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        self._started = time.perf_counter()
        self._counted = hasattr(self.runtime, "request_started")
        if self._counted:
            self.runtime.request_started()
        if getattr(self.runtime, "shutting_down", False):
            raise ServiceUnavailable(
                "the server is shutting down; retry on another instance or after it restarts",
                code="shutting_down",
            )
        self.principal = await self._authenticate()
        length = self.request.headers.get("Content-Length", "")
        if self.buffers_body and length.isdigit() and int(length) > self.body_limit():
            raise self._too_large()

    def body_limit(self) -> int:
        return self.runtime.settings.max_body_bytes

    def _too_large(self) -> RuntimeAPIError:
        return RuntimeAPIError(
            f"the request body is larger than {self.body_limit()} bytes (MAX_BODY_BYTES)",
            status=413,
            kind="PayloadTooLarge",
            code="body_too_large",
        )

    def data_received(self, chunk: bytes) -> None:
        # A chunked body without Content-Length: counted as it arrives, the excess dropped.
        if self._body_too_large or len(self._body) + len(chunk) > self.body_limit():
            self._body_too_large = True
            self._body.clear()
            return
        self._body += chunk

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
        if self._body_too_large:
            raise self._too_large()
        raw = bytes(self._body)
        body = parse_json(raw) if raw.strip() else None
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
        if not getattr(self, "request_id", None):
            # Refused before prepare() (a method tornado does not route, such as TRACE):
            # the answer still carries an id, as every answer does.
            self.request_id = uuid.uuid4().hex
        body["request_id"] = self.request_id
        self.clear()
        self.set_default_headers()
        if status == 405:
            # RFC 9110: a 405 names the methods the resource does support.
            self.set_header("Allow", ", ".join(implemented(type(self))))
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="pixell-kernel-runtime"')
        exc = getattr(self, "_retry_after", None)
        if status in (429, 503) and exc:
            self.set_header("Retry-After", str(exc))
        if getattr(self, "request_id", None):
            self.set_header("X-Request-ID", self.request_id)
        self.set_status(status)
        self.finish(dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RuntimeAPIError):
            self._retry_after = getattr(exc, "retry_after", None)
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

    def _uncount(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.runtime.request_ended()

    def on_connection_close(self) -> None:
        self._uncount()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._uncount()
        status = self.get_status()
        p = self.principal
        if p is not None and p.admin and p.via != "open" and self.request.method != "GET":
            self._audit("admin_action", p, f"{self.request.method} {self.request.path}", status)
        if self.application.settings.get("metrics_enabled", True):
            metrics.HTTP_REQUESTS.labels(self.request.method, self.route, str(status)).inc()
            metrics.HTTP_DURATION.labels(self.request.method, self.route).observe(
                time.perf_counter() - getattr(self, "_started", time.perf_counter())
            )


class NotFoundHandler(BaseHandler):
    """Unknown routes answer 404 in the envelope, for every method."""

    route = "not_found"
    scopes = {m: PUBLIC for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}

    async def prepare(self) -> None:
        await super().prepare()
        raise tornado.web.HTTPError(
            404, "No route for %s %s", self.request.method, self.request.path
        )
