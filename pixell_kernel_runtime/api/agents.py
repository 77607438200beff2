"""/runtime/agents: list, inspect and invoke (a JSON answer, or its events as SSE)."""

from __future__ import annotations

from typing import Any

from pixell_kernel_runtime.agents import Agent
from pixell_kernel_runtime.api import invoke_request, sse
from pixell_kernel_runtime.api.base import BaseHandler, Field
from pixell_kernel_runtime.errors import NotFound, RuntimeAPIError

# Agents whose manifest lists this capability answer SSE unless the caller asks for JSON.
STREAMING = "streaming"


def callable_agent(runtime, agent_id: str, principal) -> Agent:  # type: ignore[no-untyped-def]
    """An agent a caller may invoke: a private sub-agent is not there for callers either."""
    agent = runtime.agents.get(agent_id, principal)
    if agent.private:
        raise NotFound(f"Agent not found: {agent_id}", code="agent_not_found")
    return agent


async def start_invoke(handler, agent: Agent, body: dict[str, Any]):  # type: ignore[no-untyped-def]
    """An invoke body (its shapes checked) validated and started as an execution: what the
    HTTP invoke and the websocket stream share. Returns the execution and the request."""
    request = invoke_request.parse(
        agent.export.kind,
        body.get("input") or {},
        body.get("context") or {},
        handler.runtime.settings,
    )
    assert handler.principal is not None
    execution = await handler.runtime.executor.start(
        agent,
        request,
        trace_id=body.get("trace_id") or handler.request_id,
        tenant=handler.tenant(),
        subject=handler.principal.subject,
    )
    return execution, request


def streams_by_default(agent: Agent) -> bool:
    return STREAMING in (agent.export.capabilities or ())


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
        # Look the agent up first: an unknown agent is a 404 whatever the body.
        agent = callable_agent(self.runtime, agent_id, self.principal)
        stream = sse.wants_stream(self, streams_by_default(agent))
        body = self.json_body(
            {"input": Field(dict), "context": Field(dict), "trace_id": Field(str)}
        )
        execution, request = await start_invoke(self, agent, body)
        self.set_header("X-Execution-Id", execution.id)
        self.log_fields = {
            "agent_id": agent.id,
            "session_id": request.session_id,
            "execution_id": execution.id,
            "trace_id": body.get("trace_id") or self.request_id,
        }
        if stream:
            keepalive = self.runtime.settings.sse_keepalive_seconds
            await sse.send(self, execution, after=0, keepalive=keepalive)
            return
        # A client that leaves does not stop the call: it runs on, to be read by its id.
        await execution.wait()
        failure = execution.failure
        if isinstance(failure, RuntimeAPIError):
            raise failure
        if failure is not None:
            assert execution.answer is not None  # the envelope of what ended it
            env = execution.answer
            raise RuntimeAPIError(
                env["message"], status=env["status"], kind=env["error"], code=env["code"]
            )
        self.write_json(execution.answer)
