"""OIDC bearer tokens: JWTs verified with PyJWT against the issuer's published keys.

The key set comes from ``OIDC_JWKS_URL`` or the issuer's discovery document
(``<OIDC_ISSUER>/.well-known/openid-configuration``), fetched in a worker thread and cached; an
unknown ``kid`` refreshes it, at most once a minute (key rotation without a restart, and no
way for a stream of junk tokens to make us hammer the issuer). Signature, ``iss``, ``aud``,
``exp`` and ``nbf`` are checked with a small leeway. Only asymmetric algorithms are accepted,
and only the ones the matching key allows: never ``none``, never an HMAC keyed with a public key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import jwt

from .principal import AuthError, Principal, parse_scopes

log = logging.getLogger("pixell_kernel_runtime.auth")

REFRESH_MIN_SECONDS = 60.0
FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1 << 20
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}


@dataclass(frozen=True)
class OIDCConfig:
    issuer: str
    audience: str | None = None
    jwks_url: str | None = None
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    leeway: float = 30.0


def _fetch_json(url: str) -> Any:
    if urlparse(url).scheme not in ("http", "https"):
        raise OSError(f"not an http(s) URL: {url}")
    with urlopen(Request(url, headers={"Accept": "application/json"}), timeout=FETCH_TIMEOUT) as r:
        data = r.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise OSError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    return json.loads(data)


def _algorithms_for(key: dict[str, Any]) -> tuple[str, ...]:
    """The asymmetric algorithms a JWK may verify (its own ``alg`` when it names one)."""
    kty = key.get("kty")
    if kty == "RSA":
        allowed: tuple[str, ...] = _RSA_ALGS
    elif kty == "EC" and key.get("crv") in _EC_ALGS:
        allowed = (_EC_ALGS[key["crv"]],)
    elif kty == "OKP" and key.get("crv") in ("Ed25519", "Ed448"):
        allowed = ("EdDSA",)
    else:
        return ()  # "oct" (a shared secret) and anything unknown: never
    alg = key.get("alg")
    if alg:
        return (alg,) if alg in allowed else ()
    return allowed


class OIDCVerifier:
    def __init__(self, config: OIDCConfig) -> None:
        self.config = config
        self._keys: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._forced_at = 0.0
        self._lock = threading.Lock()

    # ---- keys ------------------------------------------------------------

    def _jwks_url(self) -> str:
        if self.config.jwks_url:
            return self.config.jwks_url
        doc = _fetch_json(self.config.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self.config.issuer:
            raise OSError(
                f"discovery document names issuer {doc.get('issuer')!r}, not {self.config.issuer!r}"
            )
        url = doc.get("jwks_uri")
        if not isinstance(url, str):
            raise OSError("discovery document has no jwks_uri")
        return url

    def _refresh(self, *, force: bool) -> None:
        """Fetch the key set (blocking: runs in a worker thread)."""
        with self._lock:
            now = time.monotonic()
            if not force and self._keys:
                return
            if force:
                # Unknown kids refresh at most once a minute: junk tokens cannot make us hammer
                # the issuer, and a rotation is seen at its first token.
                if self._forced_at and now - self._forced_at < REFRESH_MIN_SECONDS:
                    return
                self._forced_at = now
            try:
                jwks = _fetch_json(self._jwks_url())
            except (OSError, ValueError) as exc:
                log.error("OIDC: cannot fetch the issuer's keys: %s", exc)
                return
            keys: dict[str, tuple[Any, tuple[str, ...]]] = {}
            for raw in jwks.get("keys", []) if isinstance(jwks, dict) else []:
                if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
                    continue
                algs = _algorithms_for(raw)
                if not algs:
                    continue
                try:
                    key = jwt.PyJWK(raw, algorithm=algs[0]).key
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                    continue
                keys[str(raw.get("kid", ""))] = (key, algs)
            self._keys = keys
            log.info("OIDC: %d signing key(s) from the issuer", len(keys))

    async def _key(self, kid: str) -> tuple[Any, tuple[str, ...]] | None:
        if not self._keys:
            await asyncio.to_thread(self._refresh, force=False)
        found = self._keys.get(kid)
        if found is None:
            await asyncio.to_thread(self._refresh, force=True)
            found = self._keys.get(kid)
        return found

    # ---- tokens ----------------------------------------------------------

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2 and token.startswith("ey")

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("invalid token", "malformed JWT header") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
            raise AuthError("invalid token", f"algorithm {alg!r} is not accepted")
        found = await self._key(str(header.get("kid", "")))
        if found is None:
            raise AuthError("invalid token", "unknown signing key (kid)")
        key, algs = found
        if alg not in algs:
            raise AuthError("invalid token", f"algorithm {alg} does not fit the signing key")
        c = self.config
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=c.audience,
                issuer=c.issuer,
                leeway=c.leeway,
                options={
                    "require": ["exp", "iss", "sub"] + (["aud"] if c.audience else []),
                    "verify_aud": c.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", "exp in the past") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid", "nbf in the future") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid token", f"{type(exc).__name__}: {exc}") from None
        tenant = claims.get(c.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthError("invalid token", f"no {c.tenant_claim!r} claim")
        scopes = parse_scopes(claims.get("scope", claims.get("scp", [])))
        raw_roles = claims.get(c.roles_claim, [])
        roles = raw_roles.split() if isinstance(raw_roles, str) else raw_roles
        return Principal(
            tenant=tenant,
            subject=str(claims["sub"]),
            scopes=scopes,
            roles=frozenset(str(r) for r in roles if isinstance(r, str | int)),
            via="oidc",
        )
