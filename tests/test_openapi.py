"""The OpenAPI document: every route of the app is in it, and a real server is fuzzed against it.

The route check reads the routes from the tornado Application that ``make_app`` builds (no
second table). The fuzz run (schemathesis, seeded, a few examples per operation) starts a real
server on loopback with a minimal environment, ``--examples``, one admin token and LOAD_ROOTS,
and checks every answer: no 5xx, the status, content type, headers and body all as the document
says, error answers in the envelope, and afterwards no traceback in the server's log.

The fuzzer's ``code`` strings run in sandboxed kernels (best_effort, never ``--sandbox off``),
for at most MAX_TIMEOUT_SECONDS each; ``/runtime/packages/load`` only ever gets a path inside
this test's own directory (and the server would refuse any outside LOAD_ROOTS unread).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import tornado.web
from conftest import Server, stop_all
from hypothesis.configuration import set_hypothesis_home_dir
from openapi_spec_validator import validate
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection

from pixell_kernel_runtime.api import openapi
from pixell_kernel_runtime.app import Runtime, make_app
from pixell_kernel_runtime.bundled import examples_dir
from pixell_kernel_runtime.config import Settings
from pixell_kernel_runtime.packages.builder import build_all

# Hypothesis keeps caches (from collection on): in the temp dir, not a .hypothesis/ in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pixell-kernel-runtime-hypothesis")

_GROUP = re.compile(r"\((?:[^()\\]|\\.)*\)")
_PARAM = re.compile(r"\{[^{}/]+\}")
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def _routes(app: tornado.web.Application) -> dict[str, type[tornado.web.RequestHandler]]:
    """The app's routes as path templates (each capture group a ``{}``) -> handler class."""
    out = {}
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.removesuffix("$")
        template = _GROUP.sub("{}", pattern)
        assert not re.search(r"[\\()\[\]*+?^$|]", template), f"unexpected regex: {pattern}"
        out[template] = rule.target
    return out


def _methods(handler: type[tornado.web.RequestHandler]) -> set[str]:
    """The HTTP methods a handler class implements itself (not RequestHandler's 405 stubs)."""
    return {m for m in METHODS if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}


def _security(scope: str | None) -> list[dict[str, list[str]]]:
    """What the document must say for a handler's scope (base.PUBLIC, base.ANY, or a name)."""
    if scope is None:
        return []
    return [{"bearer": [scope] if scope else []}]


