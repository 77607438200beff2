"""End-to-end tests of the package store against a real server process (no mocks).

Every archive is sent to ``python -m pixell_kernel_runtime serve`` over HTTP, by path
(``POST /runtime/packages/load``) and by multipart upload (``POST /runtime/packages/upload``).
Archives come from the tests (``make_apkg``), the runtime's own builder, the real ``pixell``
CLI (pixell-kit) and hand-made imitations of the other producers in /work/shared/spec/apkg.md.
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
from conftest import EXAMPLES, Client, Server, make_apkg, manifest_yaml

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


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


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


def assert_loaded(resp: Any, package_id: str, agents: list[str], result: str | None = None) -> dict:
    assert resp.status == 200, resp
    body = resp.json()
    assert body["status"] == "success"
    assert body["package_id"] == package_id
    assert sorted(body["agents"]) == sorted(f"{package_id}/{a}" for a in agents)
    assert len(body["sha256"]) == 64
    if result is not None:
        assert body["result"] == result
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


# ---- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with default limits, shared by the tests of this module that allow it."""
    server = Server(tmp_path_factory.mktemp("pkgsrv") / "state").start()
    yield server
    server.stop()


LIMITS = {
    "APKG_MAX_ENTRIES": "6",
    "APKG_MAX_ENTRY_BYTES": "2000000",
    "APKG_MAX_TOTAL_BYTES": "3000000",
    "APKG_MAX_RATIO": "3",
}


