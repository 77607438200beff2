"""The wire contract of /work/shared/spec/par-api.md, checked against a real server process.

Paths and shapes that existing Pixell runtime clients rely on: the error envelope, X-Request-ID,
422 validation details, health, info counters, agent and package listings, /metrics labels.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Server, make_apkg, manifest_yaml, stop_all

from pixell_kernel_runtime import __version__

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
EXAMPLE_AGENTS = {
    "hello-handler@0.1.0/greet": False,
    "hello-handler@0.1.0/count": False,
    "hello-handler@0.1.0/echo-async": False,
    "pixell-python-agent@0.1.0/code-executor": False,
    "pixell-python-agent@0.1.0/stream-executor": False,
    "pixell-python-agent@0.1.0/data-analyzer": False,
    "pixell-python-agent@0.1.0/ml-runner": True,
}
AGENT_FIELDS = {
    "id",
    "package_id",
    "name",
    "description",
    "status",
    "private",
    "capabilities",
    "kind",
}
PACKAGE_FIELDS = {"id", "name", "version", "sha256", "size", "loaded_at", "source", "agents"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module, started with the two example agents loaded."""
    server = Server(tmp_path_factory.mktemp("apisrv") / "state", ["--examples"]).start()
    try:
        yield server
    finally:
        stop_all([server])


@pytest.fixture
def client(api: Server) -> Client:
    return api.client


def parse_iso(value: str) -> datetime:
    assert isinstance(value, str) and "T" in value, value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, value
    return parsed


def assert_envelope(resp: Any, status: int, error: str) -> dict:
    assert resp.status == status, resp
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["code"], str) and re.fullmatch(r"[a-z_]+", body["code"]), body
    request_id = resp.headers.get("x-request-id", "")
    assert REQUEST_ID_RE.match(request_id), resp.headers
    assert body.get("request_id") == request_id
    return body


def multipart(fields: dict[str, tuple[str | None, bytes]], boundary: str = "XyZb0undary") -> bytes:
    """name -> (filename or None, content)."""
    out = b""
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# ---- health, info --------------------------------------------------------------------------


def test_health_shape(client: Client) -> None:
    resp = client.get("/runtime/health")
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == "healthy"
    assert body["version"] == __version__
    stamp = parse_iso(body["timestamp"])
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)


def test_info_has_real_counters(client: Client, tmp_path: Path) -> None:
    info = client.get("/runtime/info").json()
    for key in (
        "version",
        "start_time",
        "packages_loaded",
        "agents_mounted",
        "total_invocations",
        "status",
    ):
        assert key in info, key
    assert info["version"] == __version__
    assert parse_iso(info["start_time"]) <= datetime.now(UTC)
    assert isinstance(info["total_invocations"], int)
    base_packages = len(client.get("/runtime/packages").json()["packages"])
    base_agents = len(client.get("/runtime/agents").json()["agents"])
    assert info["packages_loaded"] == base_packages >= 2  # the examples, loaded at start
    assert info["agents_mounted"] == base_agents >= 7

    one = make_apkg(
        tmp_path / "one.apkg",
        {"agent.yaml": manifest_yaml("info-one"), "main.py": "def handler(d):\n    return d\n"},
    )
    assert client.load(one).status == 200
    info = client.get("/runtime/info").json()
    assert (info["packages_loaded"], info["agents_mounted"]) == (base_packages + 1, base_agents + 1)

    two = make_apkg(
        tmp_path / "two.apkg",
        {
            "agent.yaml": manifest_yaml(
                "info-two",
                exports=[{"name": "a", "handler": "main.a"}, {"name": "b", "handler": "main.b"}],
            ),
            "main.py": "def a(d):\n    return d\n\n\ndef b(d):\n    return d\n",
        },
    )
    assert client.upload("/runtime/packages/upload", two).status == 200
    info = client.get("/runtime/info").json()
    assert (info["packages_loaded"], info["agents_mounted"]) == (base_packages + 2, base_agents + 3)

    assert client.delete("/runtime/packages/info-one@0.1.0").status == 200
    assert client.delete("/runtime/packages/info-two@0.1.0").status == 200
    info = client.get("/runtime/info").json()
    assert (info["packages_loaded"], info["agents_mounted"]) == (base_packages, base_agents)


# ---- X-Request-ID --------------------------------------------------------------------------

