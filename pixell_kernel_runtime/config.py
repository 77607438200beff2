"""One settings object: defaults <- environment variables <- command-line flags.

Validated once at start so that a bad value stops the server with a clear
message instead of failing on the first request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "pixell-kernel-runtime"


@dataclass
class ArchiveLimits:
    """Caps applied to every APKG before anything is written to the store."""

    max_entries: int = 10_000
    max_entry_bytes: int = 256 * MiB
    max_total_bytes: int = 1024 * MiB
    # Deflate reaches ~1000:1 only on degenerate input; real source trees sit far below 100:1.
    max_ratio: float = 200.0


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = field(default_factory=_default_state_dir)
    # Where installed (extracted) packages live; the original called it PACKAGE_CACHE_DIR.
    package_cache_dir: Path | None = None
    # A folder of .apkg files loaded at start.
    packages_dir: Path | None = None
    # Example agent source folders built and loaded at start (the README's run command).
    examples: bool = False
    examples_dir: Path | None = None
    max_upload_bytes: int = 512 * MiB
    max_body_bytes: int = 8 * MiB
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_enabled: bool = True
    # Prometheus text on a port of its own (0: any free port; the log says which).
    metrics_port: int = 9090
    metrics_host: str = "127.0.0.1"
    # Set when METRICS_PORT (or --metrics-port) was given: then a port in use is fatal.
    metrics_port_explicit: bool = False
    # Agents with a label of their own in the metrics (then `other`): bounds the series.
    metrics_agent_labels: int = 200
    # Sessions and execution.
    default_timeout_seconds: float = 60.0
    max_timeout_seconds: float = 600.0
    session_queue_size: int = 16
    max_sessions: int = 64
    # The original promised 90 minutes.
    session_idle_seconds: float = 5400.0
    # Past MAX_SESSIONS or KERNELS_MEMORY_BUDGET: evict the least recently used idle session
    # (lru) or answer 503 with Retry-After (refuse).
    session_eviction: str = "lru"
    # All kernels together (RSS of their process trees), bytes; 0: no budget.
    kernels_memory_budget: int = 0
    # Warm kernels per loaded package, started ahead of demand (0: no pool); modules they
    # import before a session takes them (comma-separated, e.g. "pandas").
    pool_size: int = 1
    pool_preload: str = ""
    kernels_dir: Path | None = None
    run_dir: Path | None = None
    # Sandbox.
    sandbox_mode: str = "best_effort"
    sandbox_config: Path | None = None
    # Where bubblewrap and unshare are, or "none" to do without (an operator forcing a
    # fallback, or tests showing that the fallbacks hold); unset means look them up on PATH.
    sandbox_bwrap: str | None = None
    sandbox_unshare: str | None = None
    # Subordinate-id files the sandbox uid range must not overlap (colon-separated paths).
    sandbox_subid_files: str = "/etc/subuid:/etc/subgid"

    # Authentication (see auth/): "auto" (tokens file and/or OIDC when set; open on loopback
    # with neither; a generated token otherwise) or "none" (off, loudly).
    auth: str = "auto"
    auth_tokens_file: Path | None = None
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    oidc_tenant_claim: str = "tenant"
    oidc_roles_claim: str = "roles"
    # Roles the operator requires per package or agent id (glob) -> role names (any of them).
    access_policy: Path | None = None
    # With authentication on, load by path accepts only files under these (default PACKAGES_DIR).
    load_roots: str | None = None
    max_sessions_per_tenant: int = 32
    max_invocations_per_tenant: int = 16
    # Execution records: finished ones are kept this long, at most this many (then 404 expired).
    executions_keep_seconds: float = 3600.0
    executions_keep_count: int = 1000
    # Each execution's event log (what streams replay); past it the oldest events go (a gap).
    execution_log_events: int = 10_000
    execution_log_bytes: int = 8 * MiB
    # Per execution: characters kept of each stream, rich outputs kept, their bytes.
    output_stream_chars: int = 1 * MiB
    output_max_outputs: int = 100
    output_max_bytes: int = 16 * MiB
    # A comment line on a quiet SSE stream this often (proxies drop idle connections).
    sse_keepalive_seconds: float = 15.0
    # SIGTERM: how long running calls (and their streams) may take to finish.
    shutdown_grace_seconds: float = 30.0
    # The usage ledger (SQLite); default STATE_DIR/metering.db.
    metering_db: Path | None = None

    @property
    def store_dir(self) -> Path:
        return self.package_cache_dir or (self.state_dir / "packages")

    def validate(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.sandbox_mode not in ("strict", "best_effort", "off"):
            raise ValueError(
                f"sandbox mode must be strict, best_effort or off, got {self.sandbox_mode!r}"
            )
        if self.log_format == "console":
            self.log_format = "text"
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log format must be json or console (text), got {self.log_format!r}")
        if not (0 <= self.metrics_port <= 65535):
            raise ValueError(f"METRICS_PORT must be 0-65535, got {self.metrics_port}")
        if self.default_timeout_seconds <= 0 or self.max_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("the default timeout exceeds the maximum timeout")
        if self.session_queue_size < 1 or self.max_sessions < 1:
            raise ValueError("session queue size and max sessions must be at least 1")
        if self.auth not in ("auto", "none"):
            raise ValueError(f"AUTH must be auto or none, got {self.auth!r}")
        if self.max_sessions_per_tenant < 1 or self.max_invocations_per_tenant < 1:
            raise ValueError("per-tenant caps must be at least 1")
        positive = {
            "EXECUTIONS_KEEP_SECONDS": self.executions_keep_seconds,
            "EXECUTIONS_KEEP_COUNT": self.executions_keep_count,
            "EXECUTION_LOG_EVENTS": self.execution_log_events,
            "EXECUTION_LOG_BYTES": self.execution_log_bytes,
            "OUTPUT_STREAM_CHARS": self.output_stream_chars,
            "OUTPUT_MAX_OUTPUTS": self.output_max_outputs,
            "OUTPUT_MAX_BYTES": self.output_max_bytes,
            "SSE_KEEPALIVE_SECONDS": self.sse_keepalive_seconds,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.session_eviction not in ("lru", "refuse"):
            raise ValueError(
                f"SESSION_EVICTION must be lru or refuse, got {self.session_eviction!r}"
            )
        if self.pool_size < 0 or self.kernels_memory_budget < 0:
            raise ValueError("POOL_SIZE and KERNELS_MEMORY_BUDGET must not be negative")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("SHUTDOWN_GRACE_SECONDS must not be negative")
        if self.output_stream_chars > 1 * MiB:
            # The kernel caps each stream at just under 1 MiB before it is sent.
            raise ValueError("OUTPUT_STREAM_CHARS must be at most 1048576 (the kernel's cap)")
        if self.packages_dir is not None and not self.packages_dir.is_dir():
            raise ValueError(f"packages dir is not a directory: {self.packages_dir}")


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str) -> int:
    """Bytes from ``8589934592``, ``8G``, ``512M``, ``512MiB`` or ``1.5G``."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    try:
        size = float(number)
    except ValueError:
        raise ValueError(f"not a size: {value!r} (say 8G, 512M or a number of bytes)") from None
    if size < 0:
        raise ValueError(f"not a size: {value!r}")
    return int(size * _UNITS[unit])