@pytest.fixture(scope="module")
def small_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server started with small archive caps through the environment."""
    server = Server(tmp_path_factory.mktemp("smallsrv") / "state", env=LIMITS).start()
    yield server
    server.stop()


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
    srv: Server, example_apkgs: dict[str, Path], how: str
) -> None:
    srv.client.delete("/runtime/packages/hello-handler@0.1.0")
    srv.client.delete("/runtime/packages/pixell-python-agent@0.1.0")
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


def _kit_build(src: Path, tmp_path: Path) -> Path:
    pixell = shutil.which("pixell")
    assert pixell, "the pixell CLI (pixell-kit 0.4.12, a test dependency) must be on PATH"
    work = tmp_path / "kit" / src.name
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".env").touch()  # the kit refuses to build without one
    out = tmp_path / "kit-out" / src.name
    proc = subprocess.run(
        [pixell, "build", "-p", str(work), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = list(out.glob("*.apkg"))
    assert len(built) == 1, built
    return built[0]


@pytest.mark.parametrize("how", ["load", "upload"])
def test_packages_built_by_the_real_pixell_kit_load(srv: Server, tmp_path: Path, how: str) -> None:
    srv.client.delete("/runtime/packages/hello-handler@0.1.0")
    srv.client.delete("/runtime/packages/pixell-python-agent@0.1.0")
    hello = _kit_build(EXAMPLES / "hello-handler", tmp_path)
    with zipfile.ZipFile(hello) as zf:
        names = set(zf.namelist())
    # What makes it a kit build: its metadata, a generated setup.py, directory entries.
    assert {".pixell/package.json", "setup.py", "agent.yaml", "src/main.py"} <= names
    assert "src/" in names

    body = assert_loaded(
        send(srv.client, how, hello), "hello-handler@0.1.0", ["greet", "count", "echo-async"]
    )
    assert body["sha256"] == sha256_of(hello)
    detail = srv.client.get("/runtime/packages/hello-handler@0.1.0").json()
    assert detail["manifest"]["producer"] == "pixell-kit"
    assert detail["manifest"]["runtime"] == "python3.11"

    pyagent = _kit_build(EXAMPLES / "pixell-python-agent", tmp_path)
    assert_loaded(
        send(srv.client, how, pyagent),
        "pixell-python-agent@0.1.0",
        ["code-executor", "stream-executor", "data-analyzer", "ml-runner"],
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


def _sdk_054(path: Path) -> Path:
    """pixell-sdk 0.5.4: directory entries, surfaces copied to the root, sub_agents lost."""
    manifest = {
        "version": "1.0",
        "name": "sdk-agent",
        "display_name": "SDK Agent",
        "description": "built by pixell-sdk 0.5.4",
        "author": "someone",
        "license": "MIT",
        "entrypoint": "src.main:handler",
        "runtime": "python3.11",
        "capabilities": ["greeting"],
        "environment": {"GREETING": "${GREETING:-hello}"},
        "metadata": {"version": "2.1.0", "author_email": "a@example.com"},
        "rest": {"entry": "src.rest.index:mount"},
        "ui": {"path": "ui", "basePath": "/"},
        "http_server": {"port": 8080},
        "permissions": ["network"],
        "plan_mode": {"enabled": False},
    }
    package_json = {
        "format_version": "1.0",
        "created_by": "pixell-sdk",
        "created_at": "2025-01-01T00:00:00Z",
        "manifest": manifest,
    }
    dirs = ["src/", "src/rest/", ".pixell/", "ui/"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(unix_info(d, stat.S_IFDIR | 0o755), b"")
        for name, data in {
            "agent.yaml": yaml.safe_dump(manifest, sort_keys=True),
            ".pixell/package.json": json.dumps(package_json),
            ".env": "GREETING='hi there'\n# a comment\n",
            "requirements.txt": "",
            "src/__init__.py": "",
            "src/main.py": MAIN_PY,
            "src/rest/__init__.py": "",
            "src/rest/index.py": "def mount(app):\n    pass\n",
            "index.py": "def mount(app):\n    pass\n",  # a surface copied to the root
            "ui/index.html": "<html></html>",
            "index.html": "<html></html>",
        }.items():
            zf.writestr(unix_info(name, stat.S_IFREG | 0o644), data)
    return path


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
def test_other_producers_load(srv: Server, tmp_path: Path, how: str) -> None:
    for pid in ("sdk-agent@2.1.0", "old-kit-agent@0.0.9", "hand-agent@0.3.0"):
        srv.client.delete(f"/runtime/packages/{pid}")

    sdk = _sdk_054(tmp_path / "sdk-agent-2.1.0.apkg")
    assert_loaded(send(srv.client, how, sdk), "sdk-agent@2.1.0", ["default"], "installed")
    detail = srv.client.get("/runtime/packages/sdk-agent@2.1.0").json()
    assert detail["manifest"]["producer"] == "pixell-sdk"
    assert detail["manifest"]["exports"][0]["handler"] == "src.main:handler"
    assert detail["manifest"]["environment_keys"] == ["GREETING"]
    agent = srv.client.get("/runtime/agents/sdk-agent@2.1.0/default").json()
    assert agent["description"] == "built by pixell-sdk 0.5.4"
    assert agent["capabilities"] == ["greeting"]
    assert (store_dir(srv) / "objects" / sha256_of(sdk) / "pkg" / "src" / "rest").is_dir()

    old = _old_kit(tmp_path / "old-kit-agent-0.0.9.apkg")
    assert_loaded(send(srv.client, how, old), "old-kit-agent@0.0.9", ["alpha", "beta"])
    agents = {
        a["name"]: a
        for a in srv.client.get("/runtime/agents").json()["agents"]
        if a["package_id"] == "old-kit-agent@0.0.9"
    }
    assert agents["alpha"]["private"] is False and agents["beta"]["private"] is True
    beta = srv.client.get("/runtime/agents/old-kit-agent@0.0.9/beta").json()
    assert beta["handler"] == "src.main:handler" and beta["endpoint"] == "/beta"

    hand = _hand_zipped(tmp_path / "hand-agent-0.3.0.apkg")
    assert_loaded(send(srv.client, how, hand), "hand-agent@0.3.0", ["alpha", "beta"])
    detail = srv.client.get("/runtime/packages/hand-agent@0.3.0").json()
    assert detail["manifest"]["producer"] == "hand-made"
    assert detail["manifest"]["display_name"] == "hand-agent"
    alpha = srv.client.get("/runtime/agents/hand-agent@0.3.0/alpha").json()
    assert alpha["handler"] == "main:alpha"
    assert_no_work_left(srv)


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
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_answer_400_and_leave_nothing(srv: Server, tmp_path: Path, case: str) -> None:
    build, needles = REFUSALS[case]
    apkg = build(tmp_path / f"{case}.apkg")
    assert_refused(srv, apkg, needles)


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
    srv.client.delete("/runtime/packages/digest-agent@0.1.0")
    assert_loaded(
        srv.client.load(apkg, sha256=f"sha256:{actual}"), "digest-agent@0.1.0", ["default"]
    )
    srv.client.delete("/runtime/packages/digest-agent@0.1.0")
    resp = srv.client.upload("/runtime/packages/upload", apkg, {"sha256": actual})
    assert assert_loaded(resp, "digest-agent@0.1.0", ["default"], "installed")["sha256"] == actual
    assert_no_work_left(srv)


def test_file_not_found_and_directory_are_refused(srv: Server, tmp_path: Path) -> None:
    before = srv.client.get("/runtime/packages").json()
    resp = srv.client.load(tmp_path / "nope.apkg")
    assert resp.status == 400 and "file not found" in resp.json()["message"], resp
    resp = srv.client.load(tmp_path)
    assert resp.status == 400 and "not a regular file" in resp.json()["message"], resp
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
    assert_loaded(srv.client.load(ok), f"{name}@0.1.0", ["default"])


def test_small_limits_still_accept_a_small_package(small_srv: Server, tmp_path: Path) -> None:
    assert_loaded(
        small_srv.client.load(tiny(tmp_path / "ok.apkg", "small-ok")), "small-ok@0.1.0", ["default"]
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
        srv.client.upload("/runtime/packages/upload", a), "swap-agent@0.1.0", ["alpha"]
    )
    assert again["result"] == "unchanged" and again["sha256"] == first["sha256"]
    pkg = srv.client.get("/runtime/packages/swap-agent@0.1.0").json()
    assert pkg["loaded_at"] == loaded_at and pkg["source"] == f"path:{a}"

    replaced = assert_loaded(srv.client.load(b), "swap-agent@0.1.0", ["beta"], "replaced")
    assert replaced["sha256"] == sha256_of(b) != first["sha256"]
    pkg = srv.client.get("/runtime/packages/swap-agent@0.1.0").json()
    assert pkg["sha256"] == sha256_of(b) and pkg["agents"] == ["swap-agent@0.1.0/beta"]
    ids = {a["id"] for a in srv.client.get("/runtime/agents").json()["agents"]}
    assert "swap-agent@0.1.0/beta" in ids and "swap-agent@0.1.0/alpha" not in ids
    assert srv.client.get("/runtime/agents/swap-agent@0.1.0/alpha").status == 404
    # The old object is gone from the store, the new one is published.
    objects = store_dir(srv) / "objects"
    assert not (objects / first["sha256"]).exists()
    assert (objects / replaced["sha256"] / "pkg" / "agent.yaml").is_file()
    assert_no_work_left(srv)


def test_unload(srv: Server, tmp_path: Path) -> None:
    apkg = tiny(tmp_path / "gone.apkg", "gone-agent")
    body = assert_loaded(srv.client.load(apkg), "gone-agent@0.1.0", ["default"])
    assert srv.client.get("/runtime/agents/gone-agent@0.1.0/default").status == 200

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
    assert srv.client.delete("/runtime/packages/gone-agent@0.1.0").status == 404
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
    for _round in range(3):
        barrier = threading.Barrier(8)
        answers: list[Any] = []

        def upload(
            i: int, barrier: threading.Barrier = barrier, answers: list[Any] = answers
        ) -> None:
            path = variants["alpha" if i % 2 else "beta"]
            barrier.wait()
            answers.append(srv.client.upload("/runtime/packages/upload", path))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 8
        for resp in answers:
            assert resp.status == 200, resp
            assert resp.json()["result"] in ("installed", "replaced", "unchanged")
            assert resp.json()["sha256"] in digests

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
        client.load(tiny(tmp_path / "keep.apkg", "keep-agent")), "keep-agent@0.1.0", ["default"]
    )
    assert_loaded(
        client.upload("/runtime/packages/upload", _hand_zipped(tmp_path / "h.apkg")),
        "hand-agent@0.3.0",
        ["alpha", "beta"],
    )
    assert_loaded(
        client.load(tiny(tmp_path / "drop.apkg", "drop-agent")), "drop-agent@0.1.0", ["default"]
    )
    assert client.delete("/runtime/packages/drop-agent@0.1.0").status == 200
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
    assert second.client.get("/runtime/packages/drop-agent@0.1.0").status == 404
    info = second.client.get("/runtime/info").json()
    assert info["packages_loaded"] == 2 and info["agents_mounted"] == 3
    # The restored digest is the one compared: the same bytes are still a no-op.
    again = second.client.load(tmp_path / "keep.apkg")
    assert assert_loaded(again, "keep-agent@0.1.0", ["default"])["result"] == "unchanged"


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
