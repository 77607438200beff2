"""The runtime as users install it: the built wheel, in a fresh venv, run from elsewhere.

The wheel is built from a copy of the source tree, installed into a new venv together with its
own declared dependencies (from the package index, not from this interpreter's site-packages),
and its console script serves from an unrelated directory with a fresh state dir and a minimal
environment. Nothing of the checkout is on its path: if the package forgot a file it needs, this
is where it shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import REPO, Client, free_port, make_apkg, manifest_yaml

from pixell_kernel_runtime import __version__

CODE = "pixell-python-agent@0.1.0/code-executor"
GREET = "hello-handler@0.1.0/greet"
# Never copied into the build tree: VCS state, local venvs, earlier build output, caches.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
pytestmark = pytest.mark.timeout(1200)


class Installed:
    def __init__(self, venv: Path, home: Path) -> None:
        self.venv = venv
        self.home = home
        self.bin = venv / "bin"

    def env(self) -> dict[str, str]:
        """What a user's shell in an activated venv has; nothing of the developer's."""
        return {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
        }

    def run(self, argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout
        )


def _pip_env() -> dict[str, str]:
    # pip may use its cache and index settings; nothing may point Python at the checkout.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _check(argv: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(
        argv, cwd=cwd, env=_pip_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    wheels = base / "wheels"
    _check(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(wheels)], base, 600
    )
    built = sorted(wheels.glob("pixell_kernel_runtime-*.whl"))
    assert [w.name for w in built] == [f"pixell_kernel_runtime-{__version__}-py3-none-any.whl"]

    venv = base / "venv"
    _check([sys.executable, "-m", "venv", str(venv)], base, 120)
    _check([str(venv / "bin" / "python"), "-m", "pip", "install", str(built[0])], base, 900)
    home = base / "home"
    home.mkdir()
    return Installed(venv, home)


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unrelated, empty working directory: no ./pixell_kernel_runtime, no ./examples."""
    return tmp_path_factory.mktemp("elsewhere")


def test_installed_package_is_the_wheel_not_the_checkout(
    installed: Installed, elsewhere: Path
) -> None:
    probe = (
        "import json, importlib.metadata as m, pixell_kernel_runtime as p\n"
        "d = m.distribution('pixell-kernel-runtime')\n"
        "print(json.dumps({'file': p.__file__, 'version': d.version,"
        " 'direct_url': json.loads(d.read_text('direct_url.json'))}))\n"
    )
    done = installed.run([str(installed.bin / "python"), "-c", probe], elsewhere)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    site = Path(installed.venv / "lib").resolve()
    assert Path(found["file"]).resolve().is_relative_to(site), found
    assert not Path(found["file"]).resolve().is_relative_to(REPO.resolve()), found
    # Installed from the wheel file, not as an editable pointer back to a source tree.
    assert found["direct_url"]["url"].endswith(".whl"), found
    assert "dir_info" not in found["direct_url"], found
    # One version source: the package's __version__ is what the wheel's metadata says.
    assert found["version"] == __version__

    done = installed.run([str(installed.bin / "pixell-kernel-runtime"), "--version"], elsewhere)
    assert (done.returncode, done.stdout.strip()) == (0, __version__), done.stderr


def test_console_without_its_extra_says_how_to_install_it(
    installed: Installed, elsewhere: Path
) -> None:
    # The wheel alone does not bring jupyter-console (it is the `console` extra).
    done = installed.run(
        [
            str(installed.bin / "pixell-kernel-runtime"),
            "console",
            "pixell-python-agent@0.1.0:default",
            "--url",
            f"http://127.0.0.1:{free_port()}",
        ],
        elsewhere,
    )
    assert done.returncode == 1
    assert "pip install 'pixell-kernel-runtime[console]'" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def served(
    installed: Installed, elsewhere: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Client]:
    state = tmp_path_factory.mktemp("wheel-state") / "state"
    port = free_port()
    log_path = state.parent / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(installed.bin / "pixell-kernel-runtime"),
                "serve",
                "--examples",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(state),
            ],
            cwd=elsewhere,
            env=installed.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            client = Client(port)
            _wait_healthy(client, proc, log_path)
            yield client
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert proc.returncode == 0, log_path.read_text(errors="replace")


