"""Safe reading of an APKG (a ZIP): limits, entry-name checks, digests, extraction.

Everything here is blocking and meant to run in a worker thread. Nothing in an
archive is trusted: names are checked before anything is written, sizes are
counted while reading (the central directory may lie), and extraction writes
only regular files below one fresh directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pixell_kernel_runtime.config import ArchiveLimits
from pixell_kernel_runtime.errors import PackageError

_CHUNK = 1024 * 1024
# Ratios are judged only past this size: a tiny, highly compressible file (an
# empty __init__.py, a YAML of spaces) is normal and harmless.
_RATIO_FLOOR_BYTES = 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_WINDOWS_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# Longer names cannot be created on common filesystems (NAME_MAX 255) and would
# fail at extraction with an OSError instead of a clear refusal.
_MAX_PART_BYTES = 255
_MAX_NAME_BYTES = 1024


@dataclass(frozen=True)
class Entry:
    name: str  # normalised POSIX path, no trailing slash
    is_dir: bool
    size: int
    compressed_size: int


@dataclass(frozen=True)
class Listing:
    entries: tuple[Entry, ...]
    total_size: int

    @property
    def files(self) -> set[str]:
        return {e.name for e in self.entries if not e.is_dir}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_digest(value: str, *, field: str = "sha256") -> str:
    value = value.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    if not _SHA256_RE.match(value):
        raise PackageError(
            f"field {field} must be 64 hexadecimal characters (a SHA-256 digest)",
            code="invalid_digest",
        )
    return value


def read_sidecar_digest(path: Path) -> str | None:
    """The digest in ``<path>.sha256`` (sha256sum format), if that file exists."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_text(encoding="utf-8", errors="strict")[:4096]
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"cannot read digest sidecar {sidecar.name}: {exc}") from None
    first = text.strip().split()
    if not first:
        raise PackageError(f"digest sidecar {sidecar.name} is empty", code="invalid_digest")
    return normalise_digest(first[0], field=sidecar.name)


def check_digest(actual: str, expected: str | None, *, source: str) -> None:
    if expected is not None and actual != expected:
        raise PackageError(
            f"SHA-256 mismatch ({source}): expected {expected}, archive is {actual}",
            code="digest_mismatch",
        )


