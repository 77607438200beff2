"""Websocket handlers: the same authentication and scopes as every HTTP handler.

The upgrade request is authenticated in ``prepare`` (a token in ``Authorization`` or, since
browsers cannot set headers on websockets, ``?token=``); a refusal is the JSON envelope with
its HTTP status, before any upgrade. Every connection turns Nagle off: tornado leaves it on,
and small frames then wait for the peer's delayed ACK (Kernel Gateway loses ~40 ms an execute).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import tornado.web
import tornado.websocket

from pixell_kernel_runtime import metrics
from pixell_kernel_runtime.api.authorised import REQUEST_ID_RE, Authorised
from pixell_kernel_runtime.errors import RuntimeAPIError

# What one client message may weigh (an invoke body, a Jupyter message); tornado's default is
# 10 MiB. Bigger ones close the connection (1009).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class WebSocketBase(Authorised, tornado.websocket.WebSocketHandler):
    query_token = True

    def initialize(self, **kwargs: Any) -> None:
        self.runtime = kwargs.get("runtime") or self.application.settings["runtime"]

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        return MAX_MESSAGE_BYTES

    async def prepare(self) -> None:
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        self._started = time.perf_counter()
        self.principal = await self._authenticate()

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            # tornado's own answer is a bare text 400; this one says what to do.
            raise RuntimeAPIError(
                f"{self.route} is a websocket: connect with Upgrade: websocket",
                status=400,
                code="websocket_required",
            )
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        # Tokens, not cookies, authenticate here: a page on another origin has no token to
        # send, so cross-origin connections carry no ambient authority to abuse.
        return True

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if not getattr(self, "request_id", None):  # refused before prepare (a TRACE)
            self.request_id = uuid.uuid4().hex
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RuntimeAPIError):
            status, kind, message, code = exc.status, exc.kind, exc.message, exc.code
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            status, kind = status_code, "HTTPError"
            message, code = exc.log_message or self._reason, "http_error"
        else:
            status, kind, code = 500, "InternalError", "internal_error"
            message = f"The server failed to handle this request (request id {self.request_id})"
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Request-ID", self.request_id)
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="pixell-kernel-runtime"')
        if status == 405:
            self.set_header("Allow", "GET")
            message = f"Method {self.request.method} is not allowed on {self.request.path}"
        body = {"error": kind, "message": message, "code": code, "request_id": self.request_id}
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, RuntimeAPIError):
            return
        super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        if self.application.settings.get("metrics_enabled", True):
            status = str(self.get_status())
            metrics.HTTP_REQUESTS.labels(self.request.method, self.route, status).inc()
            metrics.HTTP_DURATION.labels(self.request.method, self.route).observe(
                time.perf_counter() - getattr(self, "_started", time.perf_counter())
            )