def _as_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


# Environment variable -> (settings field, converter). Documented in the README.
ENV_VARS: dict[str, tuple[str, Any]] = {
    "HOST": ("host", str),
    "PORT": ("port", int),
    "STATE_DIR": ("state_dir", Path),
    "PACKAGE_CACHE_DIR": ("package_cache_dir", Path),
    "PACKAGES_DIR": ("packages_dir", Path),
    "MAX_UPLOAD_BYTES": ("max_upload_bytes", int),
    "MAX_BODY_BYTES": ("max_body_bytes", int),
    "LOG_LEVEL": ("log_level", str),
    "LOG_FORMAT": ("log_format", str),
    "METRICS_ENABLED": ("metrics_enabled", _as_bool),
    "METRICS_PORT": ("metrics_port", int),
    "METRICS_HOST": ("metrics_host", str),
    "METRICS_AGENT_LABELS": ("metrics_agent_labels", int),
    "DEFAULT_TIMEOUT_SECONDS": ("default_timeout_seconds", float),
    "MAX_TIMEOUT_SECONDS": ("max_timeout_seconds", float),
    "SESSION_QUEUE_SIZE": ("session_queue_size", int),
    "MAX_SESSIONS": ("max_sessions", int),
    "SESSION_IDLE_SECONDS": ("session_idle_seconds", float),
    "SESSION_EVICTION": ("session_eviction", str),
    "KERNELS_MEMORY_BUDGET": ("kernels_memory_budget", parse_size),
    "POOL_SIZE": ("pool_size", int),
    "POOL_PRELOAD": ("pool_preload", str),
    "KERNELS_DIR": ("kernels_dir", Path),
    "RUN_DIR": ("run_dir", Path),
    "SANDBOX_MODE": ("sandbox_mode", str),
    "SANDBOX_CONFIG": ("sandbox_config", Path),
    "SANDBOX_BWRAP": ("sandbox_bwrap", str),
    "SANDBOX_UNSHARE": ("sandbox_unshare", str),
    "SANDBOX_SUBID_FILES": ("sandbox_subid_files", str),
    "AUTH": ("auth", str),
    "AUTH_TOKENS_FILE": ("auth_tokens_file", Path),
    "OIDC_ISSUER": ("oidc_issuer", str),
    "OIDC_AUDIENCE": ("oidc_audience", str),
    "OIDC_JWKS_URL": ("oidc_jwks_url", str),
    "OIDC_TENANT_CLAIM": ("oidc_tenant_claim", str),
    "OIDC_ROLES_CLAIM": ("oidc_roles_claim", str),
    "ACCESS_POLICY": ("access_policy", Path),
    "LOAD_ROOTS": ("load_roots", str),
    "MAX_SESSIONS_PER_TENANT": ("max_sessions_per_tenant", int),
    "MAX_INVOCATIONS_PER_TENANT": ("max_invocations_per_tenant", int),
    "EXECUTIONS_KEEP_SECONDS": ("executions_keep_seconds", float),
    "EXECUTIONS_KEEP_COUNT": ("executions_keep_count", int),
    "EXECUTION_LOG_EVENTS": ("execution_log_events", int),
    "EXECUTION_LOG_BYTES": ("execution_log_bytes", int),
    "OUTPUT_STREAM_CHARS": ("output_stream_chars", int),
    "OUTPUT_MAX_OUTPUTS": ("output_max_outputs", int),
    "OUTPUT_MAX_BYTES": ("output_max_bytes", int),
    "SSE_KEEPALIVE_SECONDS": ("sse_keepalive_seconds", float),
    "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", float),
    "METERING_DB": ("metering_db", Path),
}

ARCHIVE_ENV_VARS: dict[str, tuple[str, Any]] = {
    "APKG_MAX_ENTRIES": ("max_entries", int),
    "APKG_MAX_ENTRY_BYTES": ("max_entry_bytes", int),
    "APKG_MAX_TOTAL_BYTES": ("max_total_bytes", int),
    "APKG_MAX_RATIO": ("max_ratio", float),
}


def from_env(environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    settings = Settings()
    for name, (attr, conv) in ENV_VARS.items():
        raw = environ.get(name) or environ.get("PIXELL_" + name)
        if raw:
            try:
                setattr(settings, attr, conv(raw))
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={raw!r}: {exc}") from None
            if attr == "metrics_port":
                settings.metrics_port_explicit = True
    for name, (attr, conv) in ARCHIVE_ENV_VARS.items():
        raw = environ.get(name) or environ.get("PIXELL_" + name)
        if raw:
            try:
                setattr(settings.archive, attr, conv(raw))
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={raw!r}: {exc}") from None
    return settings


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    names = {f.name for f in fields(settings)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise KeyError(key)
        setattr(settings, key, value)
        if key == "metrics_port":
            settings.metrics_port_explicit = True
    return settings
