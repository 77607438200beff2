"""API tokens: the tokens file (part A, module level), then the ``token`` command and every
route's scope through a real server (part B), the safe defaults of a bind with nothing
configured, load-by-path confinement, audit events and a grep of every log for every token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from conftest import EXAMPLES, Response, Server, make_apkg, manifest_yaml, stop_all, wait_for
from jwks_server import (
    API_TOKEN_RE,
    assert_forbidden,
    assert_no_token_in_logs,
    assert_unauthorized,
    audit_events,
    cli,
    create_token,
    request,
)

from pixell_kernel_runtime.auth import tokens as tokens_mod
from pixell_kernel_runtime.auth.principal import SCOPES, Principal
from pixell_kernel_runtime.auth.tokens import TokensFileError, TokenStore
from pixell_kernel_runtime.packages.builder import build_all

# ---- part A: the tokens file -----------------------------------------------------------------


def digest_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_create_appends_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    one = tokens_mod.create(path, tenant="acme", name="ci", scopes=["invoke", "sessions"])
    two = tokens_mod.create(path, tenant="globex", name="ci", scopes=["usage"], roles=["ops"])
    assert one != two and len(one) >= 43  # 32 random bytes, url-safe base64
    text = path.read_text()
    assert one not in text and two not in text
    doc = yaml.safe_load(text)
    entries = doc["tokens"] if isinstance(doc, dict) else doc
    assert [(e["tenant"], e["name"], e["hash"]) for e in entries] == [
        ("acme", "ci", "sha256:" + digest_hex(one)),
        ("globex", "ci", "sha256:" + digest_hex(two)),
    ]
    with pytest.raises(TokensFileError):
        tokens_mod.create(path, tenant="acme", name="ci", scopes=["invoke"])  # name taken
    with pytest.raises(TokensFileError):
        tokens_mod.create(path, tenant="acme", name="x", scopes=["root"])
    assert path.read_text() == text


def test_verify_gives_the_principal(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"  # the JSON form
    token = tokens_mod.create(
        path, tenant="acme", name="ci", scopes=["invoke", "packages:read"], roles=["analyst"]
    )
    json.loads(path.read_text())
    store = TokenStore(path)
    assert store.verify(token) == Principal(
        "acme", "ci", frozenset({"invoke", "packages:read"}), frozenset({"analyst"}), via="token"
    )
    assert store.verify(token + "x") is None
    assert store.verify(token[:-1]) is None
    assert store.verify("pkr_" + "A" * 43) is None


def test_expiry_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    old = tokens_mod.create(
        path, tenant="acme", name="old", scopes=["invoke"], expires="2001-01-01T00:00:00Z"
    )
    new = tokens_mod.create(
        path, tenant="acme", name="new", scopes=["invoke"], expires="2999-01-01T00:00:00Z"
    )
    store = TokenStore(path)
    assert store.verify(old) is None
    assert store.verify(new) is not None and store.verify(new).subject == "new"


def test_revoke_removes_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    keep = tokens_mod.create(path, tenant="acme", name="keep", scopes=["invoke"])
    gone = tokens_mod.create(path, tenant="acme", name="gone", scopes=["invoke"])
    assert tokens_mod.revoke(path, tenant="acme", name="gone") is True
    assert tokens_mod.revoke(path, tenant="acme", name="gone") is False
    assert tokens_mod.revoke(path, tenant="globex", name="keep") is False  # tenant matters
    store = TokenStore(path)
    assert store.verify(gone) is None
    assert store.verify(keep) is not None
    assert digest_hex(gone) not in path.read_text()


def test_file_edits_are_picked_up_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    first = tokens_mod.create(path, tenant="acme", name="first", scopes=["invoke"])
    store = TokenStore(path)
    assert store.verify(first) is not None
    second = tokens_mod.create(path, tenant="acme", name="second", scopes=["sessions"])
    deadline = tokens_mod.RECHECK_SECONDS + 5.0
    assert wait_for(lambda: store.verify(second) is not None, deadline)
    tokens_mod.revoke(path, tenant="acme", name="first")
    assert wait_for(lambda: store.verify(first) is None, deadline)
    assert store.verify(second) is not None


@pytest.mark.parametrize(
    "broken",
    [
        "tokens: [ {tenant: acme, name: half",  # a half-written YAML document
        "- {tenant: acme, name: x, hash: 'sha256:00', scopes: [invoke]}\n",  # a short hash
        "- {tenant: acme, name: x, hash: 'sha256:%s', scopes: [everything]}\n" % ("0" * 64),
    ],
)
def test_broken_edit_keeps_the_previous_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    path = tmp_path / "tokens.yaml"
    token = tokens_mod.create(path, tenant="acme", name="ci", scopes=["invoke"])
    good = path.read_text()
    store = TokenStore(path)
    with caplog.at_level(logging.ERROR, logger="pixell_kernel_runtime.auth"):
        path.write_text(broken)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))

        def reloaded_and_refused() -> bool:
            # Every poll also proves the old entry still verifies, before and after the error.
            assert store.verify(token) is not None
            return any(r.levelno == logging.ERROR for r in caplog.records)

        assert wait_for(reloaded_and_refused, tokens_mod.RECHECK_SECONDS + 5.0)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(path) in m for m in errors), errors
    assert store.verify(token) is not None
    # Fixed again: a new token in the file is taken.
    path.write_text(good)
    other = tokens_mod.create(path, tenant="acme", name="other", scopes=["usage"])
    assert wait_for(lambda: store.verify(other) is not None, tokens_mod.RECHECK_SECONDS + 5.0)


def test_a_broken_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {tenant: acme}\n")
    with pytest.raises(TokensFileError):
        TokenStore(path)


# ---- part B: the token command ----------------------------------------------------------------

MINTED: list[str] = []
LOGS: list[Path] = []


def test_cli_token_create_list_revoke(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    token = create_token(path, "acme", "ci", "invoke", "sessions")
    MINTED.append(token)
    text = path.read_text()
    assert token not in text
    assert "sha256:" + digest_hex(token) in text

    listed = cli("token", "list", "--file", str(path), home=tmp_path / "home")
    assert listed.returncode == 0, listed
    assert "acme" in listed.stdout and "ci" in listed.stdout and "sessions" in listed.stdout
    assert token not in listed.stdout + listed.stderr
    assert digest_hex(token) not in listed.stdout + listed.stderr

    bad = cli(
        "token",
        "create",
        "--file",
        str(path),
        "--tenant",
        "acme",
        "--name",
        "x",
        "--scopes",
        "invoke",
        "everything",
        home=tmp_path / "home",
    )
    assert bad.returncode != 0, bad
    assert "everything" in bad.stderr and "Traceback" not in bad.stderr, bad
    assert path.read_text() == text

    gone = cli(
        "token",
        "revoke",
        "--file",
        str(path),
        "--tenant",
        "acme",
        "--name",
        "ci",
        home=tmp_path / "home",
    )
    assert gone.returncode == 0, gone
    assert digest_hex(token) not in path.read_text()
    again = cli(
        "token",
        "revoke",
        "--file",
        str(path),
        "--tenant",
        "acme",
        "--name",
        "ci",
        home=tmp_path / "home",
    )
    assert again.returncode != 0, again
    assert "Traceback" not in again.stderr, again


def test_server_refuses_a_broken_tokens_file(tmp_path: Path) -> None:
    import subprocess

    from conftest import REPO, free_port, minimal_env

    path = tmp_path / "tokens.yaml"
    path.write_text("- {tenant: acme, name: x, hash: nope}\n")
    env = {**minimal_env(tmp_path / "home"), "AUTH_TOKENS_FILE": str(path)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixell_kernel_runtime",
            "serve",
            "--port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=30,
    )
    assert res.returncode != 0, res
    assert str(path) in res.stderr, res
    assert "Traceback" not in res.stdout + res.stderr, res


# ---- part B: a server with a tokens file ------------------------------------------------------

PKG = "hello-handler@0.1.0"
AGENT = f"{PKG}/greet"
CE = "pixell-python-agent@0.1.0/code-executor"


class Env:
    """The module's server and the tokens it was given (name -> token)."""

    def __init__(self, server: Server, base: Path, tokens_file: Path) -> None:
        self.server = server
        self.base = base
        self.tokens_file = tokens_file
        self.tok: dict[str, str] = {}
        self.pkgs = base / "pkgs"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("tokens-rest")
    tokens_file = base / "tokens.yaml"
    pkgs = base / "pkgs"
    pkgs.mkdir()
    build_all(EXAMPLES, pkgs)
    tokens: dict[str, str] = {}
    non_admin = [s for s in SCOPES if s != "admin"]
    for scope in SCOPES:
        tokens[f"only-{scope}"] = create_token(tokens_file, "acme", f"only-{scope}", scope)
        rest = [s for s in non_admin if s != scope]
        tokens[f"all-but-{scope}"] = create_token(tokens_file, "acme", f"all-but-{scope}", *rest)
    tokens["expired"] = create_token(
        tokens_file, "acme", "expired", *non_admin, expires="2001-01-01T00:00:00Z"
    )
    MINTED.extend(tokens.values())
    server = Server(
        base / "state",
        ["--log-format", "json"],
        {"AUTH_TOKENS_FILE": str(tokens_file), "PACKAGES_DIR": str(pkgs)},
        inherit_env=False,
    )
    LOGS.append(server.log_path)
    server.start()
    e = Env(server, base, tokens_file)
    e.tok = tokens
    try:
        yield e
    finally:
        stop_all([server])


