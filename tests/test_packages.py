"""End-to-end tests of the package store against a real server process (no mocks).

Every archive is sent to ``python -m pixell_kernel_runtime serve`` over HTTP, by path
(``POST /runtime/packages/load``) and by multipart upload (``POST /runtime/packages/upload``).
Archives come from the tests (``make_apkg``), the runtime's own builder, the real ``pixell``
CLIs of pixell-kit 0.4.12 and pixell-sdk 0.5.4, and hand-zipped packages for the producers
that have no tool: old kits, hand-made packages and the original runtime's own test packages
(``runtime: {python: ...}``, top-level ``exports``), which neither CLI accepts.
docs/apkg-format.md describes every variant.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tarfile
import threading
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    EXAMPLES,
    Client,
    Server,
    make_apkg,
    manifest_yaml,
    minimal_env,
    stop_all,
    wait_for,
)

MAIN_PY = "def handler(data):\n    return {'echo': data}\n"
SUB_AGENTS_PY = "def alpha(data):\n    return {'a': 1}\n\n\ndef beta(data):\n    return {'b': 2}\n"


# ---- helpers ---------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny(path: Path, name: str = "tiny-agent", version: str = "0.1.0", **extra: Any) -> Path:
    """A minimal valid package: agent.yaml + main.py with ``handler``."""
    return make_apkg(
        path, {"agent.yaml": manifest_yaml(name, version, **extra), "main.py": MAIN_PY}
    )


def store_dir(server: Server) -> Path:
    return server.state_dir / "packages"


def snapshot(root: Path) -> set[str]:
    """Every path below ``root`` (the server logs aside): what a refusal must leave unchanged."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not (dirpath == str(root) and name.endswith(".log")):
                out.add(rel)
    return out


def assert_no_work_left(server: Server) -> None:
    """The store's work-in-progress folders are empty (an upload cleans up as it answers)."""
    for sub in (".staging", ".incoming"):
        folder = store_dir(server) / sub
        assert folder.is_dir(), folder
        assert wait_for(lambda f=folder: not any(f.iterdir())), (sub, list(folder.iterdir()))


def send(client: Client, how: str, apkg: Path, sha256: str | None = None) -> Any:
    if how == "load":
        return client.load(apkg, **({"sha256": sha256} if sha256 is not None else {}))
    fields = {"sha256": sha256} if sha256 is not None else None
    return client.upload("/runtime/packages/upload", apkg, fields)


def assert_loaded(resp: Any, package_id: str, agents: list[str], result: str) -> dict:
    """A load or upload that succeeded with ``result`` (installed, replaced or unchanged)."""
    assert resp.status == 200, resp
    body = resp.json()
    assert body["status"] == "success"
    assert body["package_id"] == package_id
    assert sorted(body["agents"]) == sorted(f"{package_id}/{a}" for a in agents)
    assert len(body["sha256"]) == 64
    assert body["result"] == result, body
    return body


def assert_refused(
    server: Server,
    apkg: Path,
    needles: tuple[str, ...],
    *,
    code: str | None = None,
    how: tuple[str, ...] = ("load", "upload"),
    sha256: str | None = None,
) -> None:
    """400 naming the problem, nothing installed, nothing written anywhere, no temp left."""
    client = server.client
    before_list = client.get("/runtime/packages").json()
    before_agents = client.get("/runtime/agents").json()
    root = server.state_dir.parent
    before_files = snapshot(root)
    for way in how:
        resp = send(client, way, apkg, sha256)
        assert resp.status == 400, (way, resp)
        assert resp.headers.get("x-request-id"), resp.headers
        body = resp.json()
        assert body["error"] == "PackageError", body
        assert isinstance(body["code"], str) and body["code"], body
        if code is not None:
            assert body["code"] == code, body
        for needle in needles:
            assert needle in body["message"], (way, needle, body["message"])
    assert client.get("/runtime/packages").json() == before_list
    assert client.get("/runtime/agents").json() == before_agents
    assert_no_work_left(server)
    assert wait_for(lambda: snapshot(root) == before_files), snapshot(root) ^ before_files


def unix_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def invoke_output(client: Client, agent_id: str, input_: dict[str, Any]) -> Any:
    """Invoke ``agent_id`` and return its ``output``, which must be a success."""
    resp = client.invoke(agent_id, input_)
    assert resp.status == 200, resp
    body = resp.json()
    assert body["agent_id"] == agent_id, body
    assert body["metadata"].get("error") is not True, body
    return body["output"]


def package_ids(server: Server) -> set[str]:
    resp = server.client.get("/runtime/packages")
    assert resp.status == 200, resp
    return {p["id"] for p in resp.json()["packages"]}


def assert_absent(server: Server, package_id: str) -> None:
    resp = server.client.get(f"/runtime/packages/{package_id}")
    assert resp.status == 404, resp
    assert resp.json()["message"] == f"Package not found: {package_id}"


# ---- servers ---------------------------------------------------------------------------------


def server_env(base: Path) -> dict[str, str]:
    """A server's whole environment: nothing of the developer's (PACKAGE_CACHE_DIR, RUN_DIR,
    SANDBOX_*...) leaks in, and its home and run dir are temp dirs of its own."""
    return {**minimal_env(base / "home"), "RUN_DIR": str(base / "run")}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with default limits, shared by the tests of this module that allow it."""
    # The home and run dirs sit outside the state dir's parent, which refusals snapshot.
    env = server_env(tmp_path_factory.mktemp("pkgsrv-env"))
    server = Server(tmp_path_factory.mktemp("pkgsrv") / "state", env=env, inherit_env=False)
    try:
        yield server.start()
    finally:
        stop_all([server])


@pytest.fixture
def clean(srv: Server) -> Iterator[Server]:
    """``srv``, left as the test found it: every package the test added is unloaded after it."""
    before = package_ids(srv)
    yield srv
    for package_id in sorted(package_ids(srv) - before):
        resp = srv.client.delete(f"/runtime/packages/{package_id}")
        assert resp.status == 200, resp


LIMITS = {
    "APKG_MAX_ENTRIES": "6",
    "APKG_MAX_ENTRY_BYTES": "2000000",
    "APKG_MAX_TOTAL_BYTES": "3000000",
    "APKG_MAX_RATIO": "3",
}


@pytest.fixture(scope="module")
def small_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server started with small archive caps through the environment."""
    env = {**server_env(tmp_path_factory.mktemp("smallsrv-env")), **LIMITS}
    server = Server(tmp_path_factory.mktemp("smallsrv") / "state", env=env, inherit_env=False)
    try:
        yield server.start()
    finally:
        stop_all([server])


