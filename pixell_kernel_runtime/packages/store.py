"""Install, replace and unload packages atomically under the store directory.

Layout (all on one filesystem, so every publish step is a rename)::

    <store>/objects/<sha256>/record.json   what we know beyond the manifest
    <store>/objects/<sha256>/pkg/          the extracted package root (read-only use)
    <store>/ids/<name>@<version>           symlink -> ../objects/<sha256>
    <store>/.staging/, <store>/.incoming/  work in progress, wiped at start

A package is published by ``os.replace`` of its id symlink, which is atomic:
a reader sees the old package or the new one, never a half-written tree. The
manifest is parsed again from ``pkg/agent.yaml`` after a restart, so there is
one source of truth for what a package declares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pixell_kernel_runtime.config import ArchiveLimits
from pixell_kernel_runtime.errors import NotFound, PackageError
from pixell_kernel_runtime.packages import archive
from pixell_kernel_runtime.packages.manifest import Manifest, parse_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledPackage:
    manifest: Manifest
    sha256: str
    size: int
    loaded_at: str
    source: str
    root: Path
    warnings: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.manifest.package_id

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "id": self.id,
            "name": m.name,
            "version": m.version,
            "sha256": self.sha256,
            "size": self.size,
            "loaded_at": self.loaded_at,
            "source": self.source,
            "agents": [f"{self.id}/{e.name}" for e in m.exports],
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "warnings": list(self.warnings),
            "manifest": self.manifest.summary(),
        }


@dataclass(frozen=True)
class InstallResult:
    package: InstalledPackage
    status: str  # "installed" | "unchanged" | "replaced"
    previous: InstalledPackage | None = None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _list_files(root: Path) -> set[str]:
    names: set[str] = set()
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for f in files:
            names.add((rel / f).as_posix() if str(rel) != "." else f)
    return names


def _read_optional(root: Path, name: str, limit: int) -> bytes | None:
    path = root / name
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return fh.read(limit)


class PackageStore:
    """The set of installed packages, on disk and in memory."""

    def __init__(self, store_dir: Path, limits: ArchiveLimits) -> None:
        self.root = store_dir
        self.limits = limits
        self.objects = store_dir / "objects"
        self.ids = store_dir / "ids"
        self.staging = store_dir / ".staging"
        self.incoming = store_dir / ".incoming"
        self._packages: dict[str, InstalledPackage] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- queries -------------------------------------------------------

    def list(self) -> list[InstalledPackage]:
        return sorted(self._packages.values(), key=lambda p: p.id)

    def get(self, package_id: str) -> InstalledPackage:
        try:
            return self._packages[package_id]
        except KeyError:
            raise NotFound(f"Package not found: {package_id}", code="package_not_found") from None

    def find(self, package_id: str) -> InstalledPackage | None:
        return self._packages.get(package_id)

    # ---- start-up ------------------------------------------------------

    async def open(self) -> None:
        """Create the layout, wipe unfinished work and reload what was installed."""
        self._packages = await asyncio.to_thread(self._open_sync)
        log.info("package store %s: %d package(s) restored", self.root, len(self._packages))

    def _open_sync(self) -> dict[str, InstalledPackage]:
        for d in (self.root, self.objects, self.ids, self.staging, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for d in (self.staging, self.incoming):
            for child in d.iterdir():
                _rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
        packages: dict[str, InstalledPackage] = {}
        referenced: set[str] = set()
        for link in sorted(self.ids.iterdir()):
            if link.name.startswith(".tmp-"):
                link.unlink(missing_ok=True)
                continue
            try:
                target = os.readlink(link)
                sha = Path(target).name
                obj = self.objects / sha
                if Path(target).parent.name != "objects" or not obj.is_dir():
                    raise PackageError(f"dangling store link -> {target}")
                pkg = self._load_object(obj)
                if pkg.id != link.name:
                    raise PackageError(f"store link {link.name} points at {pkg.id}")
            except (OSError, PackageError, ValueError) as exc:
                log.error("skipping stored package %s: %s", link.name, exc)
                continue
            packages[pkg.id] = pkg
            referenced.add(pkg.sha256)
        for obj in self.objects.iterdir():
            if obj.name not in referenced:
                log.info("removing unreferenced package object %s", obj.name)
                _rmtree(obj)
        return packages

    def _load_object(self, obj: Path) -> InstalledPackage:
        record = json.loads((obj / "record.json").read_text(encoding="utf-8"))
        pkg_root = obj / "pkg"
        manifest = self._manifest_from_tree(pkg_root)
        return InstalledPackage(
            manifest=manifest,
            sha256=record["sha256"],
            size=int(record["size"]),
            loaded_at=record["loaded_at"],
            source=record["source"],
            root=pkg_root,
            warnings=tuple(record.get("warnings", ())),
        )

    def _manifest_from_tree(self, pkg_root: Path) -> Manifest:
        data = _read_optional(pkg_root, "agent.yaml", 1024 * 1024 + 1)
        if data is None:
            raise PackageError("agent.yaml missing from the stored package")
        return parse_manifest(
            data,
            _list_files(pkg_root),
            dotenv=_read_optional(pkg_root, ".env", 256 * 1024),
            package_json=_read_optional(pkg_root, ".pixell/package.json", 1024 * 1024),
        )

    # ---- install -------------------------------------------------------

    @contextmanager
    def incoming_file(self) -> Iterator[Path]:
        """A fresh path for an upload in progress, removed whatever happens."""
        path = self.incoming / f"{uuid.uuid4().hex}.apkg"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def install(
        self, path: Path, *, sha256: str | None, source: str, use_sidecar: bool = False
    ) -> InstallResult:
        """Validate, extract and publish the APKG at ``path``.

        Everything blocking runs in a worker thread; only the publish step
        holds the per-id lock, so loads of different packages never wait for
        each other.
        """
        staged_dir, manifest, digest, size, warnings = await asyncio.to_thread(
            self._stage, path, sha256, use_sidecar
        )
        try:
            lock = self._locks.setdefault(manifest.package_id, asyncio.Lock())
            async with lock:
                current = self._packages.get(manifest.package_id)
                if current is not None and current.sha256 == digest:
                    return InstallResult(current, "unchanged")
                pkg = InstalledPackage(
                    manifest=manifest,
                    sha256=digest,
                    size=size,
                    loaded_at=_now_iso(),
                    source=source,
                    root=self.objects / digest / "pkg",
                    warnings=warnings,
                )
                await asyncio.to_thread(self._publish, staged_dir, pkg)
                staged_dir = None
                self._packages[pkg.id] = pkg
                status = "installed" if current is None else "replaced"
                log.info("package %s %s (sha256 %s)", pkg.id, status, digest[:12])
                return InstallResult(pkg, status, current)
        finally:
            if staged_dir is not None:
                await asyncio.to_thread(_rmtree, staged_dir)

    def _stage(
        self, path: Path, expected: str | None, use_sidecar: bool
    ) -> tuple[Path, Manifest, str, int, tuple[str, ...]]:
        if not path.exists():
            raise PackageError(f"file not found: {path}", code="file_not_found")
        if not path.is_file():
            raise PackageError(f"not a regular file: {path}", code="file_not_found")
        sidecar = archive.read_sidecar_digest(path) if use_sidecar else None
        size = path.stat().st_size
        digest = archive.sha256_file(path)
        archive.check_digest(digest, expected, source="sha256 field")
        archive.check_digest(digest, sidecar, source=f"{path.name}.sha256")
        staged = self.staging / uuid.uuid4().hex
        staged.mkdir(mode=0o755)
        try:
            with archive.open_zip(path) as zf:
                listing = archive.inspect(zf, self.limits)
                names = listing.files
                if "agent.yaml" not in names:
                    raise PackageError(
                        "missing agent.yaml at the archive root", code="missing_manifest"
                    )
                manifest = parse_manifest(
                    archive.read_member(zf, "agent.yaml", 1024 * 1024),
                    names,
                    dotenv=archive.read_member(zf, ".env", 256 * 1024) if ".env" in names else None,
                    package_json=archive.read_member(zf, ".pixell/package.json", 1024 * 1024)
                    if ".pixell/package.json" in names
                    else None,
                )
                archive.extract(zf, listing, staged / "pkg", self.limits)
        # NotImplementedError and UnicodeDecodeError: what zipfile raises on
        # unsupported features and on a local header name that is not UTF-8.
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            NotImplementedError,
            UnicodeDecodeError,
        ) as exc:
            _rmtree(staged)
            raise PackageError(f"corrupt ZIP archive: {exc}", code="not_a_zip") from None
        except BaseException:
            _rmtree(staged)
            raise
        return staged, manifest, digest, size, manifest.warnings

    def _publish(self, staged: Path, pkg: InstalledPackage) -> None:
        record = {
            "id": pkg.id,
            "sha256": pkg.sha256,
            "size": pkg.size,
            "loaded_at": pkg.loaded_at,
            "source": pkg.source,
            "warnings": list(pkg.warnings),
        }
        (staged / "record.json").write_text(json.dumps(record), encoding="utf-8")
        os.chmod(staged, 0o755)
        obj = self.objects / pkg.sha256
        if obj.exists():
            # Left by an unload whose clean-up has not run yet; same bytes, so
            # replacing it is safe, and no published link points at it.
            _rmtree(obj)
        os.rename(staged, obj)
        tmp_link = self.ids / f".tmp-{uuid.uuid4().hex}"
        os.symlink(f"../objects/{pkg.sha256}", tmp_link)
        os.replace(tmp_link, self.ids / pkg.id)

    # ---- unload and clean-up ------------------------------------------

    async def unload(self, package_id: str) -> InstalledPackage:
        lock = self._locks.setdefault(package_id, asyncio.Lock())
        async with lock:
            pkg = self.get(package_id)
            await asyncio.to_thread((self.ids / package_id).unlink, True)
            del self._packages[package_id]
            log.info("package %s unloaded", package_id)
            return pkg

    async def discard(self, pkg: InstalledPackage) -> None:
        """Remove a package's files once nothing uses them any more."""
        # Under the id's lock: a concurrent install of the same bytes publishes
        # this very object, and must not have it removed under its feet.
        async with self._locks.setdefault(pkg.id, asyncio.Lock()):
            if any(p.sha256 == pkg.sha256 for p in self._packages.values()):
                return
            await asyncio.to_thread(_rmtree, self.objects / pkg.sha256)
