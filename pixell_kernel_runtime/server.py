"""The server process: logging, the API and metrics listeners, signals, graceful shutdown.

SIGTERM (or SIGINT) stops accepting connections and lets running calls and their streams
finish for up to SHUTDOWN_GRACE_SECONDS; what is still running then is cancelled (answered 503
``shutting_down``). Every kernel is shut down, the ledger flushed, and the process exits 0. A
second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import tornado.httpserver
import tornado.netutil
from pythonjsonlogger.json import JsonFormatter

from pixell_kernel_runtime import __version__
from pixell_kernel_runtime.api import runtime as runtime_api
from pixell_kernel_runtime.app import Runtime, make_app
from pixell_kernel_runtime.config import Settings

log = logging.getLogger("pixell_kernel_runtime")


class _Json(JsonFormatter):  # type: ignore[misc]
    def add_fields(self, log_record: dict[str, Any], record: Any, message_dict: Any) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["level"] = record.levelname.lower()


def configure_logging(settings: Settings) -> None:
    """``json``: one JSON object a line (python-json-logger), with the fields a call passes as
    ``extra`` (request_id, route, tenant, execution_id, ...); ``text``/``console``: for people."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(
            _Json(
                "%(timestamp)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "message": "event"},
                timestamp=True,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def _serve_metrics(settings: Settings) -> tornado.httpserver.HTTPServer | None:
    """Prometheus text on its own port. A default port already in use (a Prometheus server on
    9090, say) is a warning; one the operator asked for is fatal."""
    if not settings.metrics_enabled:
        return None
    try:
        sockets = tornado.netutil.bind_sockets(settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        if settings.metrics_port_explicit:
            raise RuntimeError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}"
            ) from None
        log.warning(
            "metrics port %s:%d unavailable (%s): metrics only at /metrics on the API port",
            settings.metrics_host,
            settings.metrics_port,
            exc.strerror,
        )
        return None
    server = tornado.httpserver.HTTPServer(runtime_api.metrics_app(), xheaders=False)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return server


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain, shut every kernel down and return."""
    runtime = Runtime(settings)
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: not waiting for running calls")
            force.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    servers: list[tornado.httpserver.HTTPServer] = []
    try:
        await runtime.start()
        server = tornado.httpserver.HTTPServer(
            make_app(runtime),
            # Each handler enforces its own cap with a 413 (JSON bodies MAX_BODY_BYTES, uploads
            # MAX_UPLOAD_BYTES); this outer bound only stops what no handler would take.
            max_body_size=max(settings.max_body_bytes, settings.max_upload_bytes),
            # Uploads raise their own cap per request (stream_request_body).
            max_buffer_size=settings.max_body_bytes,
            xheaders=False,
        )
        sockets = tornado.netutil.bind_sockets(settings.port, settings.host)
        server.add_sockets(sockets)
        servers.append(server)
        port = sockets[0].getsockname()[1]
        log.info(
            "Pixell Kernel Runtime %s listening on http://%s:%d", __version__, settings.host, port
        )
        metrics_server = _serve_metrics(settings)
        if metrics_server is not None:
            servers.append(metrics_server)
        if runtime.auth.generated:
            # Jupyter's convention: a non-loopback bind with nothing configured gets a token,
            # shown once, on stdout only (never through the logs).
            print(
                f"\n    Authentication is required (bound to {settings.host}). Use this token:"
                f"\n    Authorization: Bearer {runtime.auth.generated}\n",
                flush=True,
            )
            runtime.auth.generated = None
        await stop.wait()
        for listening in servers:
            listening.stop()  # no new connections; open ones are answered 503 from now on
        runtime.shutting_down = True
        running = runtime.executor.running()
        log.info(
            "shutting down: %d calls running, waiting up to %gs for them",
            running,
            settings.shutdown_grace_seconds,
        )
        await runtime.executor.drain(settings.shutdown_grace_seconds, force)
    finally:
        # Also when start-up failed after the API was bound (a metrics port in use): nothing
        # may be answered while the runtime stops (a health check saw 200 from a server that
        # was exiting 1).
        for listening in servers:
            listening.stop()
        await runtime.stop()
        # What a drained call answered reaches its client before the process ends.
        await runtime.requests_done(timeout=0.0 if force.is_set() else 5.0)
        for listening in servers:
            await listening.close_all_connections()
