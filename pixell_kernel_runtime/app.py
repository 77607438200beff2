"""Builds the runtime (store, agents, sessions, sandbox) and its tornado Application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from pixell_kernel_runtime import __version__, bundled, metrics
from pixell_kernel_runtime.agents import Agents
from pixell_kernel_runtime.api import agents as agents_api
from pixell_kernel_runtime.api import executions as executions_api
from pixell_kernel_runtime.api import openapi as openapi_api
from pixell_kernel_runtime.api import packages as packages_api
from pixell_kernel_runtime.api import runtime as runtime_api
from pixell_kernel_runtime.api import sessions as sessions_api
from pixell_kernel_runtime.api import stream as stream_api
from pixell_kernel_runtime.api import usage as usage_api
from pixell_kernel_runtime.api.base import NotFoundHandler
from pixell_kernel_runtime.auth import Authenticator
from pixell_kernel_runtime.auth.access import AccessPolicy
from pixell_kernel_runtime.config import Settings
from pixell_kernel_runtime.errors import RuntimeAPIError
from pixell_kernel_runtime.execution.invoke import Executor
from pixell_kernel_runtime.execution.record import ExecutionStore, LogLimits
from pixell_kernel_runtime.jupyter import routes as jupyter_routes
from pixell_kernel_runtime.metering import Metering
from pixell_kernel_runtime.packages import builder
from pixell_kernel_runtime.packages.store import PackageStore
from pixell_kernel_runtime.sandbox import Sandbox, layout
from pixell_kernel_runtime.sandbox.core import AUTO
from pixell_kernel_runtime.sessions.manager import SessionManager

log = logging.getLogger("pixell_kernel_runtime")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _tool(setting: str | None) -> Any:
    """A sandbox tool setting: unset -> look it up, "none" -> do without, else a path."""
    if setting is None:
        return AUTO
    return None if setting.strip().lower() in ("", "none") else setting


class Runtime:
    """Everything one server process owns, wired in one place."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = PackageStore(settings.store_dir, settings.archive)
        # Everything that parses an operator's file comes before the run dir exists: a bad
        # file must not leave a /tmp/pkr-* dir behind.
        access = AccessPolicy.load(settings.access_policy)
        self.auth = Authenticator.from_settings(settings)
        self.metering = Metering.open(settings)
        # An operator's RUN_DIR is theirs: only what the runtime creates in it is removed.
        self._own_run_dir = settings.run_dir is None
        self.run_dir = settings.run_dir or Path(
            tempfile.mkdtemp(prefix=layout.run_dir_prefix(), dir="/tmp")
        )
        if self._own_run_dir:
            # Kernel uids pass through it to their own sockets (Landlock mode); never list it.
            os.chmod(self.run_dir, 0o711)
        log.info("run dir %s", self.run_dir)
        try:
            self.sandbox = Sandbox(
                mode=settings.sandbox_mode,
                config_path=settings.sandbox_config,
                run_dir=self.run_dir,
                # Kernels must not read other packages or the runtime's state; each kernel's
                # own package root is bound back read-only.
                hidden_dirs=sorted({str(settings.state_dir), str(settings.store_dir)}),
                bwrap_path=_tool(settings.sandbox_bwrap),
                unshare_path=_tool(settings.sandbox_unshare),
                subid_files=tuple(p for p in settings.sandbox_subid_files.split(":") if p),
            )
        except BaseException:
            # A bad sandbox config must not leave the run dir made for it behind.
            self._remove_run_dir()
            raise
        self.sessions = SessionManager(
            settings, self.sandbox, self.run_dir, find_package=self.store.find
        )
        self.agents = Agents(self.store, self.sessions, access)
        self.executions = ExecutionStore(
            keep_seconds=settings.executions_keep_seconds,
            keep_count=settings.executions_keep_count,
            limits=LogLimits(
                events=settings.execution_log_events, bytes=settings.execution_log_bytes
            ),
        )
        self.executor = Executor(self.sessions, self.executions)
        self.metering.attach(self)
        self.bind_metrics()
        # Set at SIGTERM: requests on connections still open are answered 503 shutting_down.
        self.shutting_down = False
        self._requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.started_at = time.time()

    async def start(self) -> None:
        if self._own_run_dir:
            stale = await asyncio.to_thread(layout.sweep_dead_run_dirs, str(self.run_dir.parent))
            if stale:
                log.info("removed %d run dirs of servers that died: %s", len(stale), stale)
        await self.sandbox.start()
        await self.store.open()
        await self.sessions.start()
        if self.settings.packages_dir is not None:
            await self._load_folder(self.settings.packages_dir, "packages_dir")
        if self.settings.examples:
            examples = self.settings.examples_dir or bundled.examples_dir()
            if not examples.is_dir():
                raise RuntimeError(f"--examples: no such folder: {examples}")
            out = self.settings.state_dir / "examples-build"
            built = await asyncio.to_thread(builder.build_all, examples, out)
            if not built:
                raise RuntimeError(f"--examples: no agent source (agent.yaml) in {examples}")
            for path in built:
                await self._load_one(path, "examples")

    async def _load_folder(self, folder: Path, source: str) -> None:
        paths = await asyncio.to_thread(lambda: sorted(folder.glob("*.apkg")))
        for path in paths:
            await self._load_one(path, source)

    async def _load_one(self, path: Path, source: str) -> None:
        try:
            result = await self.agents.load(
                path, sha256=None, source=f"{source}:{path}", use_sidecar=True
            )
            log.info("loaded %s from %s (%s)", result.package.id, path, result.status)
        except RuntimeAPIError as exc:
            log.error("skipping %s: %s", path, exc.message)
        except Exception:  # one unreadable file must not stop the server from starting
            log.exception("skipping %s: unexpected error while loading", path)

    async def stop(self) -> None:
        try:
            await self.executor.stop()
            await self.sessions.stop()
        finally:
            # After the sessions: the calls they cancelled are recorded too.
            await self.metering.close()
            await asyncio.to_thread(self.sandbox.close)
            await asyncio.to_thread(self._remove_run_dir)

    def _remove_run_dir(self) -> None:
        for sub in ("k", "w"):
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir / sub)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def info(self, *, host: bool = True) -> dict[str, Any]:
        """``host``: the sandbox report with its paths (attach/admin only)."""
        out = {
            "version": __version__,
            "start_time": _iso(self.started_at),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "packages_loaded": len(self.store.list()),
            "agents_mounted": len(self.agents.list()),
            "total_invocations": self.sessions.invocations,
            "status": "running",
            "sessions": self.sessions.counts(),
            "pool": self.sessions.pool.describe() if self.sessions.pool else {"size": 0},
        }
        if host:
            out["sandbox"] = self.sandbox.report()
        else:
            out["sandbox"] = {"mode": self.sandbox.mode}
        return out

    def sandbox_report(self) -> dict[str, Any]:
        return self.sandbox.report()

    def request_started(self) -> None:
        self._requests += 1
        self._idle.clear()

    def request_ended(self) -> None:
        self._requests -= 1
        if self._requests <= 0:
            self._requests = 0
            self._idle.set()

    async def requests_done(self, timeout: float) -> None:
        """Until every request being answered has been (at most ``timeout`` seconds)."""
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def bind_metrics(self) -> None:
        metrics.AGENT_LABELS = self.settings.metrics_agent_labels
        metrics.bind(
            packages=lambda: len(self.store.list()),
            sessions_by_state=self.sessions.by_state,
            queue_depth=self.sessions.queue_depth,
            executions=lambda: self.executions.counts()["kept"],
            pool_size=lambda: self.sessions.pool.ready() if self.sessions.pool else 0,
            ledger_lag=self.metering.pending,
        )


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request: the route template, and what the call was about where it applies
    (the handler's ``log_fields``: agent, session, execution, trace). The path is logged
    without its query (a websocket's ``?token=`` never reaches the log)."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    latency = 1000.0 * handler.request.request_time()
    principal = getattr(handler, "principal", None)
    extra = {
        "request_id": getattr(handler, "request_id", None),
        "method": handler.request.method,
        "route": getattr(handler, "route", None),
        "path": handler.request.path,
        "status": status,
        "latency_ms": round(latency, 3),
        "tenant": principal.tenant if principal is not None else None,
        **getattr(handler, "log_fields", {}),
    }
    logging.getLogger("pixell_kernel_runtime.access").log(
        level,
        "%s %s %d %.1fms",
        handler.request.method,
        handler.request.path,
        status,
        latency,
        extra={k: v for k, v in extra.items() if v is not None},
    )


def make_app(runtime: Runtime) -> tornado.web.Application:
    kw = {"runtime": runtime}
    agent_id = r"(.+)"
    routes: list[Any] = [
        (r"/runtime/health", runtime_api.HealthHandler, kw),
        (r"/health", runtime_api.HealthHandler, kw),
        (r"/runtime/info", runtime_api.InfoHandler, kw),
        (r"/runtime/sandbox", runtime_api.SandboxHandler, kw),
        (openapi_api.PATH, openapi_api.OpenAPIHandler, kw),
        (r"/runtime/packages", packages_api.PackagesHandler, kw),
        (r"/runtime/packages/load", packages_api.LoadHandler, kw),
        (r"/runtime/packages/upload", packages_api.UploadHandler, kw),
        (r"/runtime/packages/([^/]+)", packages_api.PackageHandler, kw),
        (r"/runtime/agents", agents_api.AgentsHandler, kw),
        (rf"/runtime/agents/{agent_id}/invoke", agents_api.InvokeHandler, kw),
        (rf"/runtime/agents/{agent_id}/stream", stream_api.StreamSocket, kw),
        (rf"/runtime/agents/{agent_id}", agents_api.AgentHandler, kw),
        (r"/runtime/executions/([^/]+)", executions_api.ExecutionHandler, kw),
        (r"/runtime/executions/([^/]+)/events", executions_api.EventsHandler, kw),
        (r"/runtime/executions/([^/]+)/cancel", executions_api.CancelHandler, kw),
        (r"/runtime/usage", usage_api.UsageHandler, kw),
        (r"/runtime/sessions", sessions_api.SessionsHandler, kw),
        (r"/runtime/sessions/([^/]+)", sessions_api.SessionHandler, kw),
        (r"/runtime/sessions/([^/]+)/interrupt", sessions_api.InterruptHandler, kw),
        (r"/runtime/sessions/([^/]+)/restart", sessions_api.RestartHandler, kw),
        (r"/runtime/sessions/([^/]+)/variables", sessions_api.VariablesHandler, kw),
        (r"/runtime/sessions/([^/]+)/connection", sessions_api.ConnectionHandler, kw),
        (r"/runtime/sessions/([^/]+)/notebook", sessions_api.NotebookHandler, kw),
        *jupyter_routes(kw),
    ]
    if runtime.settings.metrics_enabled:
        routes.append((r"/metrics", runtime_api.MetricsHandler, kw))
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=kw,
        runtime=runtime,
        metrics_enabled=runtime.settings.metrics_enabled,
        log_function=_log_request,
        compress_response=False,
        xsrf_cookies=False,
    )