REQUESTS = {
    "health-200": ("GET", "/runtime/health", None, {}, 200),
    "metrics-200": ("GET", "/metrics", None, {}, 200),
    "unknown-route-404": ("GET", "/no/such/route", None, {}, 404),
    "unknown-agent-404": ("GET", "/runtime/agents/nope@1.0/x", None, {}, 404),
    "wrong-method-405": ("DELETE", "/runtime/health", None, {}, 405),
    "invalid-body-422": (
        "POST",
        "/runtime/packages/load",
        b"{oops",
        {"Content-Type": "application/json"},
        422,
    ),
    "load-error-400": (
        "POST",
        "/runtime/packages/load",
        b'{"path": "/nonexistent/pkr-test.apkg"}',
        {"Content-Type": "application/json"},
        400,
    ),
    "upload-415": ("POST", "/runtime/packages/upload", b"x", {"Content-Type": "text/plain"}, 415),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_every_response_carries_a_request_id(client: Client, case: str) -> None:
    method, path, body, headers, status = REQUESTS[case]
    first = client.request(method, path, body, dict(headers))
    second = client.request(method, path, body, dict(headers))
    assert first.status == second.status == status, (first, second)
    ids = [r.headers.get("x-request-id", "") for r in (first, second)]
    assert all(REQUEST_ID_RE.match(i) for i in ids), ids
    assert ids[0] != ids[1]  # generated per request

    # A well-formed incoming id is echoed; a malformed one is replaced.
    mine = f"trace-{uuid.uuid4().hex}:1.a"
    echoed = client.request(method, path, body, {**headers, "X-Request-ID": mine})
    assert echoed.status == status
    assert echoed.headers.get("x-request-id") == mine
    bad = "has spaces and / slashes"
    replaced = client.request(method, path, body, {**headers, "X-Request-ID": bad})
    assert replaced.status == status
    new_id = replaced.headers.get("x-request-id", "")
    assert new_id != bad and REQUEST_ID_RE.match(new_id)
    if status >= 400:
        assert echoed.json()["request_id"] == mine
        assert replaced.json()["request_id"] == new_id


# ---- the error envelope --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/runtime/nope"),
        ("POST", "/no/such/thing"),
        ("GET", "/runtime/packages/a/b/c"),
        ("DELETE", "/"),
    ],
)
def test_unknown_route_is_404_in_the_envelope(client: Client, method: str, path: str) -> None:
    body = assert_envelope(client.request(method, path), 404, "NotFound")
    assert path in body["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/runtime/health"),
        ("POST", "/runtime/health"),
        ("PUT", "/runtime/packages"),
        ("GET", "/runtime/packages/load"),
        ("GET", "/runtime/packages/upload"),
        ("POST", "/runtime/agents"),
    ],
)
def test_wrong_method_is_405_in_the_envelope(client: Client, method: str, path: str) -> None:
    body = assert_envelope(
        client.request(method, path, b"" if method != "GET" else None), 405, "MethodNotAllowed"
    )
    assert method in body["message"] and path in body["message"]


@pytest.mark.parametrize(
    ("path", "agent_id"),
    [
        ("/runtime/agents/nope@1.0/x", "nope@1.0/x"),
        ("/runtime/agents/nope@1.0%2Fx", "nope@1.0/x"),
        ("/runtime/agents/hello-handler@0.1.0/nope", "hello-handler@0.1.0/nope"),
        ("/runtime/agents/hello-handler@0.1.0", "hello-handler@0.1.0"),
        ("/runtime/agents/just-a-name", "just-a-name"),
    ],
)
def test_unknown_agent_is_404(client: Client, path: str, agent_id: str) -> None:
    body = assert_envelope(client.get(path), 404, "NotFound")
    assert body["message"] == f"Agent not found: {agent_id}"


def test_unknown_package_is_404(client: Client) -> None:
    body = assert_envelope(client.get("/runtime/packages/nope@9.9.9"), 404, "NotFound")
    assert body["message"] == "Package not found: nope@9.9.9"
    body = assert_envelope(client.delete("/runtime/packages/nope@9.9.9"), 404, "NotFound")
    assert "nope@9.9.9" in body["message"]


# ---- 422 validation ------------------------------------------------------------------------

INVALID_BODIES = {
    "not-json": (b"{not json", [["body"]]),
    "not-utf8": (b'{"path": "\xff"}', [["body"]]),
    "empty": (b"", [["body"]]),
    "a-list": (b'["/tmp/x.apkg"]', [["body"]]),
    "a-string": (b'"/tmp/x.apkg"', [["body"]]),
    "missing-path": (b'{"sha256": null}', [["body", "path"]]),
    "path-null": (b'{"path": null}', [["body", "path"]]),
    "path-int": (b'{"path": 42}', [["body", "path"]]),
    "path-bool": (b'{"path": true}', [["body", "path"]]),
    "path-and-sha-wrong": (b'{"path": [], "sha256": 5}', [["body", "path"], ["body", "sha256"]]),
}


