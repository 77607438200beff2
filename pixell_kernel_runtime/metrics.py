"""Prometheus metrics, on a registry of our own so that nothing global leaks in.

Every label is bounded: routes are handler templates (never raw paths), agents are ids of
loaded packages and at most ``AGENT_LABELS`` of them (then ``other``), the rest are fixed sets.
Gauges read the runtime when scraped (``set_function``), so nothing refreshes them in a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
AGENT_LABELS = 200

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
    "Agent invocations by agent and outcome (success or error)",
    ["agent", "status"],
    registry=REGISTRY,
)
INVOKE_DURATION = Histogram(
    "pixell_invoke_duration_seconds",
    "Agent invocation duration, queueing included",
    ["kind"],
    registry=REGISTRY,
)
PACKAGES_LOADED = Gauge("pixell_packages_loaded", "Installed packages", registry=REGISTRY)
PACKAGE_LOADS = Counter(
    "pixell_package_loads_total",
    "Package loads by result (installed, replaced, unchanged, refused)",
    ["result"],
    registry=REGISTRY,
)
SESSIONS_ACTIVE = Gauge("pixell_sessions_active", "Sessions with a kernel", registry=REGISTRY)
SESSION_STATES = ("not_started", "idle", "busy", "dead")
SESSIONS = Gauge("pixell_sessions", "Sessions by kernel state", ["state"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "pixell_queue_depth", "Calls waiting for their session's turn", registry=REGISTRY
)
KERNEL_STARTS = Counter(
    "pixell_kernel_starts_total", "Kernels started", ["reason"], registry=REGISTRY
)
KERNEL_START_SECONDS = Histogram(
    "pixell_kernel_start_seconds",
    "From launch to a kernel ready for its first cell (sandbox and bootstrap included)",
    buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
# timeout | cancelled (ignored the interrupt, restarted) | oom (SIGKILL: the memory limit, or
# killed from outside) | signal (any other) | exit (it exited) | restart_failed
KERNEL_DEATHS = Counter(
    "pixell_kernel_deaths_total", "Kernels that died or were killed", ["reason"], registry=REGISTRY
)
POOL_SIZE = Gauge("pixell_pool_size", "Warm kernels ready in the pool", registry=REGISTRY)
POOL_REQUESTS = Counter(
    "pixell_pool_requests_total",
    "New sessions that found a warm kernel (hit) or started one (miss)",
    ["result"],
    registry=REGISTRY,
)
STREAM_BYTES = Counter(
    "pixell_stream_bytes_total",
    "Bytes sent to stream readers (sse, websocket, channels)",
    ["surface"],
    registry=REGISTRY,
)
EXECUTIONS_KEPT = Gauge(
    "pixell_executions_kept", "Execution records held (running and finished)", registry=REGISTRY
)
LEDGER_LAG = Gauge(
    "pixell_metering_ledger_lag",
    "Usage records waiting to be written to the metering ledger",
    registry=REGISTRY,
)

_agents: set[str] = set()


def agent_label(agent_id: str) -> str:
    """The agent's own label while fewer than ``AGENT_LABELS`` agents have one, else other."""
    if agent_id in _agents:
        return agent_id
    if len(_agents) < AGENT_LABELS:
        _agents.add(agent_id)
        return agent_id
    return "other"


def death_reason(signal_number: int | None, exit_code: int | None) -> str:
    """A kernel death's label from how its process ended."""
    if signal_number == 9:
        return "oom"
    if signal_number is not None:
        return "signal"
    return "exit"


def bind(
    *,
    packages: Callable[[], int],
    sessions_by_state: Callable[[], dict[str, int]],
    queue_depth: Callable[[], int],
    executions: Callable[[], int],
    pool_size: Callable[[], int] | None = None,
    ledger_lag: Callable[[], int] | None = None,
) -> None:
    """Point the gauges at one runtime (the last one bound wins: one per process)."""
    PACKAGES_LOADED.set_function(packages)
    QUEUE_DEPTH.set_function(queue_depth)
    EXECUTIONS_KEPT.set_function(executions)
    SESSIONS_ACTIVE.set_function(
        lambda: sum(_v for k, _v in sessions_by_state().items() if k in ("idle", "busy"))
    )
    for state in SESSION_STATES:
        SESSIONS.labels(state).set_function(_pick(sessions_by_state, state))
    POOL_SIZE.set_function(pool_size or (lambda: 0))
    LEDGER_LAG.set_function(ledger_lag or (lambda: 0))


def _pick(source: Callable[[], dict[str, int]], key: str) -> Callable[[], Any]:
    return lambda: source().get(key, 0)