def _wait_healthy(client: Client, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = log_path.read_text(errors="replace")
            raise AssertionError(f"installed server exited with {proc.returncode}:\n{logs}")
        try:
            if client.get("/runtime/health", timeout=2).status == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError(
        f"installed server did not answer:\n{log_path.read_text(errors='replace')}"
    )


def _invoke(client: Client, agent: str, input_: dict[str, Any]) -> dict[str, Any]:
    answer = client.invoke(agent, input_)
    assert answer.status == 200, answer
    return answer.json()


def test_seed_flow_against_the_installed_server(
    installed: Installed,
    served: Client,
    elsewhere: Path,
    tmp_path: Path,
) -> None:
    client = served
    health = client.get("/runtime/health").json()
    assert health["status"] == "healthy" and health["version"] == __version__

    # --examples found the examples inside the installed package and loaded both.
    packages = {p["id"]: p for p in client.get("/runtime/packages").json()["packages"]}
    assert sorted(packages) == ["hello-handler@0.1.0", "pixell-python-agent@0.1.0"]

    # Load by path: the installed `build` command on the installed example sources gives the
    # very bytes `--examples` loaded (the builder is reproducible), so the load is "unchanged".
    site_examples = _installed_examples(installed, elsewhere)
    out = tmp_path / "apkg"
    done = installed.run(
        [
            str(installed.bin / "pixell-kernel-runtime"),
            "build",
            str(site_examples / "pixell-python-agent"),
            "-o",
            str(out),
        ],
        elsewhere,
    )
    assert done.returncode == 0, done.stderr
    apkg = out / "pixell-python-agent-0.1.0.apkg"
    loaded = client.load(apkg)
    assert loaded.status == 200, loaded
    body = loaded.json()
    assert body["package_id"] == "pixell-python-agent@0.1.0"
    assert body["result"] == "unchanged"
    assert body["sha256"] == packages["pixell-python-agent@0.1.0"]["sha256"]

    # Upload (multipart) a package of our own, then call it.
    mine = make_apkg(
        tmp_path / "uploaded.apkg",
        {
            "agent.yaml": manifest_yaml("wheel-upload"),
            "main.py": "def handler(data):\n    return {'got': data}\n",
        },
    )
    uploaded = client.upload("/runtime/packages/upload", mine)
    assert uploaded.status == 200, uploaded
    assert uploaded.json()["package_id"] == "wheel-upload@0.1.0"
    assert uploaded.json()["result"] == "installed"
    answer = _invoke(client, "wheel-upload@0.1.0/default", {"n": 1})
    assert answer["output"] == {"got": {"n": 1}}, answer

    # The code executor, twice in one session: the kernel keeps its state.
    first = _invoke(client, CODE, {"code": "x = 41", "session_id": "wheel"})
    assert first["output"]["status"] == "success", first
    second = _invoke(client, CODE, {"code": "x + 1", "session_id": "wheel"})
    assert second["output"]["status"] == "success", second
    assert second["output"]["result"] == 42
    assert second["output"]["session_restarted"] is False

    # The kernel runs the venv's interpreter and imports the installed package.
    where = _invoke(
        client,
        CODE,
        {
            "code": "import sys, pixell_kernel_runtime as p\nresult = [sys.prefix, p.__file__]",
            "session_id": "wheel",
        },
    )["output"]["result"]
    assert Path(where[0]).resolve() == installed.venv.resolve(), where
    assert Path(where[1]).resolve().is_relative_to(installed.venv.resolve()), where

    # The handler example, called in its own session kernel.
    greeting = _invoke(client, GREET, {"name": "wheel"})
    assert greeting["output"] == {"greeting": "Hello, wheel!"}, greeting

    session = client.get("/runtime/sessions/" + quote("pixell-python-agent@0.1.0:wheel", safe=""))
    assert session.status == 200, session
    assert session.json()["executions"] == 3


def _installed_examples(installed: Installed, cwd: Path) -> Path:
    done = installed.run(
        [
            str(installed.bin / "python"),
            "-c",
            "from pixell_kernel_runtime.bundled import examples_dir; print(examples_dir())",
        ],
        cwd,
    )
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.resolve().is_relative_to(installed.venv.resolve()), path
    assert sorted(p.name for p in path.iterdir() if (p / "agent.yaml").is_file()) == [
        "hello-handler",
        "pixell-python-agent",
    ]
    return path