def call(env: Env, method: str, path: str, token: str | None, **kw: Any) -> Response:
    return request(env.server.port, method, path, token, **kw)


MISSING_SESSION = quote(f"{PKG}:no-such-session", safe="")
MISSING_EXECUTION = "0b6e3c1a-0000-4000-8000-000000000000"
# (method, path, body, the scope it needs) for every route but health.
ROUTES: list[tuple[str, str, Any, str]] = [
    ("POST", f"/runtime/agents/{quote(AGENT, safe='@')}/invoke", {"input": {}}, "invoke"),
    ("GET", "/runtime/sessions", None, "sessions"),
    ("GET", f"/runtime/sessions/{MISSING_SESSION}", None, "sessions"),
    ("DELETE", f"/runtime/sessions/{MISSING_SESSION}", None, "sessions"),
    ("POST", f"/runtime/sessions/{MISSING_SESSION}/interrupt", b"", "sessions"),
    ("POST", f"/runtime/sessions/{MISSING_SESSION}/restart", b"", "sessions"),
    ("GET", f"/runtime/sessions/{MISSING_SESSION}/variables", None, "sessions"),
    ("GET", "/runtime/packages", None, "packages:read"),
    ("GET", f"/runtime/packages/{quote(PKG, safe='@')}", None, "packages:read"),
    ("GET", "/runtime/agents", None, "packages:read"),
    ("GET", f"/runtime/agents/{quote(AGENT, safe='@')}", None, "packages:read"),
    ("POST", "/runtime/packages/load", {"path": "/nonexistent.apkg"}, "packages:write"),
    ("POST", "/runtime/packages/upload", b"", "packages:write"),
    ("DELETE", f"/runtime/packages/{quote(PKG, safe='@')}", None, "packages:write"),
    ("GET", "/runtime/sandbox", None, "admin"),
    ("GET", "/metrics", None, "usage"),  # usage or admin
    ("GET", f"/runtime/sessions/{MISSING_SESSION}/connection", None, "attach"),
    ("GET", f"/runtime/sessions/{MISSING_SESSION}/notebook", None, "sessions"),
    ("GET", f"/runtime/executions/{MISSING_EXECUTION}", None, "invoke"),
    ("GET", f"/runtime/executions/{MISSING_EXECUTION}/events", None, "invoke"),
    ("POST", f"/runtime/executions/{MISSING_EXECUTION}/cancel", b"", "invoke"),
    ("GET", f"/runtime/agents/{quote(AGENT, safe='@')}/stream", None, "invoke"),
    ("GET", "/api", None, "attach"),
    ("GET", "/api/kernelspecs", None, "attach"),
    ("GET", "/api/kernels", None, "attach"),
    ("POST", "/api/kernels", {"name": "nope"}, "attach"),
    ("GET", f"/api/kernels/{MISSING_EXECUTION}", None, "attach"),
    ("DELETE", f"/api/kernels/{MISSING_EXECUTION}", None, "attach"),
    ("POST", f"/api/kernels/{MISSING_EXECUTION}/interrupt", b"", "attach"),
    ("POST", f"/api/kernels/{MISSING_EXECUTION}/restart", b"", "attach"),
    ("GET", f"/api/kernels/{MISSING_EXECUTION}/channels", None, "attach"),
]
ROUTE_IDS = [f"{m} {p.split('?')[0]}" for m, p, _b, _s in ROUTES]


