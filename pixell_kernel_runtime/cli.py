"""Command line: ``serve`` (the default), ``build``, ``console``, ``token``, ``usage export``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from pixell_kernel_runtime import __version__
from pixell_kernel_runtime.config import apply_overrides, from_env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixell-kernel-runtime",
        description="A sandboxed, Jupyter-kernel-backed runtime for Pixell agent packages.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the HTTP server (the default command)")
    _serve_args(serve)

    console = sub.add_parser(
        "console",
        help="attach a Jupyter console to a session's kernel (on the server's host)",
        description="Attach `jupyter console` to the kernel of a session (its id is"
        " <package_id>:<session_id>, as GET /runtime/sessions lists it). Arguments after"
        " `--` go to jupyter console.",
    )
    console.add_argument("session", help="session id, e.g. pixell-python-agent@0.1.0:default")
    console.add_argument(
        "--url",
        default=os.environ.get("PIXELL_RUNTIME_URL", "http://127.0.0.1:8000"),
        help="the runtime's base URL (env PIXELL_RUNTIME_URL)",
    )
    console.add_argument(
        "--token",
        default=os.environ.get("PIXELL_RUNTIME_TOKEN"),
        help="an API token with the sessions and attach scopes (env PIXELL_RUNTIME_TOKEN)",
    )

    token = sub.add_parser(
        "token",
        help="manage API tokens in the tokens file (AUTH_TOKENS_FILE)",
        description="API tokens are stored only as SHA-256 hashes; `create` prints the new "
        "token once. A running server picks changes up within a second.",
    )
    # --file before or after the subcommand: `token --file F list` and `token list --file F`.
    file_opt = argparse.ArgumentParser(add_help=False)
    file_opt.add_argument(
        "--file",
        type=Path,
        default=argparse.SUPPRESS,
        help="the tokens file, YAML or JSON (env AUTH_TOKENS_FILE)",
    )
    token.add_argument(
        "--file",
        type=Path,
        default=os.environ.get("AUTH_TOKENS_FILE") or os.environ.get("PIXELL_AUTH_TOKENS_FILE"),
        help="the tokens file, YAML or JSON (env AUTH_TOKENS_FILE)",
    )
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="create a token and print it once", parents=[file_opt])
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a name for the token (default: a random one)")
    create.add_argument("--scopes", nargs="+", required=True, help="e.g. invoke sessions")
    create.add_argument("--roles", nargs="*", default=[])
    create.add_argument("--expires", help="ISO 8601 time after which it stops working")
    tsub.add_parser("list", help="list tokens (never the tokens themselves)", parents=[file_opt])
    revoke = tsub.add_parser("revoke", help="remove a token", parents=[file_opt])
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--name", required=True)

    usage = sub.add_parser("usage", help="usage metering: export the ledger")
    usub = usage.add_subparsers(dest="usage_command", required=True)
    export = usub.add_parser(
        "export",
        help="write (and --send) Stripe meter events for a period",
        description="One Stripe meter event per execution that ended in [--from, --to), its "
        "identifier the execution id. With --send they are posted with the stripe library "
        "(STRIPE_API_KEY; STRIPE_API_BASE overrides the address) and recorded in the ledger, "
        "so that a rerun sends only the rest. Exit 0 done, 1 Stripe refused or failed some, "
        "2 bad arguments, 3 --strict and a tenant without a customer.",
    )
    from pixell_kernel_runtime.metering import stripe_export

    stripe_export.add_arguments(export)

    build = sub.add_parser("build", help="build APKG archives from agent source folders")
    build.add_argument("sources", nargs="+", type=Path, help="folders holding agent.yaml")
    build.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to bind (env HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (env PORT; default 8000)")
    p.add_argument(
        "--state-dir", type=Path, help="where the runtime keeps its state (env STATE_DIR)"
    )
    p.add_argument(
        "--package-cache-dir",
        type=Path,
        help="where installed packages live (env PACKAGE_CACHE_DIR; default STATE_DIR/packages)",
    )
    p.add_argument(
        "--packages-dir",
        type=Path,
        help="load every .apkg in this folder at start (env PACKAGES_DIR)",
    )
    p.add_argument(
        "--examples",
        action="store_true",
        default=None,
        help="build and load the example agents at start (those shipped with the package,"
        " or the ones in --examples-dir)",
    )
    p.add_argument(
        "--examples-dir",
        type=Path,
        help="folder of example agent sources (default: pixell_kernel_runtime/examples, installed"
        " with the package)",
    )
    p.add_argument(
        "--run-dir", type=Path, help="short folder for kernel sockets (default /tmp/pkr-*)"
    )
    p.add_argument(
        "--sandbox",
        dest="sandbox_mode",
        choices=["strict", "best_effort", "off"],
        help="sandbox mode (env SANDBOX_MODE; default best_effort)",
    )
    p.add_argument(
        "--sandbox-config",
        type=Path,
        help="operator sandbox policy file, YAML or JSON (env SANDBOX_CONFIG)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL)")
    p.add_argument("--log-format", choices=["text", "console", "json"], help="env LOG_FORMAT")
    p.add_argument(
        "--metrics-port", type=int, help="the metrics port (env METRICS_PORT; default 9090)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # `pixell-kernel-runtime --port 9000` means serve, as `python -m ...` does.
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    # Everything after `--` belongs to jupyter console (see the console command).
    passthrough: list[str] = []
    if argv and argv[0] == "console" and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)

    if args.command == "console":
        return _console(args.url, args.session, passthrough, args.token)

    if args.command == "token":
        return _token(args)

    if args.command == "usage":
        from pixell_kernel_runtime.metering import stripe_export

        return stripe_export.run(args)

    if args.command == "build":
        from pixell_kernel_runtime.packages import builder

        return builder.main([*map(str, args.sources), "--out-dir", str(args.output)])

    try:
        settings = from_env()
        overrides = {k: v for k, v in vars(args).items() if k != "command"}
        apply_overrides(settings, overrides)
        settings.validate()
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pixell_kernel_runtime.server import configure_logging, serve

    configure_logging(settings)
    try:
        asyncio.run(serve(settings))
    except Exception as exc:  # a start-up failure (port in use, strict sandbox): say it plainly
        from pixell_kernel_runtime.errors import RuntimeAPIError

        message = exc.message if isinstance(exc, RuntimeAPIError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def _console(url: str, session: str, extra: list[str], token: str | None = None) -> int:
    """Ask the runtime for the session kernel's connection info, then run `jupyter console`.

    The info comes from the runtime (``GET /runtime/sessions/{id}/connection``, attach scope),
    never from a file in the session's dirs; it goes to a private connection file (0600, in a
    0700 temp dir) that is removed when the console ends."""
    # Said before anything reaches the server: restarting a stopped kernel for nothing helps no one.
    if importlib.util.find_spec("jupyter_console") is None:
        print(
            "error: `console` needs jupyter-console, which is not installed:"
            " pip install 'pixell-kernel-runtime[console]'",
            file=sys.stderr,
        )
        return 1
    base = url.rstrip("/") + "/runtime/sessions/" + quote(session, safe="")

    def call(method: str, path: str = "") -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urlopen(Request(base + path, method=method, headers=headers), timeout=120) as r:
                return json.loads(r.read())
        except HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            raise _APIError(exc.code, doc if isinstance(doc, dict) else {"message": text}) from None

    try:
        try:
            info = call("GET", "/connection")
        except _APIError as exc:
            if exc.body.get("code") != "no_kernel":
                raise
            # The session exists but its kernel is not running: start one.
            call("POST", "/restart")
            info = call("GET", "/connection")
    except _APIError as exc:
        print(f"error: {exc.body.get('message')}", file=sys.stderr)
        return 1
    except URLError as exc:
        print(f"error: cannot reach the runtime at {url}: {exc.reason}", file=sys.stderr)
        return 1
    return _run_console(info["connection"], extra)


class _APIError(Exception):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _run_console(connection: dict, extra: list[str]) -> int:
    """`jupyter console --existing <private file>`; its exit code, the file removed after."""
    import signal
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="pixell-console-")  # 0700
    path = os.path.join(folder, "kernel.json")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(connection, f)
        argv = [sys.executable, "-m", "jupyter_console", "--existing", path, *extra]
        child = subprocess.Popen(argv)
        # Ctrl-C belongs to the console (it interrupts the kernel): ignored here, after the
        # child started (it would inherit SIG_IGN). A hang-up or a kill is passed on, so the
        # console ends and the file is still removed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        code = child.wait()
        # Killed by a signal: the shell's convention, 128 + its number.
        return code if code >= 0 else 128 - code
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(folder)


def _token(args: argparse.Namespace) -> int:
    import secrets

    from pixell_kernel_runtime.auth import tokens

    if args.file is None:
        print("error: give --file or set AUTH_TOKENS_FILE", file=sys.stderr)
        return 2
    path = Path(args.file)
    try:
        if args.token_command == "create":
            name = args.name or "token-" + secrets.token_hex(3)
            value = tokens.create(
                path,
                tenant=args.tenant,
                name=name,
                scopes=args.scopes,
                roles=args.roles,
                expires=args.expires,
            )
            print(value)
            print(f"(tenant {args.tenant}, name {name}; shown once: store it now)", file=sys.stderr)
            return 0
        if args.token_command == "list":
            entries, _doc = tokens.read_file(path)
            print(json.dumps([e.public() for e in entries], indent=1))
            return 0
        if tokens.revoke(path, tenant=args.tenant, name=args.name):
            print(f"revoked {args.tenant}/{args.name}", file=sys.stderr)
            return 0
        print(f"error: no token {args.name} for tenant {args.tenant}", file=sys.stderr)
        return 1
    except (tokens.TokensFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