@pytest.mark.parametrize("case", list(INVALID_BODIES))
def test_invalid_load_body_is_422(client: Client, case: str) -> None:
    before = client.get("/runtime/packages").json()
    raw, locs = INVALID_BODIES[case]
    resp = client.request(
        "POST", "/runtime/packages/load", raw, {"Content-Type": "application/json"}
    )
    body = assert_envelope(resp, 422, "ValidationError")
    assert body["message"] == "Invalid request data"
    details = body["details"]
    assert isinstance(details, list) and details
    for d in details:
        assert set(d) >= {"loc", "msg", "type"}, d
        assert isinstance(d["loc"], list) and isinstance(d["msg"], str) and d["msg"]
        assert isinstance(d["type"], str) and d["type"]
    assert [d["loc"] for d in details] == locs
    assert client.get("/runtime/packages").json() == before


def test_invalid_path_type_detail_names_the_type(client: Client) -> None:
    body = client.post_json("/runtime/packages/load", {"path": 42}).json()
    (detail,) = body["details"]
    assert detail["loc"] == ["body", "path"]
    assert "string" in detail["msg"] and detail["type"].startswith("type_error")
    body = client.post_json("/runtime/packages/load", {}).json()
    assert body["details"] == [
        {"loc": ["body", "path"], "msg": "field required", "type": "value_error.missing"}
    ]


# ---- upload request errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"sha256": (None, b"0" * 64)},
        {"package": ("x.apkg", b"PK\x05\x06" + b"\0" * 18)},
        {},
    ],
    ids=["only-sha256", "file-under-another-name", "no-parts"],
)
def test_upload_without_a_file_field_is_422(
    api: Server, client: Client, fields: dict[str, tuple[str | None, bytes]]
) -> None:
    before = client.get("/runtime/packages").json()
    resp = client.request(
        "POST",
        "/runtime/packages/upload",
        multipart(fields),
        {"Content-Type": "multipart/form-data; boundary=XyZb0undary"},
    )
    body = assert_envelope(resp, 422, "ValidationError")
    assert body["message"] == "Invalid request data"
    assert [d["loc"] for d in body["details"]] == [["body", "file"]]
    assert client.get("/runtime/packages").json() == before
    incoming = api.state_dir / "packages" / ".incoming"
    assert not any(incoming.iterdir())


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "application/json; boundary=XyZb0undary",
        "text/plain; boundary=XyZb0undary",
        "multipart/mixed; boundary=XyZb0undary",
        "multipart/form-data",  # no boundary
        None,
    ],
)
def test_upload_with_a_wrong_content_type_is_415(
    client: Client, tmp_path: Path, content_type: str | None
) -> None:
    apkg = make_apkg(
        tmp_path / "ct.apkg",
        {"agent.yaml": manifest_yaml("ct-agent"), "main.py": "def handler(d):\n    return d\n"},
    )
    # A well-formed multipart body with a file field: only the declared type is wrong.
    payload = multipart({"file": ("ct.apkg", apkg.read_bytes())})
    headers = {"Content-Type": content_type} if content_type else {}
    resp = client.request("POST", "/runtime/packages/upload", payload, headers)
    body = assert_envelope(resp, 415, "UnsupportedMediaType")
    assert "multipart/form-data" in body["message"]
    assert client.get("/runtime/packages/ct-agent@0.1.0").status == 404


# ---- listings --------------------------------------------------------------------------------


def test_agents_listing_shape(client: Client) -> None:
    body = client.get("/runtime/agents").json()
    assert set(body) >= {"agents"}
    agents = {a["id"]: a for a in body["agents"]}
    assert set(EXAMPLE_AGENTS) <= set(agents)
    for agent_id, private in EXAMPLE_AGENTS.items():
        a = agents[agent_id]
        assert set(a) >= AGENT_FIELDS, a
        assert a["id"] == f"{a['package_id']}/{a['name']}"
        assert a["status"] == "ready"
        assert a["private"] is private
        assert isinstance(a["description"], str) and a["description"]
        assert isinstance(a["capabilities"], list)
    assert agents["pixell-python-agent@0.1.0/ml-runner"]["kind"] == "code-executor"
    assert agents["pixell-python-agent@0.1.0/ml-runner"]["capabilities"] == [
        "python-execution",
        "machine-learning",
    ]
    assert agents["hello-handler@0.1.0/greet"]["kind"] == "handler"
    assert agents["hello-handler@0.1.0/greet"]["description"].startswith("Say hello")


@pytest.mark.parametrize("agent_id", sorted(EXAMPLE_AGENTS))
def test_agent_detail_with_raw_and_encoded_slash(client: Client, agent_id: str) -> None:
    package_id, _, name = agent_id.partition("/")
    raw = client.get(f"/runtime/agents/{agent_id}")
    encoded = client.get(f"/runtime/agents/{package_id}%2F{name}")
    lower = client.get(f"/runtime/agents/{package_id}%2f{name}")
    assert raw.status == encoded.status == lower.status == 200, (raw, encoded, lower)
    assert raw.json() == encoded.json() == lower.json()
    detail = raw.json()
    assert set(detail) >= AGENT_FIELDS
    assert detail["id"] == agent_id and detail["package_id"] == package_id
    assert detail["name"] == name and detail["private"] is EXAMPLE_AGENTS[agent_id]


