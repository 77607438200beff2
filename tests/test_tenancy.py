"""Tenancy through REST: a session belongs to the tenant that created it.

A real server with an API tokens file and the example agents; real sandboxed kernels. Two
tenants use the same ``session_id``: two kernels, and neither can see, inspect, restart,
interrupt, delete or read the variables of the other's sessions (404, exactly as for a missing
one). Host details (kernel pid, connection file) only for ``attach``; ``admin`` sees every
tenant. A second server checks the per-tenant session cap.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES, Response, Server, stop_all, wait_for
from jwks_server import (
    assert_forbidden,
    assert_no_token_in_logs,
    audit_events,
    create_token,
    request,
)

from pixell_kernel_runtime.packages.builder import build_all

PKG = "pixell-python-agent@0.1.0"
CE = f"{PKG}/code-executor"
INVOKE = f"/runtime/agents/{quote(CE, safe='@')}/invoke"
HOST_FIELDS = ("kernel_pid", "connection_file", "kernel_rss_bytes")

MINTED: list[str] = []
LOGS: list[Path] = []

# name -> (tenant, scopes)
PRINCIPALS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("acme", ("invoke", "sessions", "attach", "packages:read")),
    "bob": ("globex", ("invoke", "sessions", "attach", "packages:read")),
    "viewer": ("acme", ("sessions",)),  # alice's tenant, without attach
    "runner": ("acme", ("invoke",)),
    "root": ("ops", ("admin",)),
}


def make_tokens(path: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        tenant, scopes = PRINCIPALS[name]
        out[name] = create_token(path, tenant, name, *scopes)
    MINTED.extend(out.values())
    return out


class Env:
    def __init__(self, server: Server, tokens: dict[str, str]) -> None:
        self.server = server
        self.tok = tokens
        # What the module's sessions answered while they were set up.
        self.first: dict[str, Any] = {}

    def call(self, who: str, method: str, path: str, **kw: Any) -> Response:
        return request(self.server.port, method, path, self.tok[who], **kw)

    def run(self, who: str, code: str, sid: str) -> dict[str, Any]:
        """The code executor's ``output`` (HTTP 200 asserted)."""
        resp = self.call(who, "POST", INVOKE, body={"input": {"code": code, "session_id": sid}})
        assert resp.status == 200, resp
        return resp.json()["output"]

    def ok(self, who: str, code: str, sid: str) -> Any:
        out = self.run(who, code, sid)
        assert out["status"] == "success", out
        return out["result"]

    def sessions(self, who: str) -> list[dict[str, Any]]:
        resp = self.call(who, "GET", "/runtime/sessions")
        assert resp.status == 200, resp
        return resp.json()["sessions"]


def start_server(base: Path, tokens: dict[str, str], extra_env: dict[str, str]) -> Server:
    pkgs = base / "pkgs"
    pkgs.mkdir()
    build_all(EXAMPLES, pkgs)
    env = {"AUTH_TOKENS_FILE": str(base / "tokens.yaml"), "PACKAGES_DIR": str(pkgs), **extra_env}
    server = Server(base / "state", ["--log-format", "json"], env, inherit_env=False)
    LOGS.append(server.log_path)
    return server.start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("tenancy")
    tokens = make_tokens(base / "tokens.yaml", list(PRINCIPALS))
    server = start_server(base, tokens, {})
    try:
        e = Env(server, tokens)
        # Two tenants, one session_id: alice's kernel first, then bob's asks for her variable.
        e.first["alice"] = e.run("alice", "x = 'alice'", "shared")
        e.first["bob"] = e.run("bob", "x", "shared")
        e.first["bob-set"] = e.run("bob", "x = 'bob'", "shared")
        e.first["only-a"] = e.run("alice", "secret = 41", "only-a")
        yield e
    finally:
        stop_all([server])


def key(sid: str) -> str:
    return quote(f"{PKG}:{sid}", safe="")


def not_found_shape(resp: Response, sid: str) -> tuple[int, str]:
    """Status and body with the request id dropped and the session id made generic."""
    body = resp.json()
    body.pop("request_id", None)
    return resp.status, json.dumps(body, sort_keys=True).replace(sid, "<sid>")


# ---- the tests (each leaves the module's sessions as it found them) ----------------------------


