"""/runtime/health, /runtime/info, /runtime/sandbox and /metrics."""

from __future__ import annotations

from datetime import UTC, datetime

import tornado.web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pixell_kernel_runtime import __version__, metrics
from pixell_kernel_runtime.api.base import ANY, PUBLIC, BaseHandler


class HealthHandler(BaseHandler):
    route = "/runtime/health"
    scopes = {"GET": PUBLIC, "HEAD": PUBLIC}

    def get(self) -> None:
        self.write_json(
            {
                "status": "healthy",
                "version": __version__,
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
        )


class InfoHandler(BaseHandler):
    route = "/runtime/info"
    scopes = {"GET": ANY}

    def get(self) -> None:
        self.write_json(self.runtime.info(host=self.can_see_host()))


class SandboxHandler(BaseHandler):
    route = "/runtime/sandbox"
    scopes = {"GET": "admin"}

    def get(self) -> None:
        self.write_json(self.runtime.sandbox_report())


class MetricsHandler(BaseHandler):
    route = "/metrics"
    scopes = {"GET": "usage"}

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))


class MetricsPortHandler(tornado.web.RequestHandler):
    """``/metrics`` on the metrics port (METRICS_HOST, loopback by default): no credentials,
    as Prometheus scrapes; bind it where only the scraper reaches it."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))


def metrics_app() -> tornado.web.Application:
    return tornado.web.Application([(r"/metrics", MetricsPortHandler)])
