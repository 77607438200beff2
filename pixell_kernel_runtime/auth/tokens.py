"""API tokens: random secrets, kept only as SHA-256 hashes in the operator's tokens file.

The file (``AUTH_TOKENS_FILE``; YAML, or JSON by its ``.json`` name) is a list, or a mapping
with a ``tokens`` list, of entries::

    - {tenant: acme, name: ci, hash: "sha256:<64 hex>", scopes: [invoke, sessions],
       roles: [analyst], expires: "2027-01-01T00:00:00Z"}

It is re-read when its modification time or size changes (checked at most once a second), so
that ``token create`` and ``token revoke`` take effect without a restart. A token is never
logged, and never stored: what is presented is hashed once, then compared with every entry's
hash in constant time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from .principal import SCOPES, Principal, parse_scopes

log = logging.getLogger("pixell_kernel_runtime.auth")

TOKEN_BYTES = 32
RECHECK_SECONDS = 1.0


class TokensFileError(ValueError):
    pass


@dataclass(frozen=True)
class TokenEntry:
    tenant: str
    name: str
    digest: bytes  # sha256 of the token
    scopes: frozenset[str]
    roles: frozenset[str]
    expires: float | None

    def public(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "roles": sorted(self.roles),
            "expires": _iso(self.expires) if self.expires else None,
        }


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_token() -> str:
    return "pkr_" + secrets.token_urlsafe(TOKEN_BYTES)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _expiry(raw: Any, where: str) -> float | None:
    if raw in (None, ""):
        return None
    if isinstance(raw, datetime):
        return (raw if raw.tzinfo else raw.replace(tzinfo=UTC)).timestamp()
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    try:
        dt = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise TokensFileError(f"{where}: expires is not an ISO date: {raw!r}") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _entries(doc: Any, source: str) -> list[TokenEntry]:
    items = doc.get("tokens", []) if isinstance(doc, dict) else doc
    if items is None:
        return []
    if not isinstance(items, list):
        raise TokensFileError(f"{source}: expected a list of tokens")
    out: list[TokenEntry] = []
    for i, item in enumerate(items):
        where = f"{source}: entry {i + 1}"
        if not isinstance(item, dict):
            raise TokensFileError(f"{where}: expected a mapping")
        tenant, name, raw_hash = item.get("tenant"), item.get("name"), item.get("hash")
        if not isinstance(tenant, str) or not tenant or not isinstance(name, str) or not name:
            raise TokensFileError(f"{where}: tenant and name are required strings")
        if not isinstance(raw_hash, str) or not raw_hash.startswith("sha256:"):
            raise TokensFileError(f"{where}: hash must be 'sha256:<64 hex digits>'")
        try:
            digest = bytes.fromhex(raw_hash.removeprefix("sha256:"))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokensFileError(f"{where}: hash must be 'sha256:<64 hex digits>'")
        unknown = {str(s) for s in item.get("scopes") or []} - set(SCOPES)
        if unknown:
            raise TokensFileError(f"{where}: unknown scopes {sorted(unknown)}")
        out.append(
            TokenEntry(
                tenant=tenant,
                name=name,
                digest=digest,
                scopes=parse_scopes(item.get("scopes") or []),
                roles=frozenset(str(r) for r in item.get("roles") or []),
                expires=_expiry(item.get("expires"), where),
            )
        )
    return out


def read_file(path: Path) -> tuple[list[TokenEntry], Any]:
    """Entries and the raw document (kept for rewriting)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    if path.suffix.lower() == ".json":
        doc = json.loads(text) if text.strip() else []
    else:
        doc = yaml.safe_load(text) or []
    return _entries(doc, str(path)), doc


class TokenStore:
    """The tokens file, re-read when it changes; verifies presented tokens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: list[TokenEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.reload(force=True)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if not force and stamp == self._stamp:
                return
            try:
                entries, _doc = read_file(self.path)
            except (TokensFileError, ValueError, yaml.YAMLError) as exc:
                if force:
                    raise TokensFileError(str(exc)) from None
                # A half-edited file must not lock everyone out, nor let anyone in.
                log.error(
                    "tokens file %s not reloaded (keeping the previous one): %s", self.path, exc
                )
                return
            self._entries, self._stamp = entries, stamp
            log.info("tokens file %s: %d token(s)", self.path, len(entries))

    def verify(self, token: str) -> Principal | None:
        self.reload()
        digest = hash_token(token)
        match: TokenEntry | None = None
        for entry in self._entries:
            # Every entry is compared, whatever matched: the time does not tell which.
            if hmac.compare_digest(entry.digest, digest):
                match = entry
        if match is None:
            return None
        if match.expires is not None and time.time() >= match.expires:
            return None
        return Principal(match.tenant, match.name, match.scopes, match.roles, via="token")

    def entries(self) -> list[TokenEntry]:
        self.reload(force=True)
        return list(self._entries)


# ---- the `token` command's edits (atomic rewrites of the file) ---------------------------


def _write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if path.suffix.lower() == ".json":
                json.dump(doc, fh, indent=1)
            else:
                yaml.safe_dump(doc, fh, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _items(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        return doc.setdefault("tokens", [])
    return doc if isinstance(doc, list) else []


def create(
    path: Path,
    *,
    tenant: str,
    name: str,
    scopes: list[str],
    roles: list[str] | None = None,
    expires: str | None = None,
) -> str:
    """Append a new token's hash to the file; return the token (shown once, never stored)."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise TokensFileError(f"unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise TokensFileError("give at least one scope")
    entries, doc = read_file(path)
    if any(e.tenant == tenant and e.name == name for e in entries):
        raise TokensFileError(f"tenant {tenant} already has a token named {name}")
    _expiry(expires, "--expires")
    token = new_token()
    items = _items(doc)
    if not isinstance(doc, dict | list):
        doc = items
    entry: dict[str, Any] = {
        "tenant": tenant,
        "name": name,
        "hash": "sha256:" + hash_token(token).hex(),
        "scopes": sorted(set(scopes)),
    }
    if roles:
        entry["roles"] = sorted(set(roles))
    if expires:
        entry["expires"] = expires
    items.append(entry)
    _write(path, doc if isinstance(doc, dict) else items)
    return token


def revoke(path: Path, *, tenant: str, name: str) -> bool:
    _entries_, doc = read_file(path)
    items = _items(doc)
    keep = [i for i in items if not (i.get("tenant") == tenant and i.get("name") == name)]
    if len(keep) == len(items):
        return False
    if isinstance(doc, dict):
        doc["tokens"] = keep
        _write(path, doc)
    else:
        _write(path, keep)
    return True
