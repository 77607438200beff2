"""/runtime/agents: list, inspect and invoke."""

from __future__ import annotations

from pixell_kernel_runtime.api import invoke_request
from pixell_kernel_runtime.api.base import BaseHandler, Field
from pixell_kernel_runtime.errors import NotFound
from pixell_kernel_runtime.execution.invoke import invoke


class AgentsHandler(BaseHandler):
    route = "/runtime/agents"
    scopes = {"GET": "packages:read"}

    def get(self) -> None:
        agents = self.runtime.agents.list(self.principal)
        self.write_json({"agents": [a.summary() for a in agents]})


class AgentHandler(BaseHandler):
    route = "/runtime/agents/{id}"
    scopes = {"GET": "packages:read"}

    def get(self, agent_id: str) -> None:
        self.write_json(self.runtime.agents.get(agent_id, self.principal).detail())


class InvokeHandler(BaseHandler):
    route = "/runtime/agents/{id}/invoke"
    scopes = {"POST": "invoke"}

    async def post(self, agent_id: str) -> None:
        # Look the agent up first: an unknown agent is a 404 whatever the body. A private
        # sub-agent is not there for callers either (nor counted as an invocation).
        agent = self.runtime.agents.get(agent_id, self.principal)
        if agent.private:
            raise NotFound(f"Agent not found: {agent_id}", code="agent_not_found")
        body = self.json_body(
            {"input": Field(dict), "context": Field(dict), "trace_id": Field(str)}
        )
        request = invoke_request.parse(
            agent.export.kind,
            body.get("input") or {},
            body.get("context") or {},
            self.runtime.settings,
        )
        answer = await invoke(
            self.runtime.sessions,
            agent,
            request,
            trace_id=body.get("trace_id") or self.request_id,
            tenant=self.tenant(),
        )
        self.write_json(answer)
