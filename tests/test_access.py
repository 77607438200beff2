"""Per-agent roles and the per-tenant invocation cap, through REST (issue 9 items 3 and 4).

The operator's ACCESS_POLICY requires roles per package or agent glob; a manifest's
``role_required`` narrows that further and can never widen it. A principal without the roles
gets 404 for the agent, exactly as for a missing one, and does not see it listed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES, Server, make_apkg, manifest_yaml, stop_all, wait_for
from jwks_server import assert_no_token_in_logs, create_token, request

from pixell_kernel_runtime.packages.builder import build_all

CE = "pixell-python-agent@0.1.0/code-executor"
FIN = "finance-agent@0.1.0/default"
MINTED: list[str] = []
LOGS: list[Path] = []

# name -> roles; every token is tenant "acme" with invoke and packages:read.
ROLES: dict[str, tuple[str, ...]] = {
    "nobody": (),
    "dev": ("developer",),
    "analyst": ("analyst",),
    "finance": ("finance",),
    "fin_analyst": ("finance", "analyst"),
    "everyone": ("developer", "finance", "analyst"),
}


def invoke_path(agent: str) -> str:
    return f"/runtime/agents/{quote(agent, safe='@')}/invoke"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("access")
    tokens_file = base / "tokens.yaml"
    tokens = {
        name: create_token(tokens_file, "acme", name, "invoke", "packages:read", roles=roles)
        for name, roles in ROLES.items()
    }
    tokens["admin"] = create_token(tokens_file, "ops", "admin", "admin")
    MINTED.extend(tokens.values())
    policy = base / "access.yaml"
    policy.write_text('roles:\n  "pixell-python-agent@*": [developer]\n  "finance-*": [finance]\n')
    packages = base / "packages"
    packages.mkdir()
    built = build_all(EXAMPLES, packages)
    make_apkg(
        packages / "finance-agent-0.1.0.apkg",
        {
            # The manifest narrows the operator's "finance" rule: it also wants "analyst".
            "agent.yaml": manifest_yaml("finance-agent", role_required="analyst"),
            "main.py": "def handler(payload):\n    return {'ledger': 'balanced'}\n",
        },
    )
    server = Server(
        base / "state",
        ["--packages-dir", str(packages)],
        {"AUTH_TOKENS_FILE": str(tokens_file), "ACCESS_POLICY": str(policy)},
    )
    LOGS.append(server.log_path)
    server.start()
    try:
        assert len(built) == 2
        yield {"server": server, "tokens": tokens}
    finally:
        stop_all([server])


def listed(env: dict[str, Any], who: str) -> set[str]:
    resp = request(env["server"].port, "GET", "/runtime/agents", env["tokens"][who])
    assert resp.status == 200, resp
    return {a["id"] for a in resp.json()["agents"]}


def call(env: dict[str, Any], who: str, agent: str, input_: dict[str, Any]) -> Any:
    return request(
        env["server"].port, "POST", invoke_path(agent), env["tokens"][who], body={"input": input_}
    )


def assert_not_found(resp: Any, agent: str) -> None:
    assert resp.status == 404, resp
    body = resp.json()
    assert body["code"] == "agent_not_found" and body["message"] == f"Agent not found: {agent}"


def test_listing_shows_only_what_the_roles_allow(env: dict[str, Any]) -> None:
    python_agents = {a for a in listed(env, "everyone") if a.startswith("pixell-python-agent@")}
    assert CE in python_agents
    assert listed(env, "nobody") & (python_agents | {FIN}) == set()
    assert CE in listed(env, "dev") and FIN not in listed(env, "dev")
    # The policy's "finance" alone is not enough: the manifest also wants "analyst".
    assert FIN not in listed(env, "finance")
    assert FIN not in listed(env, "analyst")
    assert FIN in listed(env, "fin_analyst") and CE not in listed(env, "fin_analyst")
    assert {CE, FIN} <= listed(env, "admin")


def test_an_agent_without_the_role_is_not_found(env: dict[str, Any]) -> None:
    missing = "pixell-python-agent@0.1.0/no-such-agent"
    assert_not_found(call(env, "dev", missing, {"code": "1"}), missing)
    for who in ("nobody", "analyst", "finance", "fin_analyst"):
        assert_not_found(call(env, who, CE, {"code": "1 + 1"}), CE)
        resp = request(env["server"].port, "GET", f"/runtime/agents/{CE}", env["tokens"][who])
        assert_not_found(resp, CE)
    ok = call(env, "dev", CE, {"code": "1 + 1", "session_id": "dev"})
    assert ok.status == 200 and ok.json()["output"]["result"] == 2, ok


def test_a_manifest_role_narrows_the_policy_and_never_widens_it(env: dict[str, Any]) -> None:
    for who in ("dev", "analyst", "finance"):
        assert_not_found(call(env, who, FIN, {"session_id": who}), FIN)
    ok = call(env, "fin_analyst", FIN, {"session_id": "fa"})
    assert ok.status == 200 and ok.json()["output"] == {"ledger": "balanced"}, ok
    admin = call(env, "admin", FIN, {"session_id": "ops"})
    assert admin.status == 200 and admin.json()["output"] == {"ledger": "balanced"}, admin


def test_no_token_in_the_logs(env: dict[str, Any]) -> None:
    assert_no_token_in_logs(LOGS, MINTED)


def test_concurrent_invocations_are_capped_per_tenant(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    acme = create_token(tokens_file, "acme", "a", "invoke", "sessions")
    other = create_token(tokens_file, "globex", "g", "invoke", "sessions")
    MINTED.extend([acme, other])
    server = Server(
        tmp_path / "state",
        ["--examples"],
        {"AUTH_TOKENS_FILE": str(tokens_file), "MAX_INVOCATIONS_PER_TENANT": "1"},
    )
    server.start()
    answers: dict[str, Any] = {}
    try:
        # A call that runs until its deadline interrupts it (bounded: 4 s).
        spin = {"code": "while True:\n    pass", "session_id": "long", "timeout_seconds": 4}
        worker = threading.Thread(
            target=lambda: answers.update(
                long=request(server.port, "POST", invoke_path(CE), acme, body={"input": spin})
            )
        )
        worker.start()
        key = quote("pixell-python-agent@0.1.0:long", safe="@")

        def running() -> bool:
            resp = request(server.port, "GET", f"/runtime/sessions/{key}", acme)
            return resp.status == 200 and resp.json()["kernel_state"] == "busy"

        assert wait_for(running, 60), "the long call never started"
        second = request(
            server.port,
            "POST",
            invoke_path(CE),
            acme,
            body={"input": {"code": "1", "session_id": "second"}},
        )
        assert second.status == 429, second
        assert second.json()["code"] == "too_many_invocations"
        assert int(second.headers["retry-after"]) >= 1
        # Another tenant is not held back by acme's running call.
        theirs = request(
            server.port,
            "POST",
            invoke_path(CE),
            other,
            body={"input": {"code": "6 * 7", "session_id": "g"}},
        )
        assert theirs.status == 200 and theirs.json()["output"]["result"] == 42, theirs
        worker.join(60)
        assert not worker.is_alive()
        assert answers["long"].status == 200
        assert answers["long"].json()["output"]["error"] == "timeout"
        # The slot is free again once the call ended.
        again = request(
            server.port,
            "POST",
            invoke_path(CE),
            acme,
            body={"input": {"code": "2 + 2", "session_id": "second"}},
        )
        assert again.status == 200 and again.json()["output"]["result"] == 4, again
    finally:
        stop_all([server])
