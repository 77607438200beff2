"""The demo notebooks run, top to bottom, with nbclient against a real runtime, and each shows
what it claims: the facts checked below come from the notebook's own outputs."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, _alive, _started, minimal_env, process_tree, wait_for
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _stdout(nb: Any) -> str:
    return "".join(
        o.text
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


def _check_quickstart(nb: Any) -> None:
    out = _stdout(nb)
    # The seed's answer, computed by the server; state kept across two calls of one session.
    assert "The answer is 4\n" in out, out
    assert "state across calls: x + 1 = 42\n" in out, out
    # The APKG came from the real pixell-kit CLI (installed with the test extra).
    assert "built with pixell-kit: my-first-agent-0.1.0.apkg" in out, out


def _check_pandas(nb: Any) -> None:
    pngs = [
        o.data["image/png"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    # The chart the kernel drew, shown in the notebook: one real PNG.
    assert len(pngs) == 1, pngs
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")


def _check_streaming(nb: Any) -> None:
    out = _stdout(nb)
    assert "resumed: no gaps" in out, out


def _check_attach(nb: Any) -> None:
    out = _stdout(nb)
    # The value REST defined, printed by the kernel through a Jupyter client, and back.
    rest = re.search(r"REST defined x = '([0-9a-f]{32})'", out)
    assert rest, out
    assert f"the kernel client printed: {rest.group(1)}\n" in out, out
    assert f"REST sees y = '{rest.group(1).upper()}'" in out, out


CHECKS: dict[str, Callable[[Any], None]] = {
    "01-quickstart.ipynb": _check_quickstart,
    "02-pandas.ipynb": _check_pandas,
    "03-streaming.ipynb": _check_streaming,
    "04-attach.ipynb": _check_attach,
}


def _execute(path: Path, env: dict[str, str], cwd: Path, **hooks: Any) -> Any:
    """Run ``path`` in a fresh local python3 kernel whose environment is exactly ``env``."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}, **hooks
    )
    client.execute(env=env)  # a cell that raises fails the run (allow_errors is off)
    problems = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")
    ]
    assert not problems, problems
    return nb


def test_the_demos_are_there_and_committed_clean() -> None:
    assert [p.name for p in NOTEBOOKS] == sorted(CHECKS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path
        assert all(c.outputs == [] and c.execution_count is None for c in code), path
        assert any(c.cell_type == "markdown" for c in nb.cells), path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, server_factory: Any, tmp_path: Path) -> None:
    srv = server_factory(["--examples"])
    url = f"http://127.0.0.1:{srv.port}"
    env = {**minimal_env(tmp_path / "home"), "PIXELL_RUNTIME_URL": url}
    nb = _execute(path, env, tmp_path)
    # It used the runtime it was given, and did not start one of its own.
    out = _stdout(nb)
    assert f"using the runtime at {url}\n" in out, out
    assert "started a runtime" not in out, out
    CHECKS[path.name](nb)


def test_quickstart_starts_and_stops_its_own_runtime(tmp_path: Path) -> None:
    baseline = process_tree(os.getpid())
    seen: dict[int, str] = {}  # pid -> start time, of every process the run started
    server_trees: list[set[int]] = []

    def snapshot(**_: Any) -> None:
        for pid in process_tree(os.getpid()) - baseline:
            seen.setdefault(pid, _started(pid))
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:  # it ended since process_tree listed it: nothing to look at
                continue
            if b"pixell_kernel_runtime" in cmdline and b"serve" in cmdline:
                server_trees.append(process_tree(pid))

    env = minimal_env(tmp_path / "home")  # no PIXELL_RUNTIME_URL: the notebook starts one
    try:
        nb = _execute(
            REPO / "notebooks" / "01-quickstart.ipynb", env, tmp_path, on_cell_executed=snapshot
        )
    finally:
        # Once the notebook (and its kernel) ended, nothing it started may be left running;
        # what is left is killed here, whatever happened, not leaked into the next tests.
        wait_for(lambda: not _alive(seen), 10.0)
        left = _alive(seen)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    out = _stdout(nb)
    assert re.search(r"started a runtime at http://127\.0\.0\.1:\d+\n", out), out
    assert "stopped the runtime this notebook started (exit code 0)\n" in out, out
    _check_quickstart(nb)
    # The snapshots saw the server and, under it, the sandboxed kernels of the sessions.
    assert server_trees and max(len(t) for t in server_trees) > 1, server_trees
    assert not left, f"processes outlived the notebook: {sorted(left)}"