# ---- accepted packages -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["load", "upload"])
def test_minimal_package_loads_and_is_listed(srv: Server, tmp_path: Path, how: str) -> None:
    name = f"tiny-{how}"
    apkg = tiny(tmp_path / f"{name}-0.1.0.apkg", name)
    body = assert_loaded(send(srv.client, how, apkg), f"{name}@0.1.0", ["default"], "installed")
    assert body["sha256"] == sha256_of(apkg)

    listed = {p["id"]: p for p in srv.client.get("/runtime/packages").json()["packages"]}
    pkg = listed[f"{name}@0.1.0"]
    assert pkg["name"] == name and pkg["version"] == "0.1.0"
    assert pkg["sha256"] == sha256_of(apkg)
    assert pkg["size"] == apkg.stat().st_size
    assert pkg["agents"] == [f"{name}@0.1.0/default"]
    assert pkg["loaded_at"].endswith("Z")
    expected_source = f"path:{apkg}" if how == "load" else f"upload:{apkg.name}"
    assert pkg["source"] == expected_source

    detail = srv.client.get(f"/runtime/packages/{name}@0.1.0").json()
    assert {k: detail[k] for k in pkg} == pkg
    assert detail["manifest"]["entrypoint"] == "main:handler"
    assert detail["manifest"]["exports"][0]["handler"] == "main:handler"

    agent = srv.client.get(f"/runtime/agents/{name}@0.1.0/default").json()
    assert agent["package_id"] == f"{name}@0.1.0"
    assert agent["kind"] == "handler" and agent["private"] is False
    # The package is stored extracted, under the object named by its digest.
    obj = store_dir(srv) / "objects" / body["sha256"]
    assert (obj / "pkg" / "main.py").read_text() == MAIN_PY
    assert os.readlink(store_dir(srv) / "ids" / f"{name}@0.1.0") == f"../objects/{body['sha256']}"
    assert_no_work_left(srv)


@pytest.mark.parametrize("how", ["load", "upload"])
def test_example_packages_built_by_the_builder_load(
    clean: Server, example_apkgs: dict[str, Path], how: str
) -> None:
    srv = clean
    assert_absent(srv, "hello-handler@0.1.0")
    assert_absent(srv, "pixell-python-agent@0.1.0")
    assert_loaded(
        send(srv.client, how, example_apkgs["hello-handler"]),
        "hello-handler@0.1.0",
        ["greet", "count", "echo-async"],
        "installed",
    )
    assert_loaded(
        send(srv.client, how, example_apkgs["pixell-python-agent"]),
        "pixell-python-agent@0.1.0",
        ["code-executor", "stream-executor", "data-analyzer", "ml-runner"],
        "installed",
    )
    agents = {a["id"]: a for a in srv.client.get("/runtime/agents").json()["agents"]}
    ml = agents["pixell-python-agent@0.1.0/ml-runner"]
    assert ml["private"] is True and ml["kind"] == "code-executor"
    assert agents["pixell-python-agent@0.1.0/code-executor"]["private"] is False
    assert agents["hello-handler@0.1.0/greet"]["kind"] == "handler"
    assert agents["hello-handler@0.1.0/greet"]["capabilities"] == ["greeting"]
    detail = srv.client.get("/runtime/agents/hello-handler@0.1.0/count").json()
    assert detail["handler"] == "src.main:count"


# ---- the real packaging CLIs -------------------------------------------------------------------

# pixell-sdk ships the same import package (`pixell`) and the same `pixell` command as
# pixell-kit, so installing both into one environment overwrites one with the other (77 files
# in common). The kit is a test dependency (pyproject's `test` extra); the sdk gets a venv.
PIXELL_SDK = "pixell-sdk==0.5.4"


def _cli_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def _pip_env() -> dict[str, str]:
    # pip keeps its index settings and cache; nothing may point Python at the checkout.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _cli_version(cli: Path, home: Path) -> str:
    done = subprocess.run(
        [str(cli), "--version"], capture_output=True, text=True, timeout=60, env=_cli_env(home)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def kit_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `pixell` command of pixell-kit 0.4.12, installed beside this interpreter."""
    cli = Path(sysconfig.get_path("scripts")) / "pixell"
    assert cli.is_file(), f"{cli} missing: install the test extra (pixell-kit==0.4.12)"
    home = tmp_path_factory.mktemp("kit-home")
    # Another producer's `pixell` installed over the kit's would build other archives.
    assert _cli_version(cli, home) == "pixell, version 0.4.12"
    return cli


@pytest.fixture(scope="module")
def sdk_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `pixell` command of the real pixell-sdk 0.5.4 from PyPI, in a venv of its own."""
    base = tmp_path_factory.mktemp("pixell-sdk")
    venv = base / "venv"
    for argv in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", PIXELL_SDK],
    ):
        done = subprocess.run(
            argv, cwd=base, env=_pip_env(), capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    cli = venv / "bin" / "pixell"
    assert _cli_version(cli, base / "home") == "pixell, version 0.5.4"
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, pixell\n"
            "print(m.version('pixell-sdk'), pixell.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_cli_env(base / "home"),
    )
    version, module = where.stdout.split()
    assert version == "0.5.4" and Path(module).is_relative_to(venv), where.stdout + where.stderr
    return cli


