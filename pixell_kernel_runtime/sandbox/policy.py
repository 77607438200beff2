"""Operator policy: resource tiers, per-package rules, host scaling, per-session uids.

The operator's file (JSON, or YAML when the name ends in .yaml/.yml) -- never the package
manifest -- decides limits, network and data folders::

    {
      "default":  {"tier": "small", "network": false, "data_dirs": []},
      "packages": {"<package name or id>": {"tier": "large", "network": true,
                                             "data_dirs": ["/srv/data"]}},
      # optional:
      "tiers":  {"small": {"cpus": 1, "memory": "2G", "pids": 512}},
      "limits": {"nofile": 4096, "fsize": "1G", "cpu_seconds": 3600},
      "uids":   {"start": 200000, "count": 65536}
    }

A rule's ``tier`` is what a session gets by default; ``max_tier`` (default: ``tier``) caps
what a request may ask for with ``resource_tier`` 0/1/2 (small/medium/large). Tiers are scaled
down to the host (CPUs available to this process, 75 % of its memory).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
TIER_NAMES = ("small", "medium", "large")

# RLIMIT_DATA below ~1 GiB makes ipykernel fail to start.
MIN_DATA_BYTES = 1 * GiB


@dataclass(frozen=True)
class Tier:
    cpus: float
    memory: int
    pids: int = 512
    # The work tree's tmpfs (files and inodes) and /dev/shm; both count as the kernel's memory.
    disk: int = 256 * MiB
    inodes: int = 32768
    shm: int = 64 * MiB


DEFAULT_TIERS: dict[str, Tier] = {
    "small": Tier(cpus=1, memory=2 * GiB),
    "medium": Tier(cpus=2, memory=4 * GiB, disk=1 * GiB, inodes=131072, shm=256 * MiB),
    "large": Tier(cpus=4, memory=16 * GiB, pids=1024, disk=4 * GiB, inodes=524288, shm=1 * GiB),
}
# Subordinate id ranges (user namespaces of other users' containers): never ours to hand out.
SUBID_FILES = ("/etc/subuid", "/etc/subgid")


@dataclass(frozen=True)
class Rule:
    tier: str = "small"
    max_tier: str | None = None
    network: bool = False
    data_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    nofile: int = 4096
    fsize: int = 1 * GiB
    cpu_seconds: int | None = 3600


@dataclass
class OperatorConfig:
    default: Rule = field(default_factory=Rule)
    packages: dict[str, Rule] = field(default_factory=dict)
    tiers: dict[str, Tier] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    limits: Limits = field(default_factory=Limits)
    uid_start: int = 200000
    uid_count: int = 65536
    source: str | None = None


@dataclass(frozen=True)
class Resolved:
    """What one kernel gets."""

    tier: str
    cpus: float
    memory_bytes: int  # cgroup limit
    data_bytes: int  # RLIMIT_DATA: the graceful MemoryError, below the cgroup limit
    pids: int
    nofile: int
    fsize: int
    cpu_seconds: int | None
    network: bool
    data_dirs: tuple[str, ...]
    rule: str  # "default" or the matching package key
    disk_bytes: int = 256 * MiB
    inodes: int = 32768
    shm_bytes: int = 64 * MiB

    def as_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "data_bytes": self.data_bytes,
            "pids": self.pids,
            "nofile": self.nofile,
            "fsize": self.fsize,
            "cpu_seconds": self.cpu_seconds,
            "network": self.network,
            "data_dirs": list(self.data_dirs),
            "rule": self.rule,
            "disk_bytes": self.disk_bytes,
            "inodes": self.inodes,
            "shm_bytes": self.shm_bytes,
        }


class ConfigError(ValueError):
    pass


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _tier_name(value: Any, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(TIER_NAMES):
        return TIER_NAMES[value]
    if isinstance(value, str) and value in TIER_NAMES:
        return value
    raise ConfigError(f"{where}: tier must be one of {TIER_NAMES} or 0-2, got {value!r}")


def _rule(raw: Any, where: str, base: Rule) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - {"tier", "max_tier", "network", "data_dirs"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    rule = base
    if "tier" in raw:
        rule = replace(rule, tier=_tier_name(raw["tier"], where), max_tier=None)
    if "max_tier" in raw:
        rule = replace(rule, max_tier=_tier_name(raw["max_tier"], where))
    if "network" in raw:
        if not isinstance(raw["network"], bool):
            raise ConfigError(f"{where}: network must be true or false")
        rule = replace(rule, network=raw["network"])
    if "data_dirs" in raw:
        dirs = raw["data_dirs"] or []
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ConfigError(f"{where}: data_dirs must be a list of paths")
        for d in dirs:
            if not os.path.isabs(d):
                raise ConfigError(f"{where}: data dir {d!r} is not absolute")
        rule = replace(rule, data_dirs=tuple(os.path.normpath(d) for d in dirs))
    return rule


def load_config(path: Path | str | None) -> OperatorConfig:
    cfg = OperatorConfig()
    if path is None:
        return cfg
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text) if text.strip() else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top")
    unknown = set(raw) - {"default", "packages", "tiers", "limits", "uids"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    cfg.source = str(path)
    for name, spec in (raw.get("tiers") or {}).items():
        if name not in TIER_NAMES or not isinstance(spec, dict):
            raise ConfigError(f"{path}: tiers.{name}: unknown tier or not a mapping")
        base = cfg.tiers[name]
        unknown_keys = set(spec) - {"cpus", "memory", "pids", "disk", "inodes", "shm"}
        if unknown_keys:
            raise ConfigError(f"{path}: tiers.{name}: unknown keys {sorted(unknown_keys)}")
        cfg.tiers[name] = Tier(
            cpus=float(spec.get("cpus", base.cpus)),
            memory=parse_size(spec.get("memory", base.memory)),
            pids=int(spec.get("pids", base.pids)),
            disk=parse_size(spec.get("disk", base.disk)),
            inodes=int(spec.get("inodes", base.inodes)),
            shm=parse_size(spec.get("shm", base.shm)),
        )
    if "default" in raw:
        cfg.default = _rule(raw["default"], "default", Rule())
    for key, spec in (raw.get("packages") or {}).items():
        cfg.packages[str(key)] = _rule(spec, f"packages.{key}", cfg.default)
    lim = raw.get("limits") or {}
    if lim:
        cpu = lim.get("cpu_seconds", cfg.limits.cpu_seconds)
        cfg.limits = Limits(
            nofile=int(lim.get("nofile", cfg.limits.nofile)),
            fsize=parse_size(lim.get("fsize", cfg.limits.fsize)),
            cpu_seconds=None if cpu is None else int(cpu),
        )
    uids = raw.get("uids") or {}
    cfg.uid_start = int(uids.get("start", cfg.uid_start))
    cfg.uid_count = int(uids.get("count", cfg.uid_count))
    if cfg.uid_start < 1000 or cfg.uid_count < 1:
        raise ConfigError(f"{path}: uids.start must be >= 1000 and uids.count >= 1")
    return cfg


def host_resources() -> tuple[int, int]:
    """(CPUs this process may use, total memory bytes)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 4 * GiB
    return cpus, mem