def test_health_needs_no_principal(env: Env) -> None:
    resp = call(env, "GET", "/runtime/health", None)
    assert resp.status == 200, resp
    assert resp.json()["status"] == "healthy"


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES, ids=ROUTE_IDS)
def test_every_route_needs_a_principal(
    env: Env, method: str, path: str, body: Any, scope: str
) -> None:
    assert_unauthorized(call(env, method, path, None, body=body))


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES, ids=ROUTE_IDS)
def test_every_route_names_its_missing_scope(
    env: Env, method: str, path: str, body: Any, scope: str
) -> None:
    # A token with every other non-admin scope: the one missing is the only reason.
    assert_forbidden(call(env, method, path, env.tok[f"all-but-{scope}"], body=body), scope)


def test_failed_scope_check_changed_nothing(env: Env) -> None:
    path = f"/runtime/packages/{quote(PKG, safe='@')}"
    assert_forbidden(call(env, "DELETE", path, env.tok["all-but-packages:write"]), "packages:write")
    assert call(env, "GET", path, env.tok["only-packages:read"]).status == 200


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/runtime/sessions", "only-sessions", 200),
        ("GET", f"/runtime/sessions/{MISSING_SESSION}", "only-sessions", 404),
        ("GET", "/runtime/packages", "only-packages:read", 200),
        ("GET", f"/runtime/packages/{quote(PKG, safe='@')}", "only-packages:read", 200),
        ("GET", "/runtime/agents", "only-packages:read", 200),
        ("GET", f"/runtime/agents/{quote(AGENT, safe='@')}", "only-packages:read", 200),
        ("GET", "/runtime/info", "only-admin", 200),
        ("GET", "/runtime/info", "only-usage", 200),  # any principal
        ("GET", "/runtime/sandbox", "only-admin", 200),
        ("GET", "/metrics", "only-usage", 200),
        ("GET", "/metrics", "only-admin", 200),
    ],
)
def test_the_scope_grants_the_route(
    env: Env, method: str, path: str, token: str, status: int
) -> None:
    resp = call(env, method, path, env.tok[token])
    assert resp.status == status, resp
    if status == 404:
        assert resp.json()["code"] == "session_not_found", resp