def _pixell_build(cli: Path, src: Path, work: Path) -> Path:
    """``pixell build`` of a copy of ``src`` (the CLIs write into it), as their users run it."""
    project = work / "src" / src.name
    shutil.copytree(src, project, ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".env").touch()  # both CLIs refuse to build without one
    out = work / "out"
    proc = subprocess.run(
        [str(cli), "build", "-p", str(project), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
        env=_cli_env(work / "home"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = sorted(out.glob("*.apkg"))
    assert len(built) == 1, built
    return built[0]


def _names(apkg: Path) -> set[str]:
    with zipfile.ZipFile(apkg) as zf:
        return set(zf.namelist())


def _archived_yaml(apkg: Path, name: str = "agent.yaml") -> Any:
    with zipfile.ZipFile(apkg) as zf:
        return yaml.safe_load(zf.read(name))


@pytest.mark.parametrize("how", ["load", "upload"])
def test_packages_built_by_the_real_pixell_kit_load_and_run(
    clean: Server, kit_cli: Path, tmp_path: Path, how: str
) -> None:
    srv = clean
    assert_absent(srv, "hello-handler@0.1.0")
    assert_absent(srv, "pixell-python-agent@0.1.0")
    hello = _pixell_build(kit_cli, EXAMPLES / "hello-handler", tmp_path / "hello")
    # What makes it a kit build: its metadata, a generated setup.py, directory entries, dist/.
    assert {".pixell/package.json", "setup.py", "agent.yaml", "src/main.py"} <= _names(hello)
    assert {"src/", "dist/"} <= _names(hello)
    # The kit copies agent.yaml verbatim: the sub-agents survive.
    assert len(_archived_yaml(hello)["metadata"]["sub_agents"]) == 3

    body = assert_loaded(
        send(srv.client, how, hello),
        "hello-handler@0.1.0",
        ["greet", "count", "echo-async"],
        "installed",
    )
    assert body["sha256"] == sha256_of(hello)
    detail = srv.client.get("/runtime/packages/hello-handler@0.1.0").json()
    assert detail["manifest"]["producer"] == "pixell-kit"
    assert detail["manifest"]["runtime"] == "python3.11"
    output = invoke_output(srv.client, "hello-handler@0.1.0/greet", {"name": "Kit"})
    assert output == {"greeting": "Hello, Kit!"}

    pyagent = _pixell_build(kit_cli, EXAMPLES / "pixell-python-agent", tmp_path / "py")
    assert_loaded(
        send(srv.client, how, pyagent),
        "pixell-python-agent@0.1.0",
        ["code-executor", "stream-executor", "data-analyzer", "ml-runner"],
        "installed",
    )
    private = {
        a["name"]: a["private"]
        for a in srv.client.get("/runtime/agents").json()["agents"]
        if a["package_id"] == "pixell-python-agent@0.1.0"
    }
    assert private == {
        "code-executor": False,
        "stream-executor": False,
        "data-analyzer": False,
        "ml-runner": True,
    }
    assert_no_work_left(srv)


SDK_AGENT_YAML = """\
name: sdk-agent
display_name: SDK Agent
description: built by pixell-sdk 0.5.4
author: tests
license: MIT
entrypoint: src.main:handler
runtime: python3.11
capabilities: [greeting]
environment:
  GREETING: ${GREETING:-hello}
metadata:
  version: 2.1.0
  author_email: tests@example.com
  sub_agents:
    - {name: lost, description: the sdk drops sub-agents, endpoint: "src.main:handler"}
rest:
  entry: src.rest.index:mount
ui:
  path: ui
http_server: src.main:app
permissions:
  required: [user.profile]
plan_mode:
  supported: false
"""
SDK_MAIN_PY = """\
import os

app = None  # the sdk's http_server entry; the runtime calls the entrypoint instead


def handler(request):
    return {"greeting": f"{os.environ['GREETING']}, {request.get('name', 'world')}!"}
"""


def _sdk_project(root: Path) -> Path:
    """An agent project written for pixell-sdk 0.5.4, with a REST and a UI surface."""
    for name, text in {
        "agent.yaml": SDK_AGENT_YAML,
        ".env": "GREETING='hi there'\n# a comment\n",
        "requirements.txt": "",
        "src/__init__.py": "",
        "src/main.py": SDK_MAIN_PY,
        "src/rest/__init__.py": "",
        "src/rest/index.py": "def mount(app):\n    return app\n",
        "ui/index.html": "<html></html>\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("how", ["load", "upload"])
def test_packages_built_by_the_real_pixell_sdk_load_and_run(
    clean: Server, sdk_cli: Path, tmp_path: Path, how: str
) -> None:
    srv = clean
    for package_id in ("sdk-agent@2.1.0", "hello-handler@0.1.0", "pixell-python-agent@0.1.0"):
        assert_absent(srv, package_id)

    sdk = _pixell_build(sdk_cli, _sdk_project(tmp_path / "sdk-agent"), tmp_path / "sdk")
    assert sdk.name == "sdk-agent-2.1.0.apkg"
    names = _names(sdk)
    # What makes it an sdk build: directory entries, the REST entry copied to the root by its
    # basename, the UI folder kept where it was, no dist/.
    assert {"src/", "src/rest/", "ui/", ".pixell/"} <= names
    assert {"index.py", "ui/index.html", "setup.py", "deploy.json", ".env"} <= names
    assert not any(n.startswith("dist/") for n in names)
    manifest = _archived_yaml(sdk)
    # agent.yaml is re-serialised: sub-agents lost, the agent version copied to the top level.
    assert manifest["metadata"] == {
        "version": "2.1.0",
        "tags": [],
        "author_email": "tests@example.com",
    }
    assert manifest["version"] == "2.1.0"
    with zipfile.ZipFile(sdk) as zf:
        assert json.loads(zf.read(".pixell/package.json"))["created_by"] == "pixell-kit"

    assert_loaded(send(srv.client, how, sdk), "sdk-agent@2.1.0", ["default"], "installed")
    detail = srv.client.get("/runtime/packages/sdk-agent@2.1.0").json()
    assert detail["manifest"]["producer"] == "pixell-sdk"
    assert detail["manifest"]["exports"][0]["handler"] == "src.main:handler"
    assert detail["manifest"]["environment_keys"] == ["GREETING"]
    agent = srv.client.get("/runtime/agents/sdk-agent@2.1.0/default").json()
    assert agent["description"] == "built by pixell-sdk 0.5.4"
    assert agent["kind"] == "handler" and agent["capabilities"] == ["greeting"]
    # The entrypoint runs in the session's kernel, with .env expanded into the environment.
    output = invoke_output(srv.client, "sdk-agent@2.1.0/default", {"name": "Ada"})
    assert output == {"greeting": "hi there, Ada!"}

    # The examples built by the sdk lose their sub-agents: one default export each.
    hello = _pixell_build(sdk_cli, EXAMPLES / "hello-handler", tmp_path / "hello")
    assert_loaded(send(srv.client, how, hello), "hello-handler@0.1.0", ["default"], "installed")
    output = invoke_output(
        srv.client, "hello-handler@0.1.0/default", {"action": "greet", "data": {"name": "Sdk"}}
    )
    assert output == {"status": "success", "data": {"greeting": "Hello, Sdk!"}, "error": None}

    pyagent = _pixell_build(sdk_cli, EXAMPLES / "pixell-python-agent", tmp_path / "py")
    assert_loaded(
        send(srv.client, how, pyagent), "pixell-python-agent@0.1.0", ["default"], "installed"
    )
    agent = srv.client.get("/runtime/agents/pixell-python-agent@0.1.0/default").json()
    assert agent["kind"] == "code-executor"
    first = invoke_output(srv.client, "pixell-python-agent@0.1.0/default", {"code": "x = 21"})
    assert first["status"] == "success"
    second = invoke_output(
        srv.client, "pixell-python-agent@0.1.0/default", {"code": "result = x * 2"}
    )
    assert second["status"] == "success" and second["result"] == 42
    assert_no_work_left(srv)


# ---- producers with no tool: hand-zipped ---------------------------------------------------------


def _old_kit(path: Path) -> Path:
    """pixell-kit <= 0.3.5: no .env, no dist/, no setup.py."""
    manifest = {
        "version": "1.0",
        "name": "old-kit-agent",
        "display_name": "Old",
        "description": "old kit",
        "author": "someone",
        "license": "MIT",
        "entrypoint": "src.main:handler",
        "metadata": {
            "version": "0.0.9",
            "sub_agents": [
                {"name": "alpha", "description": "A", "endpoint": "src.main:alpha"},
                {"name": "beta", "description": "B", "endpoint": "/beta", "public": False},
            ],
        },
    }
    return make_apkg(
        path,
        {
            "agent.yaml": yaml.safe_dump(manifest),
            ".pixell/package.json": json.dumps({"format_version": "1.0", "manifest": manifest}),
            "requirements.txt": "",
            "src/__init__.py": "",
            "src/main.py": MAIN_PY + "\n" + SUB_AGENTS_PY,
        },
    )


def _hand_zipped(path: Path) -> Path:
    """Hand-made: flat main.py, top-level version and exports, no kit-required fields."""
    doc = "name: hand-agent\nversion: '0.3.0'\nexports:\n"
    doc += "  - {name: alpha, type: function, handler: main.alpha}\n"
    doc += "  - {name: beta, type: function, handler: main.beta}\n"
    return make_apkg(path, {"agent.yaml": doc, "main.py": SUB_AGENTS_PY})


@pytest.mark.parametrize("how", ["load", "upload"])
def test_other_producers_load_and_run(clean: Server, tmp_path: Path, how: str) -> None:
    srv = clean
    old = _old_kit(tmp_path / "old-kit-agent-0.0.9.apkg")
    assert_loaded(send(srv.client, how, old), "old-kit-agent@0.0.9", ["alpha", "beta"], "installed")
    agents = {
        a["name"]: a
        for a in srv.client.get("/runtime/agents").json()["agents"]
        if a["package_id"] == "old-kit-agent@0.0.9"
    }
    assert agents["alpha"]["private"] is False and agents["beta"]["private"] is True
    beta = srv.client.get("/runtime/agents/old-kit-agent@0.0.9/beta").json()
    assert beta["handler"] == "src.main:handler" and beta["endpoint"] == "/beta"
    assert invoke_output(srv.client, "old-kit-agent@0.0.9/alpha", {}) == {"a": 1}

    hand = _hand_zipped(tmp_path / "hand-agent-0.3.0.apkg")
    assert_loaded(send(srv.client, how, hand), "hand-agent@0.3.0", ["alpha", "beta"], "installed")
    detail = srv.client.get("/runtime/packages/hand-agent@0.3.0").json()
    assert detail["manifest"]["producer"] == "hand-made"
    assert detail["manifest"]["display_name"] == "hand-agent"
    alpha = srv.client.get("/runtime/agents/hand-agent@0.3.0/alpha").json()
    assert alpha["handler"] == "main:alpha"
    assert invoke_output(srv.client, "hand-agent@0.3.0/beta", {}) == {"b": 2}
    assert_no_work_left(srv)


# The original runtime's own test packages (its supervisor tests zipped them by hand): runtime
# as a mapping, top-level exports with dotted handlers, a flat agent.py, an async handler.
ORIGINAL_AGENT_YAML = """
name: original-agent
version: 1.0.0
description: Test agent for Multi-PAR
runtime:
  python: ">=3.8"
exports:
  - name: hello
    type: function
    handler: agent.hello
  - name: shout
    type: function
    handler: "agent:shout"
  - name: reverse
    handler: tools.text.reverse
"""
ORIGINAL_AGENT_PY = """
async def hello(request):
    return {"message": "Hello from test agent!", "request": request}


def shout(request):
    return {"shout": request["text"].upper()}
"""
ORIGINAL_TOOLS_PY = "def reverse(request):\n    return {'reversed': request['text'][::-1]}\n"


def _original_runtime(path: Path, manifest: str = ORIGINAL_AGENT_YAML) -> Path:
    return make_apkg(
        path,
        {
            "agent.yaml": manifest,
            "agent.py": ORIGINAL_AGENT_PY,
            "tools/__init__.py": "",
            "tools/text.py": ORIGINAL_TOOLS_PY,
        },
    )


@pytest.mark.parametrize("how", ["load", "upload"])
def test_original_runtime_packages_load_and_run(clean: Server, tmp_path: Path, how: str) -> None:
    srv = clean
    apkg = _original_runtime(tmp_path / "original-agent-1.0.0.apkg")
    body = assert_loaded(
        send(srv.client, how, apkg),
        "original-agent@1.0.0",
        ["hello", "shout", "reverse"],
        "installed",
    )
    assert body["warnings"] == []
    manifest = srv.client.get("/runtime/packages/original-agent@1.0.0").json()["manifest"]
    assert manifest["runtime"] == "python>=3.8"
    assert manifest["producer"] == "hand-made"
    assert {e["name"]: (e["kind"], e["handler"]) for e in manifest["exports"]} == {
        "hello": ("handler", "agent:hello"),
        "shout": ("handler", "agent:shout"),
        "reverse": ("handler", "tools.text:reverse"),
    }
    request = {"text": "Ada", "session_id": "original"}
    assert invoke_output(srv.client, "original-agent@1.0.0/hello", request) == {
        "message": "Hello from test agent!",
        "request": request,
    }
    assert invoke_output(srv.client, "original-agent@1.0.0/shout", request) == {"shout": "ADA"}
    assert invoke_output(srv.client, "original-agent@1.0.0/reverse", request) == {"reversed": "adA"}
    assert_no_work_left(srv)


def test_runtime_mapping_with_other_languages_loads_with_a_warning(
    clean: Server, tmp_path: Path
) -> None:
    doc = "name: polyglot-agent\nversion: 1.0.0\nruntime: {python: '3.11', node: '18'}\n"
    doc += "exports:\n  - {name: shout, type: function, handler: agent.shout}\n"
    body = assert_loaded(
        clean.client.load(_original_runtime(tmp_path / "polyglot.apkg", doc)),
        "polyglot-agent@1.0.0",
        ["shout"],
        "installed",
    )
    assert body["warnings"] == ["runtime entries other than python ignored: node"]
    detail = clean.client.get("/runtime/packages/polyglot-agent@1.0.0").json()
    assert detail["manifest"]["runtime"] == "python3.11"
    assert detail["warnings"] == body["warnings"]


def test_neither_cli_builds_the_original_runtime_manifest(
    kit_cli: Path, sdk_cli: Path, tmp_path: Path
) -> None:
    """Why the original runtime's packages are hand-zipped here: no producer accepts them."""
    project = tmp_path / "original-agent"
    project.mkdir()
    (project / "agent.yaml").write_text(ORIGINAL_AGENT_YAML)
    (project / "agent.py").write_text(ORIGINAL_AGENT_PY)
    (project / ".env").touch()
    for cli in (kit_cli, sdk_cli):
        proc = subprocess.run(
            [str(cli), "build", "-p", str(project), "-o", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=120,
            env=_cli_env(tmp_path / "home"),
        )
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1, said
        assert "runtime - Input should be a valid string" in said, said
        assert "exports - Extra inputs are not permitted" in said, said
    assert not (tmp_path / "out").exists()


# ---- refusals ----------------------------------------------------------------------------------


def _zip_with(path: Path, files: dict[str, str | bytes], infos: list[zipfile.ZipInfo]) -> Path:
    return make_apkg(path, files, infos=infos)


def _duplicate(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is the point
        zf.writestr("agent.yaml", manifest_yaml("dup-agent"))
        zf.writestr("main.py", MAIN_PY)
        zf.writestr("main.py", "import os\n")
    return path


def _tar_gz(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in {"agent.yaml": manifest_yaml("tar-agent"), "main.py": MAIN_PY}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _flag_bit_5(path: Path) -> Path:
    """A central-directory entry flagged "compressed patched data", which zipfile cannot read."""
    tiny(path, "patched-agent")
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last central entry: main.py
    flags = struct.unpack_from("<H", data, at + 8)[0]
    struct.pack_into("<H", data, at + 8, flags | 0x20)
    path.write_bytes(bytes(data))
    return path


def _bad_local_name(path: Path) -> Path:
    """A local header flagged UTF-8 whose name bytes are not UTF-8 (the central one is)."""
    make_apkg(
        path, {"agent.yaml": manifest_yaml("local-agent"), "main.py": MAIN_PY, "caf\xe9.py": "x"}
    )
    data = bytearray(path.read_bytes())
    at = data.find("caf\xe9".encode())  # the first occurrence is the local header's
    data[at + 3 : at + 5] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    return path


_GOOD = {"agent.yaml": manifest_yaml("bad-agent"), "main.py": MAIN_PY}

REFUSALS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "not-a-zip": (lambda p: (p.write_bytes(b"hello, not a zip at all\n"), p)[1], ("not a ZIP",)),
    "empty-file": (lambda p: (p.write_bytes(b""), p)[1], ("not a ZIP", "empty")),
    "tar-gz": (_tar_gz, ("not a ZIP", "tar.gz")),
    "absolute-entry": (
        lambda p: _zip_with(p, {**_GOOD, "/etc/evil.py": "x"}, []),
        ("/etc/evil.py", "absolute"),
    ),
    "dotdot-entry": (
        lambda p: _zip_with(p, {**_GOOD, "src/../../evil.py": "x"}, []),
        ("src/../../evil.py", "'..'"),
    ),
    "backslash-entry": (
        lambda p: _zip_with(p, {**_GOOD, "src\\evil.py": "x"}, []),
        ("evil.py", "backslash"),
    ),
    "symlink-entry": (
        lambda p: _zip_with(p, _GOOD, [unix_info("link.py", 0o120777)]),
        ("link.py", "symbolic link"),
    ),
    "fifo-entry": (
        lambda p: _zip_with(p, _GOOD, [unix_info("pipe", stat.S_IFIFO | 0o644)]),
        ("pipe", "special file"),
    ),
    "chardev-entry": (
        lambda p: _zip_with(p, _GOOD, [unix_info("dev/zero", stat.S_IFCHR | 0o644)]),
        ("dev/zero", "special file"),
    ),
    "duplicate-entry": (_duplicate, ("duplicate", "main.py")),
    "long-entry-name": (
        lambda p: _zip_with(p, {**_GOOD, "x" * 300 + ".py": "x"}, []),
        ("x" * 300, "too long"),
    ),
    "long-entry-path": (
        lambda p: _zip_with(p, {**_GOOD, "/".join(["d" * 250] * 5) + ".py": "x"}, []),
        ("d" * 80, "name too long"),
    ),
    "patched-data-flag": (_flag_bit_5, ("main.py",)),
    "bad-local-header-name": (_bad_local_name, ("corrupt ZIP",)),
    "missing-agent-yaml": (
        lambda p: _zip_with(p, {"main.py": MAIN_PY, "sub/agent.yaml": _GOOD["agent.yaml"]}, []),
        ("agent.yaml", "missing"),
    ),
    "non-utf8-yaml": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": b"name: caf\xe9\n"}, []),
        ("agent.yaml", "UTF-8"),
    ),
    "yaml-list": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": "- name: x\n- version: 1\n"}, []),
        ("agent.yaml", "mapping", "list"),
    ),
    "yaml-unparsable": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": "name: [unclosed\nversion: {\n"}, []),
        ("agent.yaml", "parse"),
    ),
    "yaml-python-tag": (
        lambda p: _zip_with(
            p,
            {**_GOOD, "agent.yaml": "name: !!python/object/apply:os.system ['touch /tmp/x']\n"},
            [],
        ),
        ("agent.yaml", "python/object"),
    ),
    "name-dotdot": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": manifest_yaml("../x")}, []),
        ("name", "'../x'"),
    ),
    "name-absolute": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": manifest_yaml("/x")}, []),
        ("name", "'/x'"),
    ),
    "version-dotdot": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": manifest_yaml(version="../../x")}, []),
        ("version", "'../../x'"),
    ),
    "runtime-node": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": manifest_yaml(runtime="node18")}, []),
        ("node18", "only Python agents run here"),
    ),
    "entrypoint-module-missing": (
        lambda p: _zip_with(
            p, {**_GOOD, "agent.yaml": manifest_yaml(entrypoint="agent_code.main:handler")}, []
        ),
        ("entrypoint", "agent_code.main", "missing"),
    ),
    "sub-agent-module-missing": (
        lambda p: _zip_with(
            p,
            {
                **_GOOD,
                "agent.yaml": manifest_yaml(
                    metadata={
                        "version": "0.1.0",
                        "sub_agents": [
                            {"name": "ok", "endpoint": "main:handler"},
                            {"name": "gone", "endpoint": "helpers.tools:run"},
                        ],
                    }
                ),
            },
            [],
        ),
        ("metadata.sub_agents[1]", "helpers.tools", "missing"),
    ),
    # The original runtime's forms, wrong: a non-Python runtime mapping, a runtime of another
    # shape, an export type other than function, a dotted handler whose module is missing.
    "runtime-mapping-node": (
        lambda p: _original_runtime(
            p, ORIGINAL_AGENT_YAML.replace('python: ">=3.8"', 'node: "18"')
        ),
        ("runtime", "node", "only Python agents run here"),
    ),
    "runtime-list": (
        lambda p: _zip_with(p, {**_GOOD, "agent.yaml": manifest_yaml(runtime=["python"])}, []),
        ("runtime", "a string (python3.11) or a mapping", "list"),
    ),
    "runtime-mapping-bad-version": (
        lambda p: _zip_with(
            p, {**_GOOD, "agent.yaml": manifest_yaml(runtime={"python": [3, 8]})}, []
        ),
        ("runtime.python", "'>=3.8'", "list"),
    ),
    "export-type-class": (
        lambda p: _original_runtime(
            p,
            ORIGINAL_AGENT_YAML.replace(
                "type: function\n    handler: agent.hello", "type: class\n    handler: agent.hello"
            ),
        ),
        ("exports[0].type", "'class'", "only 'function'"),
    ),
    "export-dotted-module-missing": (
        lambda p: _original_runtime(
            p, ORIGINAL_AGENT_YAML.replace("tools.text.reverse", "tools.missing.reverse")
        ),
        ("exports[2].handler", "tools.missing", "tools/missing.py", "missing"),
    ),
}


# The stable machine code of each refusal (the envelope's ``code``), by what it refuses.
REFUSAL_CODES: dict[str, str] = {
    **dict.fromkeys(["not-a-zip", "empty-file", "tar-gz", "bad-local-header-name"], "not_a_zip"),
    **dict.fromkeys(
        [
            "absolute-entry",
            "dotdot-entry",
            "backslash-entry",
            "symlink-entry",
            "fifo-entry",
            "chardev-entry",
            "long-entry-name",
            "long-entry-path",
            "patched-data-flag",
        ],
        "unsafe_entry",
    ),
    "duplicate-entry": "duplicate_entry",
    "missing-agent-yaml": "missing_manifest",
    **dict.fromkeys(
        [
            "non-utf8-yaml",
            "yaml-list",
            "yaml-unparsable",
            "yaml-python-tag",
            "name-dotdot",
            "name-absolute",
            "version-dotdot",
            "runtime-list",
            "runtime-mapping-bad-version",
        ],
        "invalid_manifest",
    ),
    **dict.fromkeys(["runtime-node", "runtime-mapping-node"], "unsupported_runtime"),
    "export-type-class": "unsupported_export",
    **dict.fromkeys(
        ["entrypoint-module-missing", "sub-agent-module-missing", "export-dotted-module-missing"],
        "missing_module",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_answer_400_and_leave_nothing(srv: Server, tmp_path: Path, case: str) -> None:
    build, needles = REFUSALS[case]
    apkg = build(tmp_path / f"{case}.apkg")
    assert_refused(srv, apkg, needles, code=REFUSAL_CODES[case])


def test_every_refusal_has_its_code() -> None:
    assert sorted(REFUSAL_CODES) == sorted(REFUSALS)


def test_unsafe_names_write_nothing_outside_the_store(srv: Server, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    outside = [
        srv.state_dir.parent / f"esc-{tag}",
        srv.state_dir / f"esc-{tag}",
        Path("/") / f"esc-{tag}",
        Path("/") / f"esc-{tag}@0.1.0",
        store_dir(srv) / f"esc-{tag}@0.1.0",
    ]
    for name in (f"../esc-{tag}", f"../../esc-{tag}", f"/esc-{tag}"):
        apkg = tiny(tmp_path / f"{uuid.uuid4().hex}.apkg", name)
        assert_refused(srv, apkg, ("name", repr(name)))
    apkg = tiny(tmp_path / "v.apkg", f"v-{tag}", version=f"../../esc-{tag}")
    assert_refused(srv, apkg, ("version",))
    for path in outside:
        assert not os.path.lexists(path), path


def test_digests_are_checked(srv: Server, tmp_path: Path) -> None:
    apkg = tiny(tmp_path / "digest-agent-0.1.0.apkg", "digest-agent")
    actual = sha256_of(apkg)
    wrong = hashlib.sha256(b"something else").hexdigest()

    # A wrong digest in the request field, by path and by upload.
    assert_refused(srv, apkg, ("mismatch", wrong, actual), code="digest_mismatch", sha256=wrong)
    # An invalid digest value.
    for bad in ("abc", "g" * 64, actual + "00"):
        assert_refused(srv, apkg, ("sha256", "64 hexadecimal"), code="invalid_digest", sha256=bad)
    # A wrong digest in a sha256sum-format sidecar, beside the file (load by path).
    sidecar = apkg.with_name(apkg.name + ".sha256")
    sidecar.write_text(f"{wrong}  {apkg.name}\n")
    assert_refused(
        srv, apkg, (sidecar.name, "mismatch", wrong), code="digest_mismatch", how=("load",)
    )
    # Even a right request field does not override a wrong sidecar.
    assert_refused(srv, apkg, ("mismatch",), how=("load",), sha256=actual)

    # Matching digests succeed: sidecar, then request field (load and upload).
    sidecar.write_text(f"{actual.upper()} *{apkg.name}\n")
    assert_loaded(srv.client.load(apkg), "digest-agent@0.1.0", ["default"], "installed")
    sidecar.unlink()
    assert srv.client.delete("/runtime/packages/digest-agent@0.1.0").status == 200
    assert_loaded(
        srv.client.load(apkg, sha256=f"sha256:{actual}"),
        "digest-agent@0.1.0",
        ["default"],
        "installed",
    )
    assert srv.client.delete("/runtime/packages/digest-agent@0.1.0").status == 200
    resp = srv.client.upload("/runtime/packages/upload", apkg, {"sha256": actual})
    assert assert_loaded(resp, "digest-agent@0.1.0", ["default"], "installed")["sha256"] == actual
    assert_no_work_left(srv)


def test_file_not_found_and_directory_are_refused(srv: Server, tmp_path: Path) -> None:
    before = srv.client.get("/runtime/packages").json()
    for path, needle in (
        (tmp_path / "nope.apkg", "file not found"),
        (tmp_path, "not a regular file"),
    ):
        resp = srv.client.load(path)
        assert resp.status == 400, resp
        body = resp.json()
        assert body["error"] == "PackageError" and body["code"] == "file_not_found", body
        assert needle in body["message"] and str(path) in body["message"], body
    assert srv.client.get("/runtime/packages").json() == before


# ---- limits ------------------------------------------------------------------------------------


def _low_entropy(n: int) -> bytes:
    """Bytes that deflate about 6:1: above a cap of 3, far below the default 200."""
    return bytes(97 + (b & 1) for b in os.urandom(n))


LIMIT_CASES: dict[str, tuple[dict[str, str | bytes], tuple[str, ...], str]] = {
    "too-many-entries": (
        {**_GOOD, **{f"f{i}.txt": "x" for i in range(5)}},
        ("too many entries", "7", "limit is 6"),
        "archive_too_large",
    ),
    "entry-too-big": (
        {**_GOOD, "big.bin": os.urandom(2_100_000)},
        ("big.bin", "too large", "2000000"),
        "archive_too_large",
    ),
    "total-too-big": (
        {**_GOOD, "b1.bin": os.urandom(1_600_000), "b2.bin": os.urandom(1_600_000)},
        ("archive too large", "3000000", "b2.bin"),
        "archive_too_large",
    ),
    "ratio": (
        {**_GOOD, "data.txt": _low_entropy(1_500_000)},
        ("data.txt", "compression ratio", "limit is 3:1"),
        "zip_bomb",
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits_from_the_environment(
    small_srv: Server, srv: Server, tmp_path: Path, case: str
) -> None:
    files, needles, code = LIMIT_CASES[case]
    apkg = make_apkg(tmp_path / f"{case}.apkg", files)
    assert_refused(small_srv, apkg, needles, code=code)
    # The same archive is fine under the default limits: the caps came from the environment.
    name = f"limit-{case}"
    ok = make_apkg(tmp_path / f"{name}.apkg", {**files, "agent.yaml": manifest_yaml(name)})
    assert_loaded(srv.client.load(ok), f"{name}@0.1.0", ["default"], "installed")


def test_small_limits_still_accept_a_small_package(small_srv: Server, tmp_path: Path) -> None:
    assert_loaded(
        small_srv.client.load(tiny(tmp_path / "ok.apkg", "small-ok")),
        "small-ok@0.1.0",
        ["default"],
        "installed",
    )


def test_zip_bomb_is_refused_under_default_limits(srv: Server, tmp_path: Path) -> None:
    apkg = make_apkg(tmp_path / "bomb.apkg", {**_GOOD, "zeros.bin": bytes(5 * 1024 * 1024)})
    assert apkg.stat().st_size < 50_000  # a real bomb: megabytes from a few kilobytes
    assert_refused(srv, apkg, ("zeros.bin", "zip bomb", "200:1"), code="zip_bomb")


# ---- replace, unload, concurrency --------------------------------------------------------------


def _variant(path: Path, export: str, name: str = "swap-agent") -> Path:
    doc = manifest_yaml(name, exports=[{"name": export, "handler": f"main.{export}"}])
    return make_apkg(path, {"agent.yaml": doc, "main.py": SUB_AGENTS_PY})


def test_same_bytes_unchanged_other_bytes_replace(srv: Server, tmp_path: Path) -> None:
    a = _variant(tmp_path / "a.apkg", "alpha")
    b = _variant(tmp_path / "b.apkg", "beta")
    first = assert_loaded(srv.client.load(a), "swap-agent@0.1.0", ["alpha"], "installed")
    loaded_at = srv.client.get("/runtime/packages/swap-agent@0.1.0").json()["loaded_at"]

    again = assert_loaded(
        srv.client.upload("/runtime/packages/upload", a), "swap-agent@0.1.0", ["alpha"], "unchanged"
    )
    assert again["sha256"] == first["sha256"]
    pkg = srv.client.get("/runtime/packages/swap-agent@0.1.0").json()
    assert pkg["loaded_at"] == loaded_at and pkg["source"] == f"path:{a}"

    replaced = assert_loaded(srv.client.load(b), "swap-agent@0.1.0", ["beta"], "replaced")
    assert replaced["sha256"] == sha256_of(b) != first["sha256"]
    pkg = srv.client.get("/runtime/packages/swap-agent@0.1.0").json()
    assert pkg["sha256"] == sha256_of(b) and pkg["agents"] == ["swap-agent@0.1.0/beta"]
    ids = {a["id"] for a in srv.client.get("/runtime/agents").json()["agents"]}
    assert "swap-agent@0.1.0/beta" in ids and "swap-agent@0.1.0/alpha" not in ids
    gone = srv.client.get("/runtime/agents/swap-agent@0.1.0/alpha")
    assert gone.status == 404, gone
    assert gone.json()["message"] == "Agent not found: swap-agent@0.1.0/alpha"
    # The old object is gone from the store, the new one is published.
    objects = store_dir(srv) / "objects"
    assert not (objects / first["sha256"]).exists()
    assert (objects / replaced["sha256"] / "pkg" / "agent.yaml").is_file()
    assert_no_work_left(srv)


def test_unload(srv: Server, tmp_path: Path) -> None:
    apkg = tiny(tmp_path / "gone.apkg", "gone-agent")
    body = assert_loaded(srv.client.load(apkg), "gone-agent@0.1.0", ["default"], "installed")
    agent = srv.client.get("/runtime/agents/gone-agent@0.1.0/default")
    assert agent.status == 200, agent
    assert agent.json()["id"] == "gone-agent@0.1.0/default"

    resp = srv.client.delete("/runtime/packages/gone-agent@0.1.0")
    assert resp.status == 200, resp
    assert resp.json()["package_id"] == "gone-agent@0.1.0"
    resp = srv.client.get("/runtime/packages/gone-agent@0.1.0")
    assert resp.status == 404 and resp.json()["message"] == "Package not found: gone-agent@0.1.0"
    ids = {a["id"] for a in srv.client.get("/runtime/agents").json()["agents"]}
    assert "gone-agent@0.1.0/default" not in ids
    listed = {p["id"] for p in srv.client.get("/runtime/packages").json()["packages"]}
    assert "gone-agent@0.1.0" not in listed
    agent = srv.client.get("/runtime/agents/gone-agent@0.1.0/default")
    assert agent.status == 404 and agent.json()["message"].startswith("Agent not found")
    assert not (store_dir(srv) / "objects" / body["sha256"]).exists()
    assert not os.path.lexists(store_dir(srv) / "ids" / "gone-agent@0.1.0")
    again = srv.client.delete("/runtime/packages/gone-agent@0.1.0")
    assert again.status == 404, again
    assert again.json()["message"] == "Package not found: gone-agent@0.1.0"
    # It can be loaded again afterwards.
    assert_loaded(srv.client.load(apkg), "gone-agent@0.1.0", ["default"], "installed")


def test_concurrent_uploads_of_one_id(srv: Server, tmp_path: Path) -> None:
    name = "race-agent"
    variants = {
        "alpha": _variant(tmp_path / "alpha.apkg", "alpha", name),
        "beta": _variant(tmp_path / "beta.apkg", "beta", name),
    }
    digests = {sha256_of(p): export for export, p in variants.items()}
    objects = store_dir(srv) / "objects"
    assert_absent(srv, f"{name}@0.1.0")
    for round_ in range(3):
        barrier = threading.Barrier(8)
        answers: list[tuple[Path, Any]] = []

        def upload(
            i: int, barrier: threading.Barrier = barrier, answers: list[Any] = answers
        ) -> None:
            path = variants["alpha" if i % 2 else "beta"]
            barrier.wait()
            answers.append((path, srv.client.upload("/runtime/packages/upload", path)))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 8
        for path, resp in answers:
            assert resp.status == 200, resp
            assert resp.json()["sha256"] == sha256_of(path)
        # Uploads of one id are applied one at a time: only the very first one installs, each
        # later one replaces the other variant or finds its own bytes already there.
        results = sorted(resp.json()["result"] for _, resp in answers)
        # Four of the eight carry the other variant's bytes: at least one of them replaces.
        assert results.count("installed") == (1 if round_ == 0 else 0), results
        assert results.count("replaced") >= 1, results
        assert set(results) <= {"installed", "replaced", "unchanged"}, results

        pkg = srv.client.get(f"/runtime/packages/{name}@0.1.0").json()
        assert pkg["sha256"] in digests
        export = digests[pkg["sha256"]]
        assert pkg["agents"] == [f"{name}@0.1.0/{export}"]
        agents = [
            a["name"]
            for a in srv.client.get("/runtime/agents").json()["agents"]
            if a["package_id"] == f"{name}@0.1.0"
        ]
        assert agents == [export]
        present = [d for d in digests if (objects / d).exists()]
        assert present == [pkg["sha256"]]
        obj = objects / pkg["sha256"]
        other = "beta" if export == "alpha" else "alpha"
        manifest = (obj / "pkg" / "agent.yaml").read_text()
        assert f"main.{export}" in manifest and f"main.{other}" not in manifest
        assert json.loads((obj / "record.json").read_text())["sha256"] == pkg["sha256"]
        link = os.readlink(store_dir(srv) / "ids" / f"{name}@0.1.0")
        assert link == f"../objects/{pkg['sha256']}"
        assert_no_work_left(srv)


# ---- start-up: restart, --packages-dir, --examples ----------------------------------------------


def test_restart_keeps_packages(server_factory: Any, tmp_path: Path) -> None:
    first = server_factory()
    client = first.client
    assert_loaded(
        client.load(tiny(tmp_path / "keep.apkg", "keep-agent")),
        "keep-agent@0.1.0",
        ["default"],
        "installed",
    )
    assert_loaded(
        client.upload("/runtime/packages/upload", _hand_zipped(tmp_path / "h.apkg")),
        "hand-agent@0.3.0",
        ["alpha", "beta"],
        "installed",
    )
    assert_loaded(
        client.load(tiny(tmp_path / "drop.apkg", "drop-agent")),
        "drop-agent@0.1.0",
        ["default"],
        "installed",
    )
    dropped = client.delete("/runtime/packages/drop-agent@0.1.0")
    assert dropped.status == 200, dropped
    assert dropped.json()["package_id"] == "drop-agent@0.1.0"
    packages = client.get("/runtime/packages").json()
    agents = client.get("/runtime/agents").json()
    detail = client.get("/runtime/packages/hand-agent@0.3.0").json()
    assert [p["id"] for p in packages["packages"]] == ["hand-agent@0.3.0", "keep-agent@0.1.0"]
    assert first.stop() == 0

    second = server_factory(state_dir=first.state_dir)
    assert second.port != first.port
    assert second.client.get("/runtime/packages").json() == packages
    assert second.client.get("/runtime/agents").json() == agents
    assert second.client.get("/runtime/packages/hand-agent@0.3.0").json() == detail
    assert_absent(second, "drop-agent@0.1.0")
    info = second.client.get("/runtime/info").json()
    assert info["packages_loaded"] == 2 and info["agents_mounted"] == 3
    # The restored digest is the one compared: the same bytes are still a no-op.
    again = second.client.load(tmp_path / "keep.apkg")
    restored = assert_loaded(again, "keep-agent@0.1.0", ["default"], "unchanged")
    assert restored["sha256"] == sha256_of(tmp_path / "keep.apkg")


def test_packages_dir_loads_good_and_skips_bad(server_factory: Any, tmp_path: Path) -> None:
    folder = tmp_path / "drop-in"
    folder.mkdir()
    good = tiny(folder / "a-good-0.1.0.apkg", "dir-good")
    _hand_zipped(folder / "b-hand.apkg")
    (folder / "c-bad.apkg").write_bytes(b"not a zip")
    tiny(folder / "d-evil.apkg", "../evil")
    _flag_bit_5(folder / "e-patched.apkg")
    _bad_local_name(folder / "e-badname.apkg")
    mismatched = tiny(folder / "f-sidecar.apkg", "dir-sidecar")
    (folder / "f-sidecar.apkg.sha256").write_text("0" * 64 + f"  {mismatched.name}\n")
    (folder / "g-ignored.zip").write_bytes(good.read_bytes())  # only *.apkg are loaded

    server = server_factory(["--packages-dir", str(folder)])
    listed = {p["id"]: p for p in server.client.get("/runtime/packages").json()["packages"]}
    assert sorted(listed) == ["dir-good@0.1.0", "hand-agent@0.3.0"]
    assert listed["dir-good@0.1.0"]["sha256"] == sha256_of(good)
    assert listed["dir-good@0.1.0"]["source"].endswith(str(good))
    logs = server.logs()
    for bad in ("c-bad.apkg", "d-evil.apkg", "e-patched.apkg", "e-badname.apkg", "f-sidecar.apkg"):
        assert f"skipping {folder / bad}" in logs, bad
    assert not (tmp_path / "evil").exists() and not (tmp_path / "state" / "evil").exists()
    assert_no_work_left(server)


def test_examples_flag_loads_both_examples(server_factory: Any) -> None:
    server = server_factory(["--examples"])
    packages = server.client.get("/runtime/packages").json()["packages"]
    assert sorted(p["id"] for p in packages) == ["hello-handler@0.1.0", "pixell-python-agent@0.1.0"]
    agents = {a["id"]: a for a in server.client.get("/runtime/agents").json()["agents"]}
    assert sorted(agents) == sorted(
        [
            "hello-handler@0.1.0/greet",
            "hello-handler@0.1.0/count",
            "hello-handler@0.1.0/echo-async",
            "pixell-python-agent@0.1.0/code-executor",
            "pixell-python-agent@0.1.0/stream-executor",
            "pixell-python-agent@0.1.0/data-analyzer",
            "pixell-python-agent@0.1.0/ml-runner",
        ]
    )
    assert agents["pixell-python-agent@0.1.0/ml-runner"]["private"] is True
    info = server.client.get("/runtime/info").json()
    assert info["packages_loaded"] == 2 and info["agents_mounted"] == 7