def test_packages_listing_shape(client: Client) -> None:
    body = client.get("/runtime/packages").json()
    packages = {p["id"]: p for p in body["packages"]}
    assert {"hello-handler@0.1.0", "pixell-python-agent@0.1.0"} <= set(packages)
    for pid, pkg in packages.items():
        assert set(pkg) >= PACKAGE_FIELDS, pkg
        assert pkg["id"] == f"{pkg['name']}@{pkg['version']}" == pid
        assert re.fullmatch(r"[0-9a-f]{64}", pkg["sha256"])
        assert isinstance(pkg["size"], int) and pkg["size"] > 0
        parse_iso(pkg["loaded_at"])
        assert all(a.startswith(pid + "/") for a in pkg["agents"])
        detail = client.get(f"/runtime/packages/{pid}").json()
        assert {k: detail[k] for k in PACKAGE_FIELDS} == {k: pkg[k] for k in PACKAGE_FIELDS}
        assert detail["manifest"]["name"] == pkg["name"]
        assert detail["manifest"]["version"] == pkg["version"]
    hello = packages["hello-handler@0.1.0"]
    assert hello["source"].startswith("examples:")
    assert sorted(hello["agents"]) == sorted(a for a in EXAMPLE_AGENTS if a.startswith("hello"))


# ---- metrics ---------------------------------------------------------------------------------


def _requests_total(client: Client) -> dict[tuple[str, str, str], float]:
    resp = client.get("/metrics")
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, str, str], float] = {}
    pattern = re.compile(r"^pixell_http_requests_total\{(.*)\} (\S+)$")
    for line in resp.body.decode().splitlines():
        m = pattern.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(labels["method"], labels["route"], labels["status"])] = float(m.group(2))
    return out


def test_metrics_are_labelled_by_route_not_path(client: Client) -> None:
    marker = uuid.uuid4().hex
    before = _requests_total(client)
    for _ in range(3):
        assert client.get("/runtime/health").status == 200
    assert client.get("/runtime/agents/hello-handler@0.1.0/greet").status == 200
    assert client.get("/runtime/agents/hello-handler@0.1.0%2Fcount").status == 200
    assert client.get(f"/runtime/agents/{marker}@1/x").status == 404
    assert client.get("/runtime/packages/hello-handler@0.1.0").status == 200
    assert client.get(f"/unknown/{marker}").status == 404
    after = _requests_total(client)

    def delta(key: tuple[str, str, str]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(("GET", "/runtime/health", "200")) == 3
    assert delta(("GET", "/runtime/agents/{id}", "200")) == 2
    assert delta(("GET", "/runtime/agents/{id}", "404")) == 1
    assert delta(("GET", "/runtime/packages/{id}", "200")) == 1
    assert delta(("GET", "not_found", "404")) == 1
    routes = {route for _, route, _ in after}
    for route in routes:
        assert "@" not in route and marker not in route and "hello" not in route, route
    resp = client.get("/metrics")
    assert "pixell_http_request_duration_seconds" in resp.body.decode()
    assert marker not in resp.body.decode()


def test_upload_with_two_files_is_422_and_malformed_multipart_is_400(
    api: Server, client: Client, tmp_path: Path
) -> None:
    apkg = make_apkg(
        tmp_path / "two.apkg",
        {"agent.yaml": manifest_yaml("two-files"), "main.py": "def handler(d):\n    return d\n"},
    )
    headers = {"Content-Type": "multipart/form-data; boundary=XyZb0undary"}
    part = (
        b'--XyZb0undary\r\nContent-Disposition: form-data; name="file"; filename="a.apkg"\r\n\r\n'
        + apkg.read_bytes()
        + b"\r\n"
    )
    resp = client.request(
        "POST", "/runtime/packages/upload", part + part + b"--XyZb0undary--\r\n", headers
    )
    body = assert_envelope(resp, 422, "ValidationError")
    assert body["details"][0]["loc"] == ["body", "file"]
    assert "one file" in body["details"][0]["msg"]

    resp = client.request("POST", "/runtime/packages/upload", b"no boundary here", headers)
    body = assert_envelope(resp, 400, "BadRequest")
    assert "multipart" in body["message"]
    assert client.get("/runtime/packages/two-files@0.1.0").status == 404
    incoming = api.state_dir / "packages" / ".incoming"
    assert not any(incoming.iterdir())