@pytest.mark.parametrize("scheme", ["Bearer", "token"])
def test_both_authorization_schemes(env: Env, scheme: str) -> None:
    resp = call(env, "GET", "/runtime/packages", env.tok["only-packages:read"], scheme=scheme)
    assert resp.status == 200, resp
    assert PKG in {p["id"] for p in resp.json()["packages"]}


def test_query_token_is_refused_on_rest_routes(env: Env) -> None:
    token = env.tok["only-packages:read"]
    assert_unauthorized(call(env, "GET", f"/runtime/packages?token={quote(token)}", None))


@pytest.mark.parametrize(
    "header",
    [
        "Bearer pkr_{secret}",  # well-formed, not in the file
        "Bearer ",
        "Basic {secret}",
        "Bearer not-a-token-{secret}",
        "Bearer eyJhbGciOiJSUzI1NiJ9.e30.{secret}",  # a JWT, and OIDC is not configured here
    ],
)
def test_bad_credentials_are_401(env: Env, header: str) -> None:
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    MINTED.append(secret)  # whatever was presented must not reach a log either
    value = header.format(secret=secret)
    assert_unauthorized(
        call(env, "GET", "/runtime/packages", None, headers={"Authorization": value})
    )


def test_an_expired_token_is_401(env: Env) -> None:
    assert_unauthorized(call(env, "GET", "/runtime/packages", env.tok["expired"]))