def test_same_session_id_is_two_kernels(env: Env) -> None:
    for step in ("alice", "bob-set", "only-a"):
        assert env.first[step]["status"] == "success", env.first
    out = env.first["bob"]
    assert out["status"] == "error" and out["exception"]["ename"] == "NameError", out
    assert env.ok("alice", "x", "shared") == "alice"
    assert env.ok("bob", "x", "shared") == "bob"

    mine = env.call("alice", "GET", f"/runtime/sessions/{key('shared')}")
    theirs = env.call("bob", "GET", f"/runtime/sessions/{key('shared')}")
    assert mine.status == 200 and theirs.status == 200, (mine, theirs)
    pid_a, pid_b = mine.json()["kernel_pid"], theirs.json()["kernel_pid"]
    assert isinstance(pid_a, int) and isinstance(pid_b, int) and pid_a != pid_b
    assert mine.json()["connection_file"] != theirs.json()["connection_file"]


def test_tenant_not_subject_owns_the_session(env: Env) -> None:
    # Another principal of alice's tenant shares her sessions.
    assert env.ok("runner", "x", "shared") == "alice"


def test_listings_show_ones_own(env: Env) -> None:
    alice = env.sessions("alice")
    bob = env.sessions("bob")
    assert sorted(s["session_id"] for s in alice) == ["only-a", "shared"], alice
    assert [s["session_id"] for s in bob] == ["shared"], bob
    assert {s["tenant"] for s in alice} == {"acme"}
    assert {s["tenant"] for s in bob} == {"globex"}


ROUTES = [
    ("GET", ""),
    ("GET", "/variables"),
    ("POST", "/interrupt"),
    ("POST", "/restart"),
    ("DELETE", ""),
]


def test_another_tenants_session_is_404_like_a_missing_one(env: Env) -> None:
    # The owner's view first: the routes work on it, so what bob gets below is about him.
    variables = env.call("alice", "GET", f"/runtime/sessions/{key('only-a')}/variables")
    assert variables.status == 200, variables
    assert "secret" in {v["name"] for v in variables.json()["variables"]}

    missing = f"never-made-{uuid.uuid4().hex[:6]}"
    for method, suffix in ROUTES:
        body = b"" if method == "POST" else None
        theirs = env.call("bob", method, f"/runtime/sessions/{key('only-a')}{suffix}", body=body)
        absent = env.call("bob", method, f"/runtime/sessions/{key(missing)}{suffix}", body=body)
        assert theirs.status == 404, (method, suffix, theirs)
        assert theirs.json()["code"] == "session_not_found", theirs
        assert not_found_shape(theirs, "only-a") == not_found_shape(absent, missing), (
            method,
            suffix,
        )

    # Nothing of that reached alice's kernel: not restarted, not deleted, state intact.
    assert env.ok("alice", "secret + 1", "only-a") == 42
    mine = env.call("alice", "GET", f"/runtime/sessions/{key('only-a')}")
    assert mine.status == 200 and mine.json()["restarts"] == 0, mine


def test_another_tenants_execution_is_404_like_a_missing_one(env: Env) -> None:
    resp = env.call("alice", "POST", INVOKE, body={"input": {"code": "1", "session_id": "ex"}})
    assert resp.status == 200, resp
    execution_id = resp.json()["metadata"]["execution_id"]
    assert env.call("alice", "GET", f"/runtime/executions/{execution_id}").status == 200
    for path in ("", "/events"):
        theirs = env.call("bob", "GET", f"/runtime/executions/{execution_id}{path}")
        missing = env.call("bob", "GET", f"/runtime/executions/{uuid.uuid4()}{path}")
        assert theirs.status == missing.status == 404, (theirs, missing)
        assert theirs.json()["code"] == missing.json()["code"] == "execution_not_found"
    cancel = env.call("bob", "POST", f"/runtime/executions/{execution_id}/cancel", body={})
    assert cancel.status == 404, cancel
    # Reading needs the invoke scope: a sessions-only principal is refused.
    viewer = env.call("viewer", "GET", f"/runtime/executions/{execution_id}")
    assert viewer.status == 403, viewer
    # The module's sessions as they were.
    assert env.call("alice", "DELETE", f"/runtime/sessions/{key('ex')}").status == 200


