"""Tests for the reproducible APKG builder and the example agents (also built with the real kit)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from pixell_kernel_runtime.bundled import examples_dir
from pixell_kernel_runtime.packages.builder import build_apkg, main

EXAMPLES = examples_dir()
HELLO = EXAMPLES / "hello-handler"
PYAGENT = EXAMPLES / "pixell-python-agent"

EXPECTED = {
    HELLO: "hello-handler-0.1.0.apkg",
    PYAGENT: "pixell-python-agent-0.1.0.apkg",
}


def _write_manifest(root: Path, manifest: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "agent.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")


@pytest.mark.parametrize("src", [HELLO, PYAGENT], ids=lambda p: p.name)
def test_examples_build_reproducibly(src: Path, tmp_path: Path) -> None:
    first = build_apkg(src, tmp_path / "a")
    second = build_apkg(src, tmp_path / "b")

    assert first.name == EXPECTED[src]
    assert second.name == EXPECTED[src]
    assert first.read_bytes() == second.read_bytes()
    # Only the finished archive is left behind (the temporary file was renamed into place).
    assert sorted(p.name for p in first.parent.iterdir()) == [EXPECTED[src]]

    with zipfile.ZipFile(first) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        infos = zf.infolist()
    assert "agent.yaml" in names  # at the archive root, no top-level folder
    assert {".env", "requirements.txt", "README.md", "src/__init__.py", "src/main.py"} <= set(names)
    assert names == sorted(names)
    assert not any(n.endswith("/") for n in names)  # no directory entries
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.external_attr >> 16 == stat.S_IFREG | 0o644


def test_example_manifests_match_the_seed_and_brief() -> None:
    py = yaml.safe_load((PYAGENT / "agent.yaml").read_text(encoding="utf-8"))
    assert py["name"] == "pixell-python-agent"
    assert py["version"] == "1.0"
    assert py["metadata"]["version"] == "0.1.0"
    assert "code-execution" in py["capabilities"]
    subs = {s["name"]: s for s in py["metadata"]["sub_agents"]}
    assert list(subs) == ["code-executor", "stream-executor", "data-analyzer", "ml-runner"]
    assert [s["public"] for s in subs.values()] == [True, True, True, False]
    assert subs["code-executor"]["endpoint"] == "/execute"

    hello = yaml.safe_load((HELLO / "agent.yaml").read_text(encoding="utf-8"))
    assert hello["name"] == "hello-handler"
    assert hello["metadata"]["version"] == "0.1.0"
    endpoints = {s["name"]: s["endpoint"] for s in hello["metadata"]["sub_agents"]}
    assert endpoints == {
        "greet": "src.main:greet",
        "count": "src.main:count",
        "echo-async": "src.main:echo_async",
    }
    assert all(s["public"] is True for s in hello["metadata"]["sub_agents"])


def test_skips_symlinks_pycache_and_junk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src-tree"
    _write_manifest(src, {"name": "junk-test", "metadata": {"version": "1.2.3"}})
    (src / "src").mkdir()
    (src / "src" / "main.py").write_text("def handler(d):\n    return d\n", encoding="utf-8")
    (src / "src" / "__pycache__").mkdir()
    (src / "src" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0pyc")
    (src / "stray.pyc").write_bytes(b"\0pyc")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    (src / ".venv" / "lib").mkdir(parents=True)
    (src / ".venv" / "lib" / "x.py").write_text("", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not package me", encoding="utf-8")
    os.symlink(outside / "secret.txt", src / "link.txt")
    os.symlink(outside, src / "linkdir", target_is_directory=True)

    with caplog.at_level(logging.WARNING, logger="pixell_kernel_runtime.packages.builder"):
        out = build_apkg(src, tmp_path / "out")

    assert out.name == "junk-test-1.2.3.apkg"
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert b"do not package me" not in b"".join(zf.read(n) for n in names)
    assert names == ["agent.yaml", "src/main.py"]
    warned = caplog.text
    assert "link.txt" in warned and "linkdir" in warned


def test_output_inside_source_is_not_archived(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    _write_manifest(src, {"name": "self-out", "version": "0.0.1"})
    first = build_apkg(src, src)
    data = first.read_bytes()
    second = build_apkg(src, src)
    assert second == first
    assert second.read_bytes() == data
    with zipfile.ZipFile(second) as zf:
        assert zf.namelist() == ["agent.yaml"]


def test_version_falls_back_to_top_level(tmp_path: Path) -> None:
    src = tmp_path / "agent"
    _write_manifest(src, {"name": "hand_made.Agent", "version": "2.0-rc1"})
    assert build_apkg(src, tmp_path / "out").name == "hand_made.Agent-2.0-rc1.apkg"
    # metadata.version wins over the kit's manifest format version.
    _write_manifest(src, {"name": "kit-made", "version": "1.0", "metadata": {"version": "0.3.0"}})
    assert build_apkg(src, tmp_path / "out").name == "kit-made-0.3.0.apkg"


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({"name": "../evil", "version": "1.0"}, "unsafe"),
        ({"name": "a/b", "version": "1.0"}, "unsafe"),
        ({"name": "..", "version": "1.0"}, "unsafe"),
        ({"name": "ok name", "version": "1.0"}, "unsafe"),
        ({"name": "ok", "metadata": {"version": "1.0/../../x"}}, "unsafe"),
        ({"name": "ok", "version": "1.0\n"}, "unsafe"),
        ({"name": "ok", "version": 0.1}, "must be a string"),
        ({"name": "ok"}, "version is missing"),
        ({"version": "1.0"}, "name is missing"),
        ({"name": "", "version": "1.0"}, "name is missing"),
    ],
)
def test_refuses_unsafe_or_missing_name_and_version(
    tmp_path: Path, manifest: dict, message: str
) -> None:
    src = tmp_path / "agent"
    _write_manifest(src, manifest)
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        build_apkg(src, out_dir)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_refuses_missing_or_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        build_apkg(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no agent.yaml"):
        build_apkg(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "agent.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        build_apkg(tmp_path / "list", tmp_path / "out")


def test_cli_builds_and_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    assert main([str(HELLO), str(PYAGENT), "-o", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out_dir / EXPECTED[HELLO]), str(out_dir / EXPECTED[PYAGENT])]
    assert all(Path(p).is_file() for p in printed)

    bad = tmp_path / "bad"
    _write_manifest(bad, {"name": "../x", "version": "1"})
    assert main([str(bad), "-o", str(out_dir)]) == 1
    assert "unsafe" in capsys.readouterr().err


def test_real_pixell_kit_builds_hello_handler(tmp_path: Path) -> None:
    pixell = shutil.which("pixell")
    assert pixell, "the pixell CLI (pixell-kit 0.4.12) must be on PATH"
    project = tmp_path / "hello-handler"
    shutil.copytree(HELLO, project, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out_dir = tmp_path / "kit-out"

    proc = subprocess.run(
        [pixell, "build", "-p", str(project), "-o", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    apkg = out_dir / "hello-handler-0.1.0.apkg"
    assert apkg.is_file(), sorted(p.name for p in out_dir.iterdir())
    with zipfile.ZipFile(apkg) as zf:
        names = zf.namelist()
        manifest = yaml.safe_load(zf.read("agent.yaml"))
    assert "agent.yaml" in names
    assert "src/main.py" in names
    # The kit copies agent.yaml verbatim, so metadata.sub_agents survives in it.
    assert [s["name"] for s in manifest["metadata"]["sub_agents"]] == [
        "greet",
        "count",
        "echo-async",
    ]
