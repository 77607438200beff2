"""The Dockerfile against the package, without a Docker engine (none runs on these machines).

A small parser reads the Dockerfile as the builder does (directives, continuation lines,
comments, exec and shell forms, flags, ENV and variable substitution, stages). The checks then
hold it against the package: the console script the wheel declares, the `serve` flags the CLI
has, the settings' ports and paths, the user, the health check and the init. Where a piece can
run on this host it runs: the build stage's COPYs through .dockerignore build the wheel, the
health check probes a real server, and tini + CMD serve and stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import REPO, Client, free_port, make_apkg, manifest_yaml, process_tree, wait_for

from pixell_kernel_runtime import __version__
from pixell_kernel_runtime.config import ENV_VARS, Settings, from_env

pytestmark = pytest.mark.timeout(600)

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL", "MAINTAINER"}  # fmt: skip
FLAGGED = {"FROM", "RUN", "COPY", "ADD", "HEALTHCHECK"}
EXEC_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "VOLUME", "COPY", "ADD", "HEALTHCHECK"}
# Instructions whose arguments the builder expands $VAR / ${VAR} in.
SUBSTITUTED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME",
               "WORKDIR", "ARG"}  # fmt: skip
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


# --------------------------------------------------------------------------- the parser


@dataclass
class Instruction:
    name: str
    line: int
    flags: dict[str, str]
    rest: str  # after the flags, as written (continuations joined)
    exec_form: list[str] | None  # a JSON array of strings, where that form is allowed
    words: list[str]  # shell-form words, variables expanded where the builder expands them


@dataclass
class Stage:
    base: str
    name: str | None
    env: dict[str, str]  # the image's ENV (ARG values are build-time only)
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        found = self.all(name)
        assert found, f"no {name} in the stage FROM {self.base}"
        return found[-1]

    def run(self, before: Instruction | None = None) -> list[tuple[Instruction, list[str]]]:
        """The simple commands of its RUNs (all, or those before ``before``)."""
        upto = self.instructions.index(before) if before else len(self.instructions)
        return [(i, c) for i in self.instructions[:upto] if i.name == "RUN"
                for c in ([i.exec_form] if i.exec_form else commands(i.rest))]  # fmt: skip


def logical_lines(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The escape character and (line number, instruction text) pairs: directives read,
    comments dropped, a line ending in the escape character joined to the next one as it is
    (comment and blank lines inside a continuation are skipped, as the builder does)."""
    escape, out, directives = "\\", [], True
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if directives:
            m = re.fullmatch(r"#\s*([A-Za-z]+)\s*=\s*(\S+)", stripped)
            if m:
                escape = m.group(2) if m.group(1).lower() == "escape" else escape
                continue
            directives = False
        if stripped.startswith("#") or not stripped:
            continue
        start = start if current else number
        cont = re.search(re.escape(escape) + r"[ \t]*$", raw)
        current.append(raw[: cont.start()] if cont else raw)
        if not cont:
            out.append((start, "".join(current).strip()))
            current = []
    assert not current, f"line {start}: a continuation runs past the end of the file"
    return escape, out


def expand(text: str, env: dict[str, str], escape: str = "\\") -> list[str]:
    """Words as the builder's shell lexer makes them: quotes group, backslash escapes, and
    $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative} expand outside single quotes."""
    words: list[str] = []
    word, quote, i, started = "", "", 0, False

    def var(at: int) -> tuple[str, int]:
        if text[at] == "{":
            end = text.index("}", at)
            m = re.fullmatch(r"(\w+)(?::([-+]))?(.*)", text[at + 1 : end])
            assert m, f"unsupported substitution {text[at : end + 1]!r}"
            name, op, arg = m.groups()
            value = env.get(name, "")
            if op == "-":
                value = value or arg
            elif op == "+":
                value = arg if value else ""
            return value, end + 1
        m = re.compile(r"\w+").match(text, at)
        return (env.get(m.group(0), ""), m.end()) if m else ("$", at)

    while i < len(text):
        c = text[i]
        if quote != "'" and c == escape and i + 1 < len(text):
            word, i, started = word + text[i + 1], i + 2, True
        elif quote != "'" and c == "$" and i + 1 < len(text):
            value, i = var(i + 1)
            word, started = word + value, True
        elif quote and c == quote:
            quote, i = "", i + 1
        elif not quote and c in "'\"":
            quote, i, started = c, i + 1, True
        elif not quote and c.isspace():
            if started:
                words.append(word)
            word, i, started = "", i + 1, False
        else:
            word, i, started = word + c, i + 1, True
    assert not quote, f"unterminated quote in {text!r}"
    return words + [word] if started else words