def test_invoking_the_same_session_id_reaches_ones_own_kernel(env: Env) -> None:
    out = env.run("bob", "secret", "only-a")
    assert out["status"] == "error" and out["exception"]["ename"] == "NameError", out
    gone = env.call("bob", "DELETE", f"/runtime/sessions/{key('only-a')}")
    assert gone.status == 200, gone
    assert env.ok("alice", "secret", "only-a") == 41
    assert [s["session_id"] for s in env.sessions("bob")] == ["shared"]


def test_host_fields_need_attach(env: Env) -> None:
    with_attach = env.call("alice", "GET", f"/runtime/sessions/{key('shared')}").json()
    assert isinstance(with_attach["kernel_pid"], int)
    conn = with_attach["connection_file"]
    assert isinstance(conn, str) and conn

    single = env.call("viewer", "GET", f"/runtime/sessions/{key('shared')}")
    assert single.status == 200, single
    listed = [s for s in env.sessions("viewer") if s["session_id"] == "shared"]
    assert len(listed) == 1
    for doc in (single.json(), listed[0]):
        assert doc["session_id"] == "shared" and doc["tenant"] == "acme", doc
        assert not set(HOST_FIELDS) & set(doc), doc
    assert conn not in single.body.decode()

    # An invocation's answer does not carry them either.
    resp = env.call("runner", "POST", INVOKE, body={"input": {"code": "1", "session_id": "shared"}})
    assert resp.status == 200, resp
    assert conn not in resp.body.decode()
    assert "connection_file" not in resp.body.decode()


def test_variables_need_the_sessions_scope(env: Env) -> None:
    resp = env.call("runner", "GET", f"/runtime/sessions/{key('shared')}/variables")
    assert_forbidden(resp, "sessions")


def test_admin_sees_every_tenant(env: Env) -> None:
    listed = env.sessions("root")
    by_sid: dict[str, set[str]] = {}
    for s in listed:
        by_sid.setdefault(s["session_id"], set()).add(s["tenant"])
        assert isinstance(s["kernel_pid"], int), s
    assert by_sid == {"shared": {"acme", "globex"}, "only-a": {"acme"}}, listed

    resp = env.call("root", "GET", f"/runtime/sessions/{key('only-a')}?tenant=acme")
    assert resp.status == 200, resp
    assert resp.json()["tenant"] == "acme"


def test_admin_actions_are_audited(env: Env) -> None:
    rid = f"admin-{uuid.uuid4().hex}"
    resp = env.call(
        "root",
        "POST",
        f"/runtime/sessions/{key('shared')}/interrupt?tenant=globex",
        body=b"",
        headers={"X-Request-ID": rid},
    )
    assert resp.status == 200, resp

    log = env.server.log_path
    assert wait_for(lambda: len(audit_events(log, rid)) > 0, 10.0), env.server.logs()[-3000:]
    events = audit_events(log, rid)
    assert len(events) == 1, events
    event = events[0]
    assert (event["tenant"], event["subject"]) == ("ops", "root"), event
    assert event["route"] == "/runtime/sessions/{id}/interrupt", event
    assert env.tok["root"] not in json.dumps(event)


def test_sessions_per_tenant_are_capped(tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path / "tokens.yaml", ["alice", "bob", "viewer"])
    server = start_server(tmp_path, tokens, {"MAX_SESSIONS_PER_TENANT": "1"})
    try:
        e = Env(server, tokens)
        assert e.ok("alice", "1", "one") == 1
        over = e.call("alice", "POST", INVOKE, body={"input": {"code": "2", "session_id": "two"}})
        assert over.status == 429, over
        assert int(over.headers["retry-after"]) >= 1, over.headers
        assert [s["session_id"] for s in e.sessions("alice")] == ["one"]
        assert e.ok("alice", "3", "one") == 3  # its live session still serves
        assert e.ok("bob", "4", "one") == 4  # the cap is per tenant
        gone = e.call("viewer", "DELETE", f"/runtime/sessions/{key('one')}")
        assert gone.status == 200, gone
        assert e.ok("alice", "5", "two") == 5  # a freed slot is free
    finally:
        stop_all([server])


def test_no_token_in_any_log(env: Env) -> None:
    assert_no_token_in_logs(LOGS, MINTED)