@pytest.fixture
def app(tmp_path: Path) -> tornado.web.Application:
    settings = Settings(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    assert settings.metrics_enabled  # so that /metrics is among the routes
    return make_app(Runtime(settings))


def test_every_route_of_the_app_is_documented_with_its_methods_and_scopes(
    app: tornado.web.Application,
) -> None:
    doc = openapi.document()
    documented = {_PARAM.sub("{}", path): path for path in doc["paths"]}
    routes = _routes(app)
    # The walk sees the app's rules (a regex it could not read would fail in _routes).
    assert {"/runtime/health", "/runtime/agents/{}/invoke", "/metrics", openapi.PATH} <= set(routes)
    assert sorted(routes) == sorted(documented)
    for template, handler in routes.items():
        item = doc["paths"][documented[template]]
        assert set(item) == _methods(handler), (template, handler)
        for method, op in item.items():
            # A method a handler names no scope for needs admin (base.BaseHandler fails closed).
            scope = handler.scopes.get(method.upper(), "admin")
            assert op["security"] == _security(scope), (template, method)
            if scope is not None:
                assert "401" in op["responses"], (template, method)
            params = [p for p in op["parameters"] if "$ref" in p]
            assert len(params) == template.count("{}"), (template, method)


def test_the_document_is_valid_openapi_3_1_and_every_reference_resolves() -> None:
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # the OpenAPI 3.1 schema, with JSON Schema 2020-12 for every schema in it
    text = json.dumps(doc, allow_nan=False)
    refs = set(re.findall(r'"\$ref": "#/([^"]+)"', text))
    assert refs, "no references: the walk below would prove nothing"
    for ref in refs:
        node: Any = doc
        for part in ref.split("/"):
            assert part in node, f"dangling $ref #/{ref}"
            node = node[part]
    # Every component is used somewhere (a stale one would describe nothing).
    for kind, names in doc["components"].items():
        if kind == "securitySchemes":
            continue
        for name in names:
            assert f"components/{kind}/{name}" in refs, f"unused {kind}: {name}"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if status[0] not in "12":  # an error: one of the shared envelope answers
                    assert answer["$ref"].endswith(f"/E{status}"), (path, method, status)


# ---- fuzzing ------------------------------------------------------------------------------

# Few examples per operation and a fixed seed: the run is bounded and the same every time.
MAX_EXAMPLES = 6
INVOKE_EXAMPLES = 20
SEED = 20240608
FUZZ_ENV = {
    # A cell the fuzzer writes ends within seconds whatever timeout_seconds it asks for.
    "DEFAULT_TIMEOUT_SECONDS": "5",
    "MAX_TIMEOUT_SECONDS": "5",
    # Few kernels at a time: random session ids make new sessions, the oldest idle is evicted.
    "MAX_SESSIONS": "3",
    "SANDBOX_MODE": "best_effort",
}


# What the run must have reached beyond the lookups' 404s (else the steering broke).
REACHED = {
    ("POST /runtime/agents/{agent_id}/invoke", "200", "code-executor"),
    ("POST /runtime/agents/{agent_id}/invoke", "200", "handler"),
    ("POST /runtime/agents/{agent_id}/invoke", "422"),
    ("POST /runtime/packages/load", "200"),
    ("POST /runtime/packages/load", "400"),
    ("POST /runtime/packages/load", "403"),
    ("POST /runtime/packages/upload", "200"),
    ("POST /runtime/packages/upload", "400"),
    ("GET /runtime/packages/{package_id}", "200"),
    ("GET /runtime/agents/{agent_id}", "200"),
    ("GET /runtime/sessions/{id}", "200"),
    ("GET /runtime/sessions/{id}/connection", "200"),
    ("GET /runtime/sessions/{id}/notebook", "200"),
    ("DELETE /runtime/sessions/{id}", "200"),
    ("POST /runtime/sessions/{id}/interrupt", "200"),
    ("POST /runtime/sessions/{id}/restart", "200"),
    ("GET /runtime/sessions/{id}/variables", "200"),
    ("GET /runtime/info", "401"),
}


class Targets:
    """Real ids and files to steer part of the generated cases to, so that the fuzzer reaches
    the answers behind a lookup (most random ids are only 404s)."""

    def __init__(self, server: Server, token: str, files: dict[str, str], apkg: Path) -> None:
        self.server = server
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"}
        self.files = files
        self.apkg_bytes = apkg.read_bytes()
        self.turn = itertools.count()
        self.load_turn = itertools.count()  # its own: each file in turn, the package first
        # (operation, status[, agent kind]) -> count: what the run reached.
        self.seen: collections.Counter[tuple[str, ...]] = collections.Counter()
        agents = self.get("/runtime/agents")["agents"]
        self.agents = [a["id"] for a in agents]
        self.code_agents = [a["id"] for a in agents if a["kind"] == "code-executor"]
        self.packages = [p["id"] for p in self.get("/runtime/packages")["packages"]]
        assert self.code_agents and len(self.agents) > len(self.code_agents), agents

    def get(self, path: str) -> Any:
        resp = self.server.client.get(path, headers=self.headers)
        assert resp.status == 200, resp
        return resp.json()

    def sessions(self) -> list[str]:
        """The live sessions; one is made when the fuzzer has deleted them all."""
        found = [s["id"] for s in self.get("/runtime/sessions")["sessions"]]
        if not found:
            body = json.dumps({"input": {"code": "x = 1", "session_id": "kept"}}).encode()
            path = f"/runtime/agents/{self.code_agents[0]}/invoke"
            resp = self.server.client.request("POST", path, body, self.headers)
            assert resp.status == 200, resp
            found = [resp.json()["metadata"]["session"]]
        return found

    def pick(self, choices: list[str]) -> str | None:
        """One of ``choices`` in turn, or None (keep what was generated) one time in three."""
        n = next(self.turn)
        return None if n % 3 == 2 or not choices else choices[n % len(choices)]


def _steer(case: Any, targets: Targets) -> list[Any]:
    """Steer ``case``; answer the checks that no longer apply to it.

    Containers are replaced, never changed in place: generated cases may share them."""
    path, method = case.operation.path, case.method.upper()
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    negative_body = case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
    if path == "/runtime/agents/{agent_id}/invoke":
        # The body schema is what every agent reads plus a code executor's `code` (required by
        # code executors alone; a handler takes any object). A body meant to be refused goes
        # to a code executor, one without a string `code` to a handler.
        body = case.body if isinstance(case.body, dict) else {}
        input_ = body.get("input") if isinstance(body.get("input"), dict) else {}
        if negative_body:
            agents = targets.code_agents
        elif isinstance(input_.get("code"), str):
            agents = targets.agents
        else:
            agents = [a for a in targets.agents if a not in targets.code_agents]
        chosen = targets.pick(agents)
        if chosen:
            case.path_parameters = {**case.path_parameters, "agent_id": chosen}
    elif path == "/runtime/agents/{agent_id}":
        chosen = targets.pick(targets.agents)
        if chosen:
            case.path_parameters = {**case.path_parameters, "agent_id": chosen}
    elif path == "/runtime/packages/{package_id}" and method == "GET":
        # DELETE keeps its generated ids: unloading the examples would end the run's coverage.
        chosen = targets.pick(targets.packages)
        if chosen:
            case.path_parameters = {**case.path_parameters, "package_id": chosen}
    elif path.startswith("/runtime/sessions/{id}"):
        chosen = targets.pick(targets.sessions())
        if chosen:
            case.path_parameters = {**case.path_parameters, "id": chosen}
    elif path == "/runtime/packages/load" and isinstance(case.body, dict):
        raw = case.body.get("path")
        # The server opens what it is given: only this test's own files, never a random
        # host path. Blank paths are refused before any file is touched; they stay.
        if isinstance(raw, str) and raw.strip():
            files = list(targets.files.values())
            case.body = {**case.body, "path": files[next(targets.load_turn) % len(files)]}
    elif path == "/runtime/packages/upload" and isinstance(case.body, dict):
        if not negative and next(targets.turn) % 3 == 0:
            case.body = {**case.body, "file": targets.apkg_bytes}
            # schemathesis revalidates a changed body, and counts any body holding bytes as
            # schema-violating: a real package would then be "negative data accepted".
            return [negative_data_rejection]
    return []


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Targets]]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "files").mkdir()
    # Authentication on, as on any server that is not a developer's loopback: one admin
    # token, and load by path confined (LOAD_ROOTS) to this test's own folders.
    token = "pkr_" + secrets.token_urlsafe(32)
    entry = {"tenant": "default", "name": "fuzz", "scopes": ["admin"]}
    entry["hash"] = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    (root / "tokens.json").write_text(json.dumps([entry]))
    env = {
        **FUZZ_ENV,
        "AUTH_TOKENS_FILE": str(root / "tokens.json"),
        "LOAD_ROOTS": f"{root / 'files'}:{root / 'built'}",
    }
    server = Server(root / "state", ["--examples"], env=env, inherit_env=False)
    targets: Targets | None = None
    server.start()
    try:
        built = build_all(examples_dir(), root / "built")
        apkg = next(p for p in built if p.name.startswith("hello-handler"))
        files = {
            "valid": str(apkg),
            "not_a_zip": str(root / "files" / "notes.apkg"),
            "folder": str(root / "files"),
            "missing": str(root / "files" / "missing.apkg"),
            "unknown_user": "~pkr-no-such-user/x.apkg",
            # A package, in this test's folder but outside LOAD_ROOTS: refused unread (403).
            "outside_roots": str(root / "outside.apkg"),
        }
        Path(files["not_a_zip"]).write_text("not a zip\n")
        shutil.copyfile(apkg, files["outside_roots"])
        assert zipfile.is_zipfile(apkg)
        targets = Targets(server, token, files, apkg)
        yield server, targets
    finally:
        stop_all([server])
        shutil.rmtree(root / "built", ignore_errors=True)
    # Answers that looked right can hide a handler that failed after answering.
    log = server.logs()
    assert "Traceback (most recent call last)" not in log, log[-20000:]
    if targets is not None and targets.seen:  # the fuzz test ran, not only the others
        missing = REACHED - set(targets.seen)
        assert not missing, (sorted(missing), sorted(targets.seen.items()))


