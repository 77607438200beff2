"""/runtime/agents: list, inspect and invoke."""

from __future__ import annotations

from pixell_kernel_runtime.api.base import BaseHandler, Field
from pixell_kernel_runtime.errors import NotFound


class AgentsHandler(BaseHandler):
    route = "/runtime/agents"

    def get(self) -> None:
        self.write_json({"agents": [a.summary() for a in self.runtime.agents.list()]})


class AgentHandler(BaseHandler):
    route = "/runtime/agents/{id}"

    def get(self, agent_id: str) -> None:
        self.write_json(self.runtime.agents.get(agent_id).detail())


class InvokeHandler(BaseHandler):
    route = "/runtime/agents/{id}/invoke"

    async def post(self, agent_id: str) -> None:
        # Look the agent up first: an unknown agent is a 404 whatever the body. A private
        # sub-agent is not there for callers either (nor counted as an invocation).
        agent = self.runtime.agents.get(agent_id)
        if agent.private:
            raise NotFound(f"Agent not found: {agent_id}", code="agent_not_found")
        body = self.json_body(
            {"input": Field(dict), "context": Field(dict), "trace_id": Field(str)}
        )
        answer = await self.runtime.invoke(
            agent,
            body.get("input") or {},
            context=body.get("context") or {},
            trace_id=body.get("trace_id") or self.request_id,
        )
        self.write_json(answer)
