"""Prometheus metrics, on a registry of our own so that nothing global leaks in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# The original's names, kept so that existing dashboards work. Labelled by the
# route pattern, never the raw path: raw paths make the label set unbounded.
HTTP_REQUESTS = Counter(
    "pixell_http_requests_total",
    "HTTP requests answered",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "pixell_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route"],
    registry=REGISTRY,
)
INVOCATIONS = Counter(
    "pixell_invocations_total",
    "Agent invocations by kind and outcome",
    ["kind", "status"],
    registry=REGISTRY,
)
INVOKE_DURATION = Histogram(
    "pixell_invoke_duration_seconds",
    "Agent invocation duration, queueing included",
    ["kind"],
    registry=REGISTRY,
)
PACKAGES_LOADED = Gauge("pixell_packages_loaded", "Installed packages", registry=REGISTRY)
SESSIONS_ACTIVE = Gauge("pixell_sessions_active", "Sessions with a kernel", registry=REGISTRY)
KERNEL_STARTS = Counter(
    "pixell_kernel_starts_total", "Kernels started", ["reason"], registry=REGISTRY
)
KERNEL_DEATHS = Counter(
    "pixell_kernel_deaths_total", "Kernels that died or were killed", ["cause"], registry=REGISTRY
)