@pytest.fixture(scope="module")
def api_schema(fuzz_server: tuple[Server, Targets]) -> Any:
    server, targets = fuzz_server
    base = f"http://127.0.0.1:{server.port}"
    served = requests.get(base + openapi.PATH, headers=targets.headers, timeout=30)
    assert served.status_code == 200, served.text
    assert served.json() == openapi.document()
    per_operation = {"generation": {"max-examples": INVOKE_EXAMPLES}}
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "base-url": base,
            # Explicit credentials: the ignored_auth check drops and spoils them to see 401s.
            "auth": {"openapi": {"bearer": {"bearer": targets.token}}},
            "request-timeout": 120,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                # Schema-valid data may name things that do not exist, a file that is no
                # package or one outside LOAD_ROOTS (403); only a validation error (422) or
                # 415 would make the document lie.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", 400, 403, 404, 409, 413, 429, 503]
                },
            },
            "operations": [
                {"include-path": "/runtime/agents/{agent_id}/invoke", **per_operation},
                {"include-path": "/runtime/packages/load", **per_operation},
            ],
        }
    )
    # A copy of the headers: the loader adds its own to the mapping it is given.
    headers = dict(targets.headers)
    return schemathesis.openapi.from_url(base + openapi.PATH, config=config, headers=headers)


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
def test_fuzz_the_server_against_the_document(
    case: Any, fuzz_server: tuple[Server, Targets]
) -> None:
    _, targets = fuzz_server
    excluded = _steer(case, targets)
    response = case.call_and_validate(excluded_checks=excluded)
    label, status = case.operation.label, response.status_code
    targets.seen[label, str(status)] += 1
    if status >= 400:
        body = response.json()
        assert {"error", "message", "code"} <= set(body), body
    elif label.endswith("/invoke"):
        if "text/event-stream" in str(response.headers.get("content-type", "")):
            # A streaming agent's answer: the last event is `done`, with the plain answer.
            last = [ln for ln in response.text.splitlines() if ln.startswith("data: ")][-1]
            answer = json.loads(last[6:])
            assert answer["state"] != "error" or "output" in answer, answer
            targets.seen[label, str(status), "sse"] += 1
        else:
            answer = response.json()
        targets.seen[label, str(status), answer["metadata"]["kind"]] += 1


