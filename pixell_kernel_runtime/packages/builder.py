"""Build a reproducible APKG (plain ZIP, deflate) from an agent source folder.

The archive layout matches what the runtime's loader expects: ``agent.yaml`` at the root, POSIX
relative paths, no directory entries. Unlike ``pixell build`` (pixell-kit), this builder is
reproducible: entries are sorted, timestamps are fixed at 1980-01-01 00:00:00 and every entry has
mode 0o644, so the same tree always yields the same bytes (and the same SHA-256). It adds the
source tree as is: no ``.pixell/package.json``, ``setup.py``, ``deploy.json`` or ``dist/``.

Never follows symlinks (they are skipped with a warning) and never imports or runs package code.

CLI::

    python -m pixell_kernel_runtime.packages.builder SRC [SRC...] -o OUTDIR
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import yaml

__all__ = ["build_apkg", "main", "EXCLUDED_NAMES", "EXCLUDED_SUFFIXES"]

logger = logging.getLogger(__name__)

#: File or directory names never added, wherever they occur in the tree.
EXCLUDED_NAMES = frozenset({"__pycache__", ".git", ".venv", ".DS_Store"})
#: File name endings never added.
EXCLUDED_SUFFIXES = (".pyc",)

_SAFE_PART = re.compile(r"[A-Za-z0-9._-]+")
_FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644
_COMPRESS_LEVEL = 6
_MANIFEST = "agent.yaml"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def _check_part(field: str, value: object) -> str:
    """Return ``value`` if it is a string that is safe inside a file name, else raise."""
    if value is None or value == "":
        raise ValueError(f"agent.yaml: {field} is missing")
    if not isinstance(value, str):
        raise ValueError(
            f"agent.yaml: {field} must be a string, got {type(value).__name__} {value!r} "
            f'(quote it in YAML, e.g. "0.1.0")'
        )
    if not _SAFE_PART.fullmatch(value) or set(value) == {"."}:
        raise ValueError(
            f"agent.yaml: {field} {value!r} is unsafe for a file name "
            f"(only letters, digits, '.', '_' and '-' are allowed)"
        )
    return value


def _read_regular_file(path: Path) -> bytes:
    """Read a regular file without following a symlink at its last component."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_BINARY)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        return fh.read()


def _package_name_and_version(src_dir: Path) -> tuple[str, str]:
    manifest_path = src_dir / _MANIFEST
    if manifest_path.is_symlink():
        raise ValueError(f"{manifest_path}: agent.yaml must be a regular file, not a symlink")
    if not manifest_path.is_file():
        raise ValueError(f"{src_dir}: no agent.yaml at the top of the source folder")
    try:
        data = yaml.safe_load(_read_regular_file(manifest_path))
    except yaml.YAMLError as exc:
        raise ValueError(f"{manifest_path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{manifest_path}: agent.yaml must contain a mapping")

    name = _check_part("name", data.get("name"))
    metadata = data.get("metadata")
    version = None
    field = "version"
    if isinstance(metadata, dict) and metadata.get("version") not in (None, ""):
        version, field = metadata.get("version"), "metadata.version"
    else:
        version = data.get("version")
    if version in (None, ""):
        raise ValueError("agent.yaml: version is missing (set metadata.version or version)")
    return name, _check_part(field, version)


def _collect_files(src_dir: Path, skip: set[Path]) -> list[tuple[str, Path]]:
    """Return ``(arcname, path)`` for every regular file to archive, sorted by arcname."""
    entries: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(src_dir, followlinks=False):
        root_path = Path(root)
        kept_dirs = []
        for d in dirs:
            dir_path = root_path / d
            if d in EXCLUDED_NAMES:
                continue
            if dir_path.is_symlink():
                logger.warning(
                    "skipping symlinked directory %s (symlinks are never followed)", dir_path
                )
                continue
            kept_dirs.append(d)
        dirs[:] = sorted(kept_dirs)

        for f in files:
            file_path = root_path / f
            if f in EXCLUDED_NAMES or f.endswith(EXCLUDED_SUFFIXES):
                continue
            try:
                st = os.lstat(file_path)
            except OSError as exc:
                logger.warning("skipping %s: %s", file_path, exc)
                continue
            if stat.S_ISLNK(st.st_mode):
                logger.warning("skipping symlink %s (symlinks are never followed)", file_path)
                continue
            if not stat.S_ISREG(st.st_mode):
                logger.warning("skipping %s: not a regular file", file_path)
                continue
            if file_path.resolve() in skip:
                continue
            arcname = file_path.relative_to(src_dir).as_posix()
            entries.append((arcname, file_path))
    entries.sort(key=lambda e: e[0])
    return entries


def _zip_info(arcname: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_FIXED_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so external_attr carries the mode on every platform
    info.external_attr = (stat.S_IFREG | _FILE_MODE) << 16
    return info


def build_apkg(src_dir: Path, out_dir: Path) -> Path:
    """Build ``<out_dir>/<name>-<version>.apkg`` from the agent source folder ``src_dir``.

    ``name`` comes from agent.yaml, ``version`` from ``metadata.version`` or else the top-level
    ``version``; both must match ``[A-Za-z0-9._-]+`` (ValueError otherwise). Every regular file is
    added (POSIX relative paths, sorted, fixed timestamp, mode 0o644) except ``__pycache__``,
    ``*.pyc``, ``.git``, ``.venv`` and ``.DS_Store``; symlinks are skipped with a warning. The
    archive is written to a temporary file in ``out_dir`` and renamed into place. Returns its path.
    """
    src_dir = Path(src_dir)
    out_dir = Path(out_dir)
    if not src_dir.is_dir():
        raise ValueError(f"{src_dir}: not a directory")
    name, version = _package_name_and_version(src_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{name}-{version}.apkg"
    # Never archive the output itself when out_dir lies inside src_dir.
    entries = _collect_files(src_dir, skip={out_path.resolve()})

    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-{version}.", suffix=".tmp")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                for arcname, path in entries:
                    zf.writestr(
                        _zip_info(arcname),
                        _read_regular_file(path),
                        compresslevel=_COMPRESS_LEVEL,
                    )
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    logger.info("built %s (%d files)", out_path, len(entries))
    return out_path


def build_all(examples_dir: Path, out_dir: Path) -> list[Path]:
    """Build every folder of ``examples_dir`` that holds an agent.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        build_apkg(src, out_dir)
        for src in sorted(examples_dir.iterdir())
        if (src / "agent.yaml").is_file()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pixell_kernel_runtime.packages.builder",
        description="Build reproducible APKG archives from agent source folders.",
    )
    parser.add_argument("src", nargs="+", type=Path, metavar="SRC", help="agent source folder")
    parser.add_argument(
        "-o", "--out-dir", type=Path, default=Path("."), help="output folder (default: .)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    for src in args.src:
        try:
            path = build_apkg(src, args.out_dir)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
