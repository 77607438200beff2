"""Who is asking: every request but ``GET /runtime/health`` is made by a Principal.

``Authenticator.authenticate`` takes the request's credentials (``Authorization: Bearer <t>``,
Jupyter's ``Authorization: token <t>``, or ``?token=`` on websockets only) and yields a
Principal from an API token (the tokens file) or an OIDC JWT (the issuer's keys), or raises
``AuthError`` (401). With authentication off every request is the open principal.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from .oidc import OIDCConfig, OIDCVerifier
from .principal import DEFAULT_TENANT, SCOPES, AuthError, Principal, open_principal
from .tokens import TokenStore, hash_token, new_token

if TYPE_CHECKING:
    from pixell_kernel_runtime.config import Settings

__all__ = ["AuthError", "Authenticator", "Principal", "SCOPES", "open_principal"]

log = logging.getLogger("pixell_kernel_runtime.auth")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _OneToken:
    """The token generated at start for a non-loopback bind with nothing configured."""

    def __init__(self, token: str) -> None:
        self._digest = hash_token(token)

    def verify(self, token: str) -> Principal | None:
        import hmac

        if hmac.compare_digest(hash_token(token), self._digest):
            return Principal(DEFAULT_TENANT, "generated", frozenset(SCOPES), via="token")
        return None


class Authenticator:
    def __init__(
        self,
        *,
        tokens: TokenStore | _OneToken | None = None,
        oidc: OIDCVerifier | None = None,
        enabled: bool = True,
        generated: str | None = None,
    ) -> None:
        self.tokens = tokens
        self.oidc = oidc
        self.enabled = enabled
        # Shown once at start, then forgotten by everything but its hash.
        self.generated = generated

    @classmethod
    def from_settings(cls, s: Settings) -> Authenticator:
        if s.auth not in ("auto", "none"):
            raise ValueError(f"AUTH must be auto or none, got {s.auth!r}")
        if s.auth == "none":
            log.warning(
                "AUTHENTICATION OFF (AUTH=none): anyone who reaches %s can run code in any "
                "session, read its variables and replace packages. Never do this on a network.",
                s.host,
            )
            return cls(enabled=False)
        tokens = TokenStore(s.auth_tokens_file) if s.auth_tokens_file else None
        oidc = None
        if s.oidc_issuer:
            oidc = OIDCVerifier(
                OIDCConfig(
                    issuer=s.oidc_issuer,
                    audience=s.oidc_audience,
                    jwks_url=s.oidc_jwks_url,
                    tenant_claim=s.oidc_tenant_claim,
                    roles_claim=s.oidc_roles_claim,
                )
            )
        if tokens or oidc:
            return cls(tokens=tokens, oidc=oidc)
        if is_loopback(s.host):
            return cls(enabled=False)  # the seed's curl flow, on this machine only
        token = new_token()
        return cls(tokens=_OneToken(token), generated=token)

    async def authenticate(self, authorization: str | None, query_token: str | None) -> Principal:
        if not self.enabled:
            return open_principal()
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() in ("bearer", "token") and value.strip():
                token = value.strip()
            else:
                raise AuthError("unsupported Authorization header", "not Bearer/token")
        elif query_token:
            token = query_token
        if not token:
            raise AuthError("authentication required", "no credentials")
        if self.oidc is not None and OIDCVerifier.looks_like_jwt(token):
            return await self.oidc.verify(token)
        if self.tokens is not None:
            principal = self.tokens.verify(token)
            if principal is not None:
                return principal
        raise AuthError("invalid token", "no such API token, or it expired")

    def describe(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "tokens": self.tokens is not None,
            "oidc": self.oidc.config.issuer if self.oidc is not None else None,
        }