# ---- what the fuzz run found, one regression test each -------------------------------------


def _metric(server: Server, headers: dict[str, str], sample: str) -> float:
    text = server.client.get("/metrics", headers=headers).body.decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_load_from_the_home_of_an_unknown_user_is_a_400(
    fuzz_server: tuple[Server, Targets],
) -> None:
    """`~name` with no such user made expanduser raise RuntimeError: a 500."""
    server, targets = fuzz_server
    body = json.dumps({"path": "~pkr-no-such-user/x.apkg"}).encode()
    resp = server.client.request("POST", "/runtime/packages/load", body, targets.headers)
    assert resp.status == 400, resp
    body = resp.json()
    assert (body["error"], body["code"]) == ("PackageError", "file_not_found"), body


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/runtime/health", "GET"),  # not a method tornado routes: refused before prepare
        ("PUT", "/runtime/health", "GET"),
        ("PATCH", "/runtime/packages/x@1", "GET, DELETE"),
        ("GET", "/runtime/packages/upload", "POST"),
    ],
)
def test_an_unsupported_method_is_a_405_with_allow_and_a_request_id(
    fuzz_server: tuple[Server, Targets], method: str, path: str, allow: str
) -> None:
    """Without credentials too: a method the handler lacks runs nothing of it (no 401)."""
    server, _ = fuzz_server
    resp = server.client.request(method, path)
    assert resp.status == 405, resp
    assert resp.headers["allow"] == allow
    body = resp.json()
    assert (body["error"], body["code"]) == ("MethodNotAllowed", "methodnotallowed"), body
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"]), resp.headers
    assert body["request_id"] == resp.headers["x-request-id"]


def test_an_upload_refused_before_its_body_is_still_counted(
    fuzz_server: tuple[Server, Targets],
) -> None:
    """A 401 or 405 upload ended in _cleanup before its attributes existed: AttributeError
    after the answer, and the request was missing from the metrics."""
    server, targets = fuzz_server
    route = 'route="/runtime/packages/upload"'
    samples = {
        "POST": f'pixell_http_requests_total{{method="POST",{route},status="401"}}',
        "GET": f'pixell_http_requests_total{{method="GET",{route},status="405"}}',
    }
    before = {m: _metric(server, targets.headers, s) for m, s in samples.items()}
    assert server.client.request("POST", "/runtime/packages/upload", b"").status == 401
    assert server.client.request("GET", "/runtime/packages/upload").status == 405
    after = {m: _metric(server, targets.headers, s) for m, s in samples.items()}
    assert after == {m: v + 1 for m, v in before.items()}, (before, after)
