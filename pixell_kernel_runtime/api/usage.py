"""GET /runtime/usage: the metering ledger, aggregated (read off the event loop).

Query: ``from``/``to`` (ISO dates or datetimes, by when executions ended: ``from`` included,
``to`` excluded, a date as ``to`` includes that day), ``group_by`` (comma-separated, or
repeated: tenant, agent, package, day, status, kind, subject; default tenant,agent,day),
``agent`` (one agent id), ``tenant`` (an ``admin`` only: without it an admin sees every tenant;
anyone else sees their own tenant's usage and is refused another's).
"""

from __future__ import annotations

from typing import Any

from pixell_kernel_runtime.api.base import BaseHandler
from pixell_kernel_runtime.errors import RuntimeAPIError, ValidationFailed
from pixell_kernel_runtime.metering.ledger import DEFAULT_GROUPS, GROUPS, iso, parse_bound

_KNOWN = {"from", "to", "group_by", "agent", "tenant"}


def _problem(name: str, msg: str, type_: str = "value_error") -> dict[str, Any]:
    return {"loc": ["query", name], "msg": msg, "type": type_}


class UsageHandler(BaseHandler):
    route = "/runtime/usage"
    scopes = {"GET": "usage"}

    def _one(self, name: str, problems: list[dict[str, Any]]) -> str | None:
        values = self.get_query_arguments(name)
        if len(values) > 1:
            problems.append(_problem(name, "given more than once"))
        return values[0] if values else None

    def _query(self) -> dict[str, Any]:
        problems: list[dict[str, Any]] = []
        unknown = sorted(set(self.request.query_arguments) - _KNOWN)
        for name in unknown:
            problems.append(_problem(name[:64], "unknown parameter", "value_error.extra"))
        bounds: dict[str, float | None] = {}
        for name in ("from", "to"):
            raw = self._one(name, problems)
            bounds[name] = None
            if raw is not None and raw.strip():  # `from=` is no bound, as no `from` is
                try:
                    bounds[name] = parse_bound(raw, end=name == "to")
                except ValueError as exc:
                    problems.append(_problem(name, str(exc), "value_error.datetime"))
        start, end = bounds["from"], bounds["to"]
        if start is not None and end is not None and start >= end:
            problems.append(_problem("to", "must be later than from"))
        groups: list[str] = []
        for raw in self.get_query_arguments("group_by"):
            for name in filter(None, (g.strip() for g in raw.split(","))):
                if name not in GROUPS:
                    known = ", ".join(GROUPS)
                    problems.append(_problem("group_by", f"{name[:64]!r} is not one of {known}"))
                elif name not in groups:
                    groups.append(name)
        agent = self._one("agent", problems)
        tenant = self._one("tenant", problems)
        if problems:
            raise ValidationFailed(problems)
        return {
            "start": start,
            "end": end,
            "group_by": tuple(groups) if self.get_query_arguments("group_by") else DEFAULT_GROUPS,
            "agent": agent or None,
            "tenant": self._whose(tenant or None),
        }

    def _whose(self, asked: str | None) -> str | None:
        """The tenant whose usage is read; None is every tenant (an admin, not naming one)."""
        p = self.principal
        if p is None or p.admin:
            return asked
        if asked is not None and asked != p.tenant:
            raise RuntimeAPIError(
                "only an admin may read another tenant's usage",
                status=403,
                kind="Forbidden",
                code="forbidden",
            )
        return p.tenant

    async def get(self) -> None:
        q = self._query()
        result = await self.runtime.metering.summary(
            tenant=q["tenant"],
            start=q["start"],
            end=q["end"],
            group_by=q["group_by"],
            agent=q["agent"],
        )
        self.write_json(
            {
                "tenant": q["tenant"],
                "from": iso(q["start"]),
                "to": iso(q["end"]),
                "group_by": list(q["group_by"]),
                "agent": q["agent"],
                **result,
            }
        )