def resolve(
    cfg: OperatorConfig,
    *,
    package_name: str | None,
    package_id: str | None,
    resource_tier: int | None = None,
    host: tuple[int, int] | None = None,
) -> Resolved:
    key = "default"
    rule = cfg.default
    for candidate in (package_id, package_name):
        if candidate and candidate in cfg.packages:
            key, rule = candidate, cfg.packages[candidate]
            break
    name = rule.tier
    cap = TIER_NAMES.index(rule.max_tier or rule.tier)
    if resource_tier is not None:
        try:
            asked = int(resource_tier)
        except (TypeError, ValueError):
            asked = TIER_NAMES.index(name)
        name = TIER_NAMES[max(0, min(asked, cap, len(TIER_NAMES) - 1))]
    tier = cfg.tiers[name]
    host_cpus, host_mem = host or host_resources()
    cpus = max(0.1, min(float(tier.cpus), float(host_cpus)))
    memory = max(MIN_DATA_BYTES + 256 * MiB, min(tier.memory, int(host_mem * 0.75)))
    data = max(MIN_DATA_BYTES, memory - max(256 * MiB, memory // 8))
    return Resolved(
        tier=name,
        cpus=cpus,
        memory_bytes=memory,
        data_bytes=data,
        pids=tier.pids,
        nofile=cfg.limits.nofile,
        fsize=cfg.limits.fsize,
        cpu_seconds=cfg.limits.cpu_seconds,
        network=rule.network,
        data_dirs=rule.data_dirs,
        rule=key,
        disk_bytes=tier.disk,
        inodes=tier.inodes,
        shm_bytes=tier.shm,
    )


def check_uid_range(start: int, count: int, files: tuple[str, ...] = SUBID_FILES) -> None:
    """Refuse a sandbox uid range that overlaps any subordinate id range on this host."""
    end = start + count
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read(1 << 20).splitlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read {path} to check the sandbox uid range: {exc}") from None
        for n, line in enumerate(lines, 1):
            parts = line.strip().split(":")
            if len(parts) != 3 or line.lstrip().startswith("#"):
                continue
            try:
                lo, size = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if lo < end and start < lo + size:
                raise ConfigError(
                    f"the sandbox uid range {start}-{end - 1} overlaps {path} line {n} "
                    f"({parts[0]}: {lo}-{lo + size - 1}); choose another range with the "
                    "sandbox config's uids.start/uids.count"
                )


def _uid_busy(uid: int) -> bool:
    """Does any process on the host run with this uid (real, effective or saved)?"""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                return True
        except OSError:
            continue
    return False


def default_lock_dir() -> str:
    for base in ("/run", tempfile.gettempdir()):
        if os.access(base, os.W_OK):
            return os.path.join(base, "pixell-kernel-runtime-uids")
    return os.path.join(tempfile.gettempdir(), "pixell-kernel-runtime-uids")


class UidPool:
    """One unprivileged uid per kernel, from [start, start + count), reused after release.

    Every allocated uid is also held with an ``flock`` on ``<lock_dir>/<uid>.lock`` so that
    several runtime processes on one host (sharing the range) never hand out the same uid; a
    dead process's locks vanish with it. A uid that still owns a process is skipped too.
    """

    def __init__(self, start: int, count: int, lock_dir: str | None = None) -> None:
        self.start = start
        self.count = count
        self.lock_dir = lock_dir or default_lock_dir()
        self._by_key: dict[str, int] = {}
        self._fds: dict[int, int] = {}
        self._free_hint = 0
        self._lock = threading.Lock()

    def _try_lock(self, uid: int) -> int | None:
        try:
            os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(self.lock_dir, f"{uid}.lock"),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError:
            return -1  # no lock dir: fall back to the in-process bookkeeping alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def allocate(self, key: str) -> int:
        with self._lock:
            if key in self._by_key:
                return self._by_key[key]
            used = set(self._by_key.values())
            for i in range(self.count):
                uid = self.start + (self._free_hint + i) % self.count
                if uid in used:
                    continue
                fd = self._try_lock(uid)
                if fd is None:
                    continue  # another runtime process holds it
                if _uid_busy(uid):
                    if fd >= 0:
                        os.close(fd)
                    continue
                self._by_key[key] = uid
                if fd >= 0:
                    self._fds[uid] = fd
                self._free_hint = (uid - self.start + 1) % self.count
                return uid
            raise RuntimeError("no free sandbox uid left in the configured range")

    def get(self, key: str) -> int | None:
        return self._by_key.get(key)

    def release(self, key: str) -> int | None:
        with self._lock:
            uid = self._by_key.pop(key, None)
            if uid is not None:
                fd = self._fds.pop(uid, None)
                if fd is not None:
                    os.close(fd)
                # Reuse the lowest uids first: fewer distinct owners in the kernel dirs.
                self._free_hint = min(self._free_hint, uid - self.start)
            return uid

    def in_use(self) -> dict[str, int]:
        return dict(self._by_key)
