"""Who is asking: a principal, the scopes it holds, and the two ways a request can fail."""

from __future__ import annotations

from dataclasses import dataclass, field

# What each scope lets a principal do (the README's API table names one per route).
SCOPES = (
    "invoke",  # run agents
    "sessions",  # list, inspect, interrupt, restart, delete, read variables of one's sessions
    "attach",  # connection info, console, the Jupyter kernels API
    "packages:read",  # list packages and agents
    "packages:write",  # load, upload, delete packages
    "usage",  # metering and metrics
    "admin",  # everything, every tenant
)
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    roles: frozenset[str] = field(default_factory=frozenset)
    # How it was established: "token", "oidc", or "open" (no authentication configured).
    via: str = "token"

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    def log_fields(self) -> dict[str, str]:
        return {"tenant": self.tenant, "subject": self.subject}


def open_principal() -> Principal:
    """The principal of every request when authentication is off (loopback, nothing set)."""
    return Principal(DEFAULT_TENANT, "anonymous", frozenset(SCOPES), frozenset(), via="open")


class AuthError(Exception):
    """401: no credentials, or credentials that do not verify. ``reason`` is for the audit log,
    never for the client beyond a short phrase."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or message


def parse_scopes(raw: object) -> frozenset[str]:
    """Scopes from a list or a space-separated string (OAuth's ``scope``); unknown ones kept
    out so that a typo never grants anything."""
    if isinstance(raw, str):
        items = raw.split()
    elif isinstance(raw, list | tuple | set | frozenset):
        items = [str(x) for x in raw]
    else:
        items = []
    return frozenset(s for s in items if s in SCOPES)
