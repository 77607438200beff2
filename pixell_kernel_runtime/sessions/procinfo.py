"""Process facts read from /proc: the resident memory of a kernel and its children."""

from __future__ import annotations

import os


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except (OSError, ValueError):
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(pid: int, limit: int = 256) -> int:
    """RSS of ``pid`` and its descendants (the launcher, bwrap and the kernel itself)."""
    total, stack, seen = 0, [pid], set()
    while stack and len(seen) < limit:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss(p)
        stack.extend(_children(p))
    return total


def tree_pids(pid: int, limit: int = 1024) -> list[int]:
    seen: list[int] = []
    stack = [pid]
    while stack and len(seen) < limit:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(_children(p))
    return seen