def parse(text: str) -> list[Stage]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}  # ARGs before the first FROM: for FROM lines only
    escape, lines = logical_lines(text)
    for number, line in lines:
        name, _, rest = line.partition(" ")
        name, rest = name.upper(), rest.strip()
        assert name in INSTRUCTIONS, f"line {number}: unknown instruction {name!r}"
        assert not rest.startswith("<<"), f"line {number}: heredocs are not supported here"
        assert stages or name in ("ARG", "FROM"), f"line {number}: {name} before the first FROM"
        flags: dict[str, str] = {}
        while name in FLAGGED and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key], rest = value, rest.strip()
        body = rest[3:].lstrip() if name == "HEALTHCHECK" and rest[:3].upper() == "CMD" else rest
        doc = None
        if name in EXEC_FORM and body.startswith("["):
            with contextlib.suppress(ValueError):  # not JSON: the builder takes it as shell form
                doc = json.loads(body)
        exec_form = doc if isinstance(doc, list) and all(isinstance(x, str) for x in doc) else None
        # An ENV wins over an ARG of the same name; one instruction sees the values before it.
        scope = (
            global_args if name == "FROM" or not stages else {**stages[-1].args, **stages[-1].env}
        )
        words = expand(rest, scope, escape) if name in SUBSTITUTED else shlex.split(rest)
        if name == "FROM":
            assert len(words) == 1 or (len(words) == 3 and words[1].upper() == "AS"), line
            parent = next((s for s in stages if s.name == words[0]), None)
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None,
                                dict(parent.env) if parent else {}))  # fmt: skip
            continue
        if name == "ARG":
            for word in words:
                key, eq, value = word.partition("=")
                target = stages[-1].args if stages else global_args
                target[key] = value if eq else global_args.get(key, "") if stages else ""
        elif name == "ENV":
            pairs = words if "=" in words[0] else [f"{words[0]}={' '.join(words[1:])}"]
            stages[-1].env.update(pair.split("=", 1) for pair in pairs)
        if stages:
            stages[-1].instructions.append(Instruction(name, number, flags, rest, exec_form, words))
    assert stages, "no FROM"
    return stages


def commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands (split at &&, ||, ;, |)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def pip_commands(stage: Stage, verb: str) -> list[tuple[Instruction, list[str]]]:
    """Every `pip <verb>` (or `python -m pip <verb>`) run in the stage, with its arguments."""
    found = []
    for inst, cmd in stage.run():
        at = 0 if Path(cmd[0]).name.startswith("pip") else 2
        if (at == 0 or cmd[1:3] == ["-m", "pip"]) and cmd[at + 1 : at + 2] == [verb]:
            found.append((inst, cmd[at + 2 :]))
    return found


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name:
                return args[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- the parser's own test


def test_the_parser_reads_what_the_builder_reads() -> None:
    text = r"""# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
FROM ${BASE} AS one
ARG LATE
ENV A=1 B="two words" C=${A}x
ENV D=${A}x E=${LATE:-dflt} F=${A:+alt} G='$A' H=\$A
ENV LEGACY value with spaces
RUN echo a \
  # a comment inside a continuation

  && echo "b c"
FROM one
COPY --from=one --chown=u:g ["/a b", "/c"]
VOLUME $D /data
CMD ["x", "--y"]
ENTRYPOINT echo $A
HEALTHCHECK --interval=5s CMD ["probe", "1"]
"""
    one, two = parse(text)
    assert (one.base, one.name, two.base) == ("python:3.11-slim", "one", "one")
    # C: one ENV sees the values from before it; BASE and LATE are ARGs, not the image's ENV.
    assert one.env == {"A": "1", "B": "two words", "C": "x", "D": "1x", "E": "dflt", "F": "alt",
                       "G": "$A", "H": "$A", "LEGACY": "value with spaces"}  # fmt: skip
    assert two.env == one.env  # inherited from the stage it is FROM
    assert commands(one.last("RUN").rest) == [["echo", "a"], ["echo", "b c"]]
    copy = two.last("COPY")
    assert (copy.flags, copy.exec_form) == ({"from": "one", "chown": "u:g"}, ["/a b", "/c"])
    assert two.last("VOLUME").words == ["1x", "/data"]
    assert two.last("CMD").exec_form == ["x", "--y"]
    assert two.last("ENTRYPOINT").exec_form is None  # shell form, run by /bin/sh -c
    health = two.last("HEALTHCHECK")
    assert (health.flags, health.exec_form) == ({"interval": "5s"}, ["probe", "1"])
    (ticked,) = parse("# escape=`\nFROM x\nRUN echo a `\n  b\nWORKDIR c:`\\d\n")
    assert (ticked.last("RUN").words, ticked.last("WORKDIR").words) == (
        ["echo", "a", "b"],
        ["c:\\d"],
    )
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse("FROM x\nRUNN echo\n")
    with pytest.raises(AssertionError, match="continuation"):
        parse("FROM x\nRUN echo \\\n")
    with pytest.raises(AssertionError, match="before the first FROM"):
        parse("ENV A=1\nFROM x\n")


# --------------------------------------------------------------------------- the Dockerfile


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _builder(stages: list[Stage]) -> tuple[Stage, list[str]]:
    """The stage that runs `pip wheel`, and that command's arguments."""
    found = [(s, args) for s in stages[:-1] for _, args in pip_commands(s, "wheel")]
    assert len(found) == 1, f"one `pip wheel` expected in a build stage, found {found}"
    return found[0]


def test_bases_are_slim_python(stages: list[Stage]) -> None:
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", stage.base), stage.base
    assert len(stages) >= 2, "a builder stage and the final stage"


def _context_files(checkout: Path) -> set[PurePosixPath]:
    """The build context: the checkout filtered by .dockerignore, as the builder sends it (the
    last matching rule wins; a rule matching a parent directory matches what is inside)."""
    rules = []
    for raw in (checkout / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
            rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            rules.append((line.startswith("!"), re.compile(rx + r"\Z")))
    out = set()
    for path in checkout.rglob("*"):
        rel = path.relative_to(checkout)
        parents = [rel, *list(rel.parents)[:-1]]
        excluded = False
        for negated, rx in rules:
            if any(rx.match(str(p)) for p in parents):
                excluded = not negated
        if path.is_file() and not excluded:
            out.add(PurePosixPath(rel))
    return out


def _built_wheel(src: Path, out: Path, arg: str = ".") -> zipfile.ZipFile:
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), arg]
    done = subprocess.run(argv, cwd=src, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("pixell_kernel_runtime-*.whl")
    return zipfile.ZipFile(wheel)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the checkout, which both wheels are built from (others may edit the tree)."""
    src = tmp_path_factory.mktemp("checkout") / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    return src


@pytest.fixture(scope="module")
def docker_wheel(stages: list[Stage], checkout: Path, tmp_path_factory: Any) -> zipfile.ZipFile:
    """The build stage replayed: its COPYs from the context into a tree, then its `pip wheel`."""
    stage, args = _builder(stages)
    image = tmp_path_factory.mktemp("build-stage")
    context = _context_files(checkout)
    workdir = PurePosixPath("/")
    for inst in stage.instructions:
        if inst.name == "WORKDIR":
            workdir = workdir / inst.words[0]
        if inst.name not in ("COPY", "ADD") or "from" in inst.flags:
            continue
        *sources, dest = inst.exec_form or inst.words
        for source in map(PurePosixPath, sources):
            assert not set(str(source)) & set("*?["), f"COPY {source}: globs are not replayed"
            inside = [f for f in context if f == source or source in f.parents]
            assert inside, f"COPY {source}: not in the build context (.dockerignore?)"
            for f in inside:
                # A directory's contents go to dest; a file to dest, or into it with a slash.
                to = workdir / dest / f.relative_to(source) if f != source else workdir / dest
                to = to / f.name if f == source and dest.endswith("/") else to
                (image / str(to).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(checkout / f, image / str(to).lstrip("/"))
    wheel_dir = option(args, "-w", "--wheel-dir")
    (requirement,) = [a for a in args if not a.startswith("-") and a != wheel_dir]
    assert requirement.split("[")[0] == ".", args
    return _built_wheel(image / str(workdir).lstrip("/"), image / "out", requirement)


def test_the_build_context_builds_the_checkouts_wheel(
    docker_wheel: zipfile.ZipFile, checkout: Path, tmp_path: Path
) -> None:
    reference = _built_wheel(checkout, tmp_path / "out")
    name = f"pixell_kernel_runtime-{__version__}-py3-none-any.whl"
    assert Path(docker_wheel.filename).name == name
    # Same files (example agents' dotfiles included): .dockerignore and the COPYs lose nothing.
    assert sorted(docker_wheel.namelist()) == sorted(reference.namelist())


def _wheel_scripts(wheel: zipfile.ZipFile) -> dict[str, str]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    section, scripts = None, {}
    for line in wheel.read(name).decode().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            key, value = (x.strip() for x in line.split("=", 1))
            scripts[key] = value
    return scripts


def _serve_options() -> set[str]:
    argv = [sys.executable, "-m", "pixell_kernel_runtime", "serve", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", done.stdout))


def test_entrypoint_is_tini_and_cmd_the_declared_console_script(
    final: Stage, docker_wheel: zipfile.ZipFile
) -> None:
    entry = final.last("ENTRYPOINT").exec_form
    assert entry == ["/usr/bin/tini", "--"], entry  # exec form: tini is PID 1, not a shell
    cmd = final.last("CMD").exec_form
    assert cmd is not None, "CMD in exec form (a shell would sit between tini and the server)"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert _wheel_scripts(docker_wheel) == declared
    assert declared[cmd[0]] == "pixell_kernel_runtime.cli:main", (cmd, declared)
    assert cmd[1] == "serve", cmd
    options = _serve_options()
    flags = [a.split("=", 1)[0] for a in cmd[2:] if a.startswith("--")]
    assert flags and set(flags) <= options, (flags, sorted(options))
    assert option(cmd, "--host") == "0.0.0.0", cmd  # reachable through a published port
    # The port comes from PORT (ENV), which the health check follows.
    assert "--port" not in flags, cmd


def _account(final: Stage) -> tuple[list[str], list[str]]:
    """The useradd that creates USER's account (before USER) and the groupadd of its group."""
    before = final.last("USER")
    (useradd,) = [c for _, c in final.run(before) if c[0] == "useradd"]
    group = option(useradd, "--gid", "-g")
    (groupadd,) = [c for _, c in final.run(before) if c[0] == "groupadd" and c[-1] == group]
    return useradd, groupadd


def test_user_is_created_and_not_root(final: Stage) -> None:
    user, _, group = final.last("USER").words[0].partition(":")
    useradd, groupadd = _account(final)
    # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
    assert user == option(useradd, "--uid", "-u"), (user, useradd)
    assert group == option(groupadd, "--gid", "-g"), (group, groupadd)
    assert int(user) >= 1000 and int(group) >= 1000, "not root, nor a distribution's id"
    assert "--system" in useradd and "--shell" in useradd, useradd  # no login, no subuid range


def test_bubblewrap_and_tini_are_installed(final: Stage) -> None:
    installs = [c for _, c in final.run() if c[:2] == ["apt-get", "install"]]
    assert len(installs) == 1, installs
    packages = {a for a in installs[0][2:] if not a.startswith("-")}
    assert {"bubblewrap", "tini"} <= packages, installs


def test_the_wheel_is_installed_not_the_source(stages: list[Stage], final: Stage) -> None:
    builder, args = _builder(stages)
    wheel_dir = option(args, "-w", "--wheel-dir")
    # Nothing of the build context reaches the final stage: no source tree to import from.
    assert [i.line for i in final.instructions if i.name in ("COPY", "ADD")
            and i.flags.get("from") != builder.name] == []  # fmt: skip
    (install,) = pip_commands(final, "install")
    inst, args = install
    assert not {"-e", "--editable"} & set(args), args
    mount = dict(kv.split("=", 1) for kv in inst.flags["mount"].split(","))
    assert mount == {"type": "bind", "from": builder.name, "source": wheel_dir,
                     "target": mount["target"]}, mount  # fmt: skip
    assert option(args, "--find-links", "-f") == mount["target"], args
    assert {"--no-index", "--only-binary=:all:"} <= set(args), args
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (requirement,) = [a for a in args if not a.startswith("-") and a != mount["target"]]
    name, _, extras = requirement.partition("[")
    assert name == project["name"], requirement
    assert set(extras.rstrip("]").split(",")) - {""} <= set(project["optional-dependencies"])


def test_ports_and_env_match_the_settings(final: Stage) -> None:
    defaults = Settings()
    names = set(ENV_VARS) | {"PIXELL_" + n for n in ENV_VARS}
    assert set(final.env) <= names, f"not settings: {set(final.env) - names}"
    image = from_env(final.env)
    exposed = {int(w.split("/")[0]) for i in final.all("EXPOSE") for w in i.words}
    assert exposed == {defaults.port, defaults.metrics_port}, exposed
    assert (image.port, image.metrics_port) == (defaults.port, defaults.metrics_port)
    assert image.metrics_host == "0.0.0.0", "the metrics port would not be reachable"


def test_volumes_are_the_state_and_packages_dirs(final: Stage) -> None:
    image = from_env(final.env)
    volume = final.last("VOLUME")
    paths = set(volume.exec_form or volume.words)
    assert paths == {str(image.state_dir), str(image.packages_dir)}, paths
    assert image.store_dir.is_relative_to(image.state_dir)  # installed packages persist too
    # Made and owned by the server's account BEFORE the VOLUME (later changes are dropped).
    useradd, groupadd = _account(final)
    owners = {f"{useradd[-1]}:{groupadd[-1]}", final.last("USER").words[0]}
    cmds = [c for _, c in final.run(volume)]
    made = {a for c in cmds if c[:2] == ["mkdir", "-p"] for a in c[2:]}
    owned = {a for c in cmds if c[0] == "chown" and c[1] in owners for a in c[2:]}
    assert paths <= made and paths <= owned, (paths, made, owned)


def _healthcheck(final: Stage) -> tuple[list[str], dict[str, str]]:
    health = final.last("HEALTHCHECK")
    assert health.exec_form and "/runtime/health" in " ".join(health.exec_form), health.rest
    return health.exec_form, health.flags


def test_healthcheck_probes_a_real_server(final: Stage, server_factory: Any) -> None:
    argv, flags = _healthcheck(final)
    seconds = {k: float(v.rstrip("s")) for k, v in flags.items() if k != "retries"}
    assert seconds["timeout"] < seconds["interval"] and seconds["start-period"] >= 30, flags
    server = server_factory()
    path = f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"
    ok = subprocess.run(argv, env={"PATH": path, "PORT": str(server.port)}, timeout=30)
    assert ok.returncode == 0
    closed = subprocess.run(argv, env={"PATH": path, "PORT": str(free_port())}, timeout=30,
                            capture_output=True)  # fmt: skip
    assert closed.returncode != 0, "the health check passed with nothing listening"


def _ensure_tini(path: str) -> None:
    """As `make system-deps` would install it (apt-get, as root), when it is missing."""
    if not os.path.exists(path):
        assert os.geteuid() == 0 and shutil.which("apt-get"), f"install tini ({path} missing)"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "tini"]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run(["dpkg", "-L", "tini"], capture_output=True, text=True, timeout=60)
    assert path in listed.stdout.split(), "the ENTRYPOINT is not the path Debian's tini installs"