def test_tokens_file_reload_and_revoke_on_a_running_server(env: Env) -> None:
    fresh = create_token(env.tokens_file, "acme", "fresh", "packages:read")
    MINTED.append(fresh)
    deadline = tokens_mod.RECHECK_SECONDS + 10.0
    assert wait_for(lambda: call(env, "GET", "/runtime/agents", fresh).status == 200, deadline)

    res = cli(
        "token",
        "revoke",
        "--file",
        str(env.tokens_file),
        "--tenant",
        "acme",
        "--name",
        "fresh",
        home=env.base / "cli-home",
    )
    assert res.returncode == 0, res
    assert wait_for(lambda: call(env, "GET", "/runtime/agents", fresh).status == 401, deadline)
    assert_unauthorized(call(env, "GET", "/runtime/agents", fresh))

    # A broken edit: the server logs it and keeps the previous tokens.
    good = env.tokens_file.read_text()
    keeper = env.tok["only-packages:read"]
    before = len(env.server.logs().splitlines())

    def refused_and_still_serving() -> bool:
        assert call(env, "GET", "/runtime/agents", keeper).status == 200
        new = env.server.logs().splitlines()[before:]
        return any(str(env.tokens_file) in ln and '"level": "error"' in ln for ln in new)

    try:
        env.tokens_file.write_text(good + "- {tenant: acme, name: half")
        assert wait_for(refused_and_still_serving, deadline), env.server.logs()[-3000:]
    finally:
        env.tokens_file.write_text(good)
    assert call(env, "GET", "/runtime/agents", keeper).status == 200


def test_load_by_path_is_confined_to_load_roots(env: Env) -> None:
    writer = env.tok["only-packages:write"]
    reader = env.tok["only-packages:read"]
    outside_dir = env.base / "outside"
    outside = make_apkg(
        outside_dir / "outside-agent-0.1.0.apkg",
        {
            "agent.yaml": manifest_yaml("outside-agent"),
            "main.py": "def handler(d):\n    return d\n",
        },
    )
    inside = make_apkg(
        env.pkgs / "inside-agent-0.1.0.apkg",
        {"agent.yaml": manifest_yaml("inside-agent"), "main.py": "def handler(d):\n    return d\n"},
    )
    link = env.pkgs / "escape-0.1.0.apkg"
    link.symlink_to(outside)

    def load(path: str) -> Response:
        return call(env, "POST", "/runtime/packages/load", writer, body={"path": path})

    def shape(resp: Response, path: str) -> tuple[int, str]:
        body = resp.json()
        body.pop("request_id", None)
        return resp.status, json.dumps(body, sort_keys=True).replace(path, "<path>")

    refused = {
        "outside": str(outside),
        "symlink": str(link),
        "dotdot": str(env.pkgs / ".." / "outside" / outside.name),
        "shadow": "/etc/shadow",
        "missing": str(outside_dir / "missing.apkg"),
    }
    answers = {name: load(path) for name, path in refused.items()}
    for name, resp in answers.items():
        assert resp.status == 403, (name, resp)
        assert resp.json()["code"] == "path_not_allowed", (name, resp)
    shapes = {shape(resp, refused[name]) for name, resp in answers.items()}
    # Whether the file exists, is readable or is an APKG: the answer does not tell.
    assert len(shapes) == 1, shapes

    ok = load(str(inside))
    assert ok.status == 200, ok
    assert ok.json()["package_id"] == "inside-agent@0.1.0"
    ids = {p["id"] for p in call(env, "GET", "/runtime/packages", reader).json()["packages"]}
    assert "inside-agent@0.1.0" in ids
    assert "outside-agent@0.1.0" not in ids
    gone = call(env, "DELETE", "/runtime/packages/inside-agent@0.1.0", writer)
    assert gone.status == 200, gone


def test_no_host_paths_without_attach_or_admin(env: Env) -> None:
    reader = env.tok["only-packages:read"]
    routes = [
        "/runtime/info",
        "/runtime/packages",
        f"/runtime/packages/{quote(PKG, safe='@')}",
        "/runtime/agents",
        f"/runtime/agents/{quote(AGENT, safe='@')}",
    ]
    for path in routes:
        resp = call(env, "GET", path, reader)
        assert resp.status == 200, resp
        text = resp.body.decode()
        assert str(env.base) not in text, (path, text[:500])
        assert sys.executable not in text, (path, text[:500])
    # The check can see a path when one is there: admin's view of the same package has it.
    admin = call(env, "GET", f"/runtime/packages/{quote(PKG, safe='@')}", env.tok["only-admin"])
    assert str(env.base) in admin.body.decode(), admin


