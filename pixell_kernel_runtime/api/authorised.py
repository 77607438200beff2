"""Who is calling, and may they: the authentication every handler (HTTP or websocket) shares."""

from __future__ import annotations

import logging
import re
from typing import Any

import tornado.web

from pixell_kernel_runtime.auth import AuthError, Principal
from pixell_kernel_runtime.auth.principal import DEFAULT_TENANT
from pixell_kernel_runtime.errors import RuntimeAPIError

audit = logging.getLogger("pixell_kernel_runtime.audit")
# A handler method's scope: a name from auth.SCOPES, ANY (any authenticated principal) or
# PUBLIC (no principal at all: only the health check).
ANY = ""
PUBLIC = None
# An incoming X-Request-ID is echoed back only when it looks like one.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def implemented(handler: type[tornado.web.RequestHandler]) -> list[str]:
    """The HTTP methods a handler class defines itself (RequestHandler's own answer 405)."""
    base = tornado.web.RequestHandler
    return [
        m
        for m in base.SUPPORTED_METHODS
        if getattr(handler, m.lower()) is not getattr(base, m.lower())
    ]


class Authorised:
    """Mixed into tornado handlers that have ``self.runtime`` (see ``BaseHandler``)."""

    #: The route pattern used as a metrics label (never the raw path).
    route = "unknown"
    #: The scope each HTTP method needs; a method not named needs ``admin`` (fail closed).
    scopes: dict[str, str | None] = {}
    #: Websocket routes alone may carry their token as ``?token=`` (browsers cannot set headers).
    query_token = False
    principal: Principal | None = None
    # What the request was about, for its access log line (agent_id, session_id, ...).
    log_fields: dict[str, Any] = {}
    runtime: Any
    request: Any

    async def _authenticate(self) -> Principal | None:
        needed = self.scopes.get(self.request.method or "", "admin")
        if needed is PUBLIC or self.request.method not in implemented(type(self)):
            # A method the handler lacks runs nothing of it: the answer is 405 (with Allow).
            return None
        token = self.get_query_argument("token", None) if self.query_token else None
        try:
            principal = await self.runtime.auth.authenticate(
                self.request.headers.get("Authorization"), token
            )
        except AuthError as exc:
            self._audit("auth_failed", None, exc.reason, 401)
            raise RuntimeAPIError(
                exc.message, status=401, kind="Unauthorized", code="unauthorized"
            ) from None
        if needed and not principal.has(needed):
            self._audit("auth_forbidden", principal, f"missing scope {needed}", 403)
            raise RuntimeAPIError(
                f"{self.request.method} {self.route} needs the {needed!r} scope",
                status=403,
                kind="Forbidden",
                code="forbidden",
            )
        return principal

    def _audit(self, event: str, principal: Principal | None, reason: str, status: int) -> None:
        audit.warning(
            "%s %s %s: %s",
            event,
            self.request.method,
            self.route,
            reason,
            extra={
                "event_type": event,
                "request_id": getattr(self, "request_id", None),
                "tenant": principal.tenant if principal else None,
                "subject": principal.subject if principal else None,
                "route": self.route,
                "method": self.request.method,
                "status": status,
                "reason": reason,
            },
        )

    def tenant(self) -> str:
        """The tenant a request acts for: its principal's; an administrator may name another
        with ``?tenant=``."""
        p = self.principal
        if p is None:
            return DEFAULT_TENANT
        asked = self.get_query_argument("tenant", None)
        return asked if asked and p.admin else p.tenant

    def listing_tenant(self) -> str | None:
        """Whose sessions a listing shows: an administrator sees every tenant's (None)."""
        p = self.principal
        if p is not None and p.admin and not self.get_query_argument("tenant", None):
            return None
        return self.tenant()

    def can_see_host(self) -> bool:
        """Host facts (pids, paths, the interpreter) only for those who attach or administer."""
        p = self.principal
        return p is not None and (p.has("attach") or p.admin)