def _sniff_not_zip(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x1f\x8b"):
        return "not a ZIP archive: this is a gzip file (a tar.gz is not an APKG; build it as a ZIP)"
    if len(head) == 0:
        return "not a ZIP archive: the file is empty"
    return "not a ZIP archive (an APKG is a ZIP with agent.yaml at its root)"


def open_zip(path: Path) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        raise PackageError(_sniff_not_zip(path), code="not_a_zip")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise PackageError(f"not a readable ZIP archive: {exc}", code="not_a_zip") from None


def _check_name(raw: str) -> str:
    """Return the normalised name of an entry, or refuse it."""
    shown = raw.encode("unicode_escape").decode("ascii")
    if not raw or "\x00" in raw:
        raise PackageError(f"unsafe entry {shown!r}: empty name or NUL byte", code="unsafe_entry")
    if "\\" in raw:
        raise PackageError(f"unsafe entry {shown!r}: backslash in the path", code="unsafe_entry")
    if raw.startswith("/") or _WINDOWS_DRIVE_RE.match(raw):
        raise PackageError(f"unsafe entry {shown!r}: absolute path", code="unsafe_entry")
    parts = raw.rstrip("/").split("/")
    if len(raw.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        raise PackageError(
            f"unsafe entry {shown[:80]!r}...: name too long (over {_MAX_NAME_BYTES} bytes)",
            code="unsafe_entry",
        )
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_PART_BYTES:
            raise PackageError(
                f"unsafe entry {shown!r}: path component too long (over {_MAX_PART_BYTES} bytes)",
                code="unsafe_entry",
            )
        if part == "..":
            raise PackageError(f"unsafe entry {shown!r}: '..' component", code="unsafe_entry")
        if part in ("", "."):
            raise PackageError(
                f"unsafe entry {shown!r}: empty or '.' path component", code="unsafe_entry"
            )
        if any(ord(c) < 32 for c in part):
            raise PackageError(
                f"unsafe entry {shown!r}: control character in the name", code="unsafe_entry"
            )
    return str(PurePosixPath(*parts))


def _check_type(info: zipfile.ZipInfo, name: str) -> None:
    mode = info.external_attr >> 16
    # Only Unix-made archives carry a file type; others are plain files or dirs.
    if info.create_system == 3 and mode:
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise PackageError(f"unsafe entry {name!r}: symbolic link", code="unsafe_entry")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise PackageError(
                f"unsafe entry {name!r}: special file (device, FIFO or socket)",
                code="unsafe_entry",
            )
    if info.flag_bits & 0x41:  # bit 0: encrypted, bit 6: strong encryption
        raise PackageError(f"unsupported entry {name!r}: encrypted", code="unsafe_entry")
    if info.flag_bits & 0x20:  # zipfile raises NotImplementedError on reading it
        raise PackageError(
            f"unsupported entry {name!r}: compressed patched data", code="unsafe_entry"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PackageError(
            f"unsupported entry {name!r}: compression method {info.compress_type}"
            " (only stored and deflate are accepted)",
            code="unsafe_entry",
        )


def inspect(zf: zipfile.ZipFile, limits: ArchiveLimits) -> Listing:
    """Check every entry's name, type and declared size before anything is extracted."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise PackageError(
            f"too many entries: {len(infos)} (the limit is {limits.max_entries})",
            code="archive_too_large",
        )
    seen: dict[str, bool] = {}
    seen_folded: dict[str, str] = {}
    entries: list[Entry] = []
    total = 0
    for info in infos:
        name = _check_name(info.filename)
        is_dir = info.filename.endswith("/")
        _check_type(info, name)
        if name in seen:
            if is_dir and seen[name]:
                continue  # a repeated directory entry writes nothing twice
            raise PackageError(f"duplicate entry {name!r}", code="duplicate_entry")
        # Two names that differ only in case collide on case-insensitive disks.
        folded = name.casefold()
        if folded in seen_folded and not is_dir:
            raise PackageError(
                f"duplicate entry {name!r} (collides with {seen_folded[folded]!r})",
                code="duplicate_entry",
            )
        seen[name] = is_dir
        seen_folded.setdefault(folded, name)
        if is_dir:
            entries.append(Entry(name, True, 0, 0))
            continue
        if info.file_size > limits.max_entry_bytes:
            raise PackageError(
                f"entry {name!r} is too large: {info.file_size} bytes uncompressed"
                f" (the limit is {limits.max_entry_bytes})",
                code="archive_too_large",
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise PackageError(
                f"archive too large: more than {limits.max_total_bytes} bytes uncompressed"
                f" (reached at entry {name!r})",
                code="archive_too_large",
            )
        if info.file_size > _RATIO_FLOOR_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise PackageError(
                    f"entry {name!r} has a compression ratio of {ratio:.0f}:1, typical of a"
                    f" zip bomb (the limit is {limits.max_ratio:.0f}:1)",
                    code="zip_bomb",
                )
        entries.append(Entry(name, False, info.file_size, info.compress_size))
    # A file may not also be a directory (a/ and a/b as well as a file a).
    files = {e.name for e in entries if not e.is_dir}
    for e in entries:
        parent = PurePosixPath(e.name).parent
        while str(parent) != ".":
            if str(parent) in files:
                raise PackageError(
                    f"duplicate entry {str(parent)!r}: both a file and a directory",
                    code="duplicate_entry",
                )
            parent = parent.parent
    return Listing(tuple(entries), total)


def read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    with zf.open(name) as src:
        data = src.read(limit + 1)
    if len(data) > limit:
        raise PackageError(f"{name} is too large (over {limit} bytes)", code="archive_too_large")
    return data


def extract(zf: zipfile.ZipFile, listing: Listing, dest: Path, limits: ArchiveLimits) -> None:
    """Write the listed entries below ``dest`` (which must exist and be empty).

    Sizes are enforced on the bytes actually inflated, so a central directory
    that under-declares sizes cannot slip past the limits.
    """
    dest_fd_root = dest.resolve()
    total = 0
    for entry in listing.entries:
        target = dest_fd_root.joinpath(*entry.name.split("/"))
        # Names were checked already; this guards the invariant, not the input.
        if dest_fd_root not in target.parents:
            raise PackageError(f"unsafe entry {entry.name!r}", code="unsafe_entry")
        if entry.is_dir:
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        written = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out, zf.open(entry.name) as src:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                total += len(chunk)
                if written > entry.size or written > limits.max_entry_bytes:
                    raise PackageError(
                        f"entry {entry.name!r} inflates past its declared size", code="zip_bomb"
                    )
                if total > limits.max_total_bytes:
                    raise PackageError(
                        f"archive too large: more than {limits.max_total_bytes} bytes uncompressed",
                        code="archive_too_large",
                    )
                out.write(chunk)
    # Directories get a fixed, world-readable mode so that an unprivileged
    # sandboxed kernel can read the package.
    for root, dirs, _files in os.walk(dest_fd_root):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