def test_tini_and_cmd_serve_and_stop_on_sigterm(final: Stage, tmp_path: Path) -> None:
    """ENTRYPOINT + CMD as the container runs them, with the image's ENV; only the paths, the
    ports and the bind address (loopback here) are this test's."""
    entry, cmd = final.last("ENTRYPOINT").exec_form or [], final.last("CMD").exec_form or []
    _ensure_tini(entry[0])
    packages = tmp_path / "packages"
    handler = "def handler(data):\n    return {'ok': True}\n"
    make_apkg(packages / "vol.apkg", {"agent.yaml": manifest_yaml("vol"), "main.py": handler})
    port = free_port()
    env = {
        **final.env,
        **{"PORT": str(port), "METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1"},
        **{"STATE_DIR": str(tmp_path / "state"), "PACKAGES_DIR": str(packages)},
        **{"HOME": str(tmp_path), "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"},
    }
    argv = entry + [("127.0.0.1" if a == "0.0.0.0" else a) for a in cmd]
    log_path = tmp_path / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    health, _ = _healthcheck(final)

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text(errors="replace")
        return subprocess.run(health, env=env, capture_output=True, timeout=30).returncode == 0

    try:
        assert wait_for(healthy, 60, 0.2), log_path.read_text(errors="replace")
        ids = [p["id"] for p in Client(port).get("/runtime/packages").json()["packages"]]
        assert ids == ["vol@0.1.0"], ids  # the PACKAGES_DIR volume's APKGs load at start
        tree = process_tree(proc.pid)
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
        code = proc.wait(60)
        logs = log_path.read_text(errors="replace")
        assert code == 0, logs  # the server stopped gracefully; tini exits with its status
        assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in tree), 10), tree
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