def expect_audit(env: Env, rid: str) -> dict[str, Any]:
    log = env.server.log_path
    assert wait_for(lambda: len(audit_events(log, rid)) > 0, 10.0), env.server.logs()[-3000:]
    events = audit_events(log, rid)
    assert len(events) == 1, events
    event = events[0]
    assert {"request_id", "tenant", "subject", "route", "reason"} <= set(event), event
    assert isinstance(event["reason"], str) and event["reason"], event
    return event


def test_every_401_and_403_is_one_audit_event(env: Env) -> None:
    rid = f"audit-none-{uuid.uuid4().hex}"
    assert_unauthorized(call(env, "GET", "/runtime/sessions", None, headers={"X-Request-ID": rid}))
    event = expect_audit(env, rid)
    assert event["route"] == "/runtime/sessions", event

    wrong = "pkr_" + uuid.uuid4().hex + uuid.uuid4().hex
    MINTED.append(wrong)
    rid = f"audit-bad-{uuid.uuid4().hex}"
    resp = call(env, "GET", "/runtime/sessions", wrong, headers={"X-Request-ID": rid})
    assert_unauthorized(resp)
    assert wrong not in json.dumps(expect_audit(env, rid))

    rid = f"audit-403-{uuid.uuid4().hex}"
    token = env.tok["all-but-sessions"]
    resp = call(env, "GET", "/runtime/sessions", token, headers={"X-Request-ID": rid})
    assert_forbidden(resp, "sessions")
    event = expect_audit(env, rid)
    assert (event["tenant"], event["subject"], event["route"]) == (
        "acme",
        "all-but-sessions",
        "/runtime/sessions",
    ), event
    assert "sessions" in event["reason"], event
    assert token not in json.dumps(event)


# ---- part B: the defaults of a server with nothing configured ----------------------------------


def test_loopback_with_nothing_configured_is_open(tmp_path: Path) -> None:
    server = Server(tmp_path / "state", inherit_env=False)
    LOGS.append(server.log_path)
    server.start()
    try:
        for path in ("/runtime/packages", "/runtime/sessions", "/runtime/info"):
            resp = request(server.port, "GET", path)
            assert resp.status == 200, resp
        assert not API_TOKEN_RE.search(server.logs())
    finally:
        stop_all([server])


def test_any_address_with_nothing_configured_generates_a_token(tmp_path: Path) -> None:
    # 0.0.0.0 is not loopback; the test still talks to it over 127.0.0.1 only.
    server = Server(tmp_path / "state", ["--host", "0.0.0.0"], inherit_env=False)
    server.start()
    try:
        assert wait_for(lambda: API_TOKEN_RE.search(server.logs()) is not None, 10.0), (
            server.logs()[-3000:]
        )
        token = API_TOKEN_RE.search(server.logs()).group(0)
        assert_unauthorized(request(server.port, "GET", "/runtime/packages"))
        assert_unauthorized(request(server.port, "GET", "/runtime/packages", "pkr_" + "A" * 43))
        for scheme in ("Bearer", "token"):
            resp = request(server.port, "GET", "/runtime/packages", token, scheme=scheme)
            assert resp.status == 200, resp
        assert request(server.port, "GET", "/runtime/info", token).status == 200
        assert request(server.port, "GET", "/runtime/health").status == 200
    finally:
        stop_all([server])
    # Shown once at start, in one line, and nowhere else.
    assert_no_token_in_logs([server.log_path], [token], allowed=1)


def test_auth_none_turns_it_off_loudly(tmp_path: Path) -> None:
    server = Server(tmp_path / "state", ["--host", "0.0.0.0"], {"AUTH": "none"}, inherit_env=False)
    LOGS.append(server.log_path)
    server.start()
    try:
        resp = request(server.port, "GET", "/runtime/packages")
        assert resp.status == 200, resp
        assert request(server.port, "GET", "/runtime/info").status == 200
        warnings = [ln for ln in server.logs().splitlines() if "WARNING" in ln.upper()]
        assert any("AUTH=none" in ln for ln in warnings), server.logs()[-3000:]
        assert not API_TOKEN_RE.search(server.logs())
    finally:
        stop_all([server])


def test_no_token_in_any_log(env: Env) -> None:
    assert_no_token_in_logs(LOGS, MINTED)
