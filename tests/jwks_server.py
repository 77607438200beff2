"""A loopback identity provider for the auth tests, and the helpers those tests share.

``JWKSServer`` is a threading ``http.server`` on ``127.0.0.1:0`` serving an OIDC discovery
document (``/.well-known/openid-configuration``: issuer = its own base URL, ``jwks_uri``) and a
JWKS of keys generated here with ``cryptography`` (RSA 2048, EC P-256). Keys can be swapped at
runtime (rotation) and every fetch is counted, so a test can tell whether a verifier refreshed.
Tokens are minted with PyJWT; every token minted is remembered, so that a test can grep the
server logs for all of them.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from conftest import REPO, Response, minimal_env
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

DISCOVERY = "/.well-known/openid-configuration"
JWKS_PATH = "/keys.json"
AUDIENCE = "pixell"
# What `token create` prints and the generated start-up token look like.
API_TOKEN_RE = re.compile(r"pkr_[A-Za-z0-9_-]{40,}")


@dataclass
class SigningKey:
    kid: str
    alg: str  # RS256 or ES256
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk = dict(algo.to_jwk(self.private.public_key(), as_dict=True))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(alg: str = "RS256", kid: str | None = None) -> SigningKey:
    if alg == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(alg)
    return SigningKey(kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg, private)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JWKSServer:
    """Discovery document and JWKS on a free loopback port; keys swappable, fetches counted."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        # Raw JWKs served next to the real keys (e.g. a symmetric "oct" key that must be ignored).
        self.extra_jwks: list[dict[str, Any]] = []
        self.fetches: Counter[str] = Counter()
        self.minted: list[str] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- serving ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def issuer(self) -> str:
        return self.base_url

    def start(self) -> JWKSServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    owner.fetches[path] += 1
                    if path == DISCOVERY:
                        doc: Any = {
                            "issuer": owner.issuer,
                            "jwks_uri": owner.base_url + JWKS_PATH,
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                        }
                    elif path == JWKS_PATH:
                        doc = {"keys": [k.public_jwk() for k in owner.keys] + owner.extra_jwks}
                    else:
                        doc = None
                if doc is None:
                    self.send_error(404)
                    return
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: pytest shows what matters

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def jwks_fetches(self) -> int:
        with self._lock:
            return self.fetches[JWKS_PATH]

    # ---- keys ------------------------------------------------------------------------------

    def add_key(self, alg: str = "RS256") -> SigningKey:
        key = new_key(alg)
        with self._lock:
            self.keys.append(key)
        return key

    def rotate(self, alg: str = "RS256") -> SigningKey:
        """Replace every published key by one new key with a new kid."""
        key = new_key(alg)
        with self._lock:
            self.keys = [key]
        return key

    # ---- tokens ----------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        doc: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-1",
            "tenant": "acme",
            "iat": now,
            "exp": now + 600,
            "scope": "invoke sessions",
        }
        doc.update(overrides)
        return {k: v for k, v in doc.items() if v is not None}

    def mint(
        self,
        key: SigningKey,
        *,
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A JWT signed by ``key`` (``kid`` overrides the header's key id); claim=None drops it."""
        token = jwt.encode(
            self.claims(**claims),
            key.private,
            algorithm=key.alg,
            headers={"kid": kid or key.kid, **(headers or {})},
        )
        return self.remember(token)

    def remember(self, token: str) -> str:
        self.minted.append(token)
        return token


@contextlib.contextmanager
def running_jwks(*algs: str) -> Iterator[JWKSServer]:
    """A started JWKSServer publishing one key per entry of ``algs``; stopped on exit."""
    idp = JWKSServer()
    for alg in algs:
        idp.add_key(alg)
    idp.start()
    try:
        yield idp
    finally:
        idp.stop()


# ---- hand-built hostile JWTs ------------------------------------------------------------------


def unsigned_jwt(claims: dict[str, Any], kid: str) -> str:
    """``alg: none``, built by hand (PyJWT would refuse to help)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hs256_with_public_key(claims: dict[str, Any], key: SigningKey) -> str:
    """The key-confusion attack: HS256 keyed with the RSA public key's PEM."""
    import hashlib
    import hmac

    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64url(json.dumps(claims).encode())
    mac = hmac.new(key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def tamper(token: str) -> str:
    """The same header and signature over a payload whose claims were changed (tenant)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["tenant"] = "someone-else"
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


# ---- helpers shared by the REST auth tests ---------------------------------------------------


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``python3 -m pixell_kernel_runtime ...`` with a minimal environment."""
    return subprocess.run(
        [sys.executable, "-m", "pixell_kernel_runtime", *args],
        capture_output=True,
        text=True,
        env=minimal_env(home),
        cwd=REPO,
        timeout=60,
    )


def create_token(
    path: Path,
    tenant: str,
    name: str,
    *scopes: str,
    expires: str | None = None,
    roles: tuple[str, ...] = (),
) -> str:
    """``token create`` through the CLI; the token it printed (one line on stdout)."""
    args = ["token", "create", "--file", str(path), "--tenant", tenant, "--name", name]
    args += ["--scopes", *scopes]
    if roles:
        args += ["--roles", *roles]
    if expires:
        args += ["--expires", expires]
    res = cli(*args, home=path.parent / "cli-home")
    assert res.returncode == 0, res
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout
    token = lines[0].strip()
    assert API_TOKEN_RE.fullmatch(token), token
    return token


def request(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    *,
    scheme: str = "Bearer",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Response:
    """One HTTP request to the runtime on loopback, with ``Authorization: <scheme> <token>``."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"{scheme} {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw)
    finally:
        conn.close()


def assert_unauthorized(resp: Response) -> None:
    """401 in the contract's shape: WWW-Authenticate: Bearer and the error envelope."""
    assert resp.status == 401, resp
    assert resp.headers.get("www-authenticate", "").split()[0] == "Bearer", resp.headers
    body = resp.json()
    assert body["error"] == "Unauthorized", body
    assert body["code"] == "unauthorized", body
    assert isinstance(body["message"], str) and body["message"], body


def assert_forbidden(resp: Response, scope: str) -> None:
    """403 whose message names the missing scope."""
    assert resp.status == 403, resp
    body = resp.json()
    assert body["code"] == "forbidden", body
    assert scope in body["message"], body


def secrets_of(token: str) -> list[str]:
    """What must never reach a log: the token, and its secret part on its own."""
    if token.count(".") == 2:
        return [token, token.rsplit(".", 1)[1]] if token.rsplit(".", 1)[1] else [token]
    return [token, token.removeprefix("pkr_")]


def assert_no_token_in_logs(logs: list[Path], tokens: list[str], allowed: int = 0) -> None:
    """No line of any log holds any of ``tokens`` (``allowed``: lines that may, e.g. the one
    start-up line that shows a generated token)."""
    assert logs and tokens
    hits = []
    for log in logs:
        text = log.read_text(errors="replace")
        assert text, f"{log} is empty: the check would prove nothing"
        for line in text.splitlines():
            if any(s in line for t in tokens for s in secrets_of(t)):
                hits.append(f"{log.name}: {line[:300]}")
    assert len(hits) == allowed, "\n".join(hits)


def audit_events(log: Path, request_id: str) -> list[dict[str, Any]]:
    """The JSON log events of one request that carry a ``reason`` (the audit events)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("request_id") == request_id and "reason" in doc:
            out.append(doc)
    return out
