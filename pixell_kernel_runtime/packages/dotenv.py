"""A package's own environment: its ``.env`` file and the ``${VAR:-default}`` forms of agent.yaml.

Only the package's variables are ever consulted, never the server's: a package must not be able
to read the host's secrets through its manifest.
"""

from __future__ import annotations

import re

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def parse_dotenv(data: bytes) -> dict[str, str]:
    """KEY=VALUE lines, ``#`` comments, optional ``export``, surrounding quotes stripped."""
    text = data.decode("utf-8", errors="replace")
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not ENV_KEY_RE.match(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        env[key] = value
    return env


def expand_env(environment: dict[str, str], dotenv: dict[str, str]) -> dict[str, str]:
    """Resolve ``${VAR:-default}`` against the package's own variables only."""
    known = dict(dotenv)
    out: dict[str, str] = {}
    for key, value in environment.items():

        def repl(m: re.Match[str]) -> str:
            return known.get(m.group(1)) or (m.group(2) or "")

        out[key] = _ENV_REF_RE.sub(repl, value)
        known[key] = out[key]
    return out
