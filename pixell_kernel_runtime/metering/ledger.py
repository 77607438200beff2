"""The usage ledger: one SQLite file (WAL), one row per finished execution.

Durability: the recorder commits with ``synchronous=NORMAL`` (WAL), so a committed row is in the
OS's page cache at once and survives a crash of the server; it checkpoints (fsyncs the WAL)
within a second after, for a crash of the host. Idempotency: the execution id is the primary
key and rows are written with ``INSERT OR IGNORE``: writing a record twice keeps the first.

``sent`` records which executions went to which meter (``stripe_export``), so that an export
that stopped half way resumes where it stopped. Every function here is blocking: the server
calls them from its metering thread or through ``asyncio.to_thread``, never on the loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    execution_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    agent_id TEXT,
    package_id TEXT,
    package_name TEXT,
    session_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    ended REAL NOT NULL,
    wall_seconds REAL NOT NULL,
    cpu_seconds REAL,
    cpu_source TEXT NOT NULL,
    cpu_complete INTEGER NOT NULL,
    kernels_started INTEGER NOT NULL,
    peak_rss_bytes INTEGER,
    rss_source TEXT NOT NULL,
    output_bytes INTEGER NOT NULL,
    recorded REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_ended ON usage (ended);
CREATE INDEX IF NOT EXISTS usage_tenant_ended ON usage (tenant, ended);
CREATE TABLE IF NOT EXISTS sent (
    execution_id TEXT NOT NULL,
    event_name TEXT NOT NULL,
    value TEXT NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (execution_id, event_name)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class UsageRecord:
    """One execution's usage, as the ledger stores it (the column order of ``usage``)."""

    execution_id: str
    tenant: str
    subject: str
    agent_id: str | None  # None for a Jupyter notebook cell
    package_id: str | None
    package_name: str | None
    session_key: str
    session_id: str
    kind: str
    status: str  # the execution's final state: done, error, timeout, cancelled, kernel_died
    created: float  # epoch seconds
    started: float | None  # None: it never ran (cancelled while queued)
    ended: float
    wall_seconds: float  # ended - started
    cpu_seconds: float | None  # kernel CPU during the call; None: could not be read
    cpu_source: str  # probe.CGROUP, probe.PROC or probe.NONE
    cpu_complete: bool  # False: a kernel ended mid-call, its last second may be missing
    kernels_started: int  # kernels started during the call (their start-up CPU is counted)
    peak_rss_bytes: int | None
    rss_source: str  # probe.PEAK_CALL, probe.PEAK_KERNEL or probe.SAMPLED
    output_bytes: int
    recorded: float

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


COLUMNS = tuple(f.name for f in fields(UsageRecord))
_INSERT = (
    f"INSERT OR IGNORE INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)
# What GET /runtime/usage may group by: API name -> SQL expression (a fixed set: nothing a
# client sends reaches the SQL text).
GROUPS = {
    "tenant": "tenant",
    "agent": "agent_id",
    "package": "package_id",
    "day": "strftime('%Y-%m-%d', ended, 'unixepoch')",
    "status": "status",
    "kind": "kind",
    "subject": "subject",
}
DEFAULT_GROUPS = ("tenant", "agent", "day")


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MIN_TS = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_TS = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def parse_bound(text: str, *, end: bool = False) -> float:
    """A period bound (``from``/``to``) as epoch seconds. An ISO date is a whole UTC day: as
    a start its midnight, as an end the next midnight (the day is included); an ISO datetime
    is that instant (UTC unless it names its offset). Raises ValueError."""
    text = text.strip()
    try:
        if _DATE.match(text):
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return (day + timedelta(days=1) if end else day).timestamp()
        if len(text) > 40 or not ("T" in text.upper() or " " in text):
            raise ValueError("expected YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][Z|±HH:MM]")
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ts = moment.timestamp()
        if not _MIN_TS <= ts <= _MAX_TS:  # its offset moved it out of datetime's years
            raise ValueError("out of range")
        return ts
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 date or datetime ({exc})") from None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _create_private(path: Path) -> None:
    """The ledger file, owner-only (SQLite gives its -wal and -shm files the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _create_private(self.path)
        with contextlib.closing(self.connect()) as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"metering ledger {self.path}: WAL mode refused ({mode})")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
                conn.commit()
            elif row[0] != str(SCHEMA_VERSION):
                raise RuntimeError(
                    f"metering ledger {self.path}: schema version {row[0]}, this runtime "
                    f"knows {SCHEMA_VERSION}"
                )

    def connect(self, *, synchronous: str = "FULL") -> sqlite3.Connection:
        """A new connection for the calling thread (SQLite connections are not shared)."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level="DEFERRED")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    # ---- writing (the metering thread) ----------------------------------

    @staticmethod
    def insert(conn: sqlite3.Connection, records: list[UsageRecord]) -> int:
        """Write ``records`` in one transaction; those already there are kept as they are.
        Returns how many were new."""
        before = conn.total_changes
        with conn:
            conn.executemany(_INSERT, [astuple(r) for r in records])
        return conn.total_changes - before

    # ---- reading --------------------------------------------------------

    def count(self) -> int:
        with contextlib.closing(self.connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])

    def get(self, execution_id: str) -> UsageRecord | None:
        with contextlib.closing(self.connect()) as conn:
            row = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM usage WHERE execution_id = ?", (execution_id,)
            ).fetchone()
        return _record(row) if row else None

    def records(self, start: float, end: float, *, ran_only: bool = False) -> Iterator[UsageRecord]:
        """Records that ended in ``[start, end)``, oldest first."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE ended >= ? AND ended < ?"
        if ran_only:
            sql += " AND started IS NOT NULL"
        with contextlib.closing(self.connect()) as conn:
            for row in conn.execute(sql + " ORDER BY ended, execution_id", (start, end)):
                yield _record(row)

    def summary(
        self,
        *,
        tenant: str | None,
        start: float | None,
        end: float | None,
        group_by: tuple[str, ...] = DEFAULT_GROUPS,
        agent: str | None = None,
        max_rows: int = 10_000,
    ) -> dict[str, Any]:
        """Aggregates of the records that ended in ``[start, end)`` (None: unbounded), of one
        tenant (None: every tenant), grouped by ``group_by`` (names of ``GROUPS``)."""
        where, args = ["1"], []
        for clause, value in (
            ("ended >= ?", start),
            ("ended < ?", end),
            ("tenant = ?", tenant),
            ("agent_id = ?", agent),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        measures = (
            "COUNT(*), COALESCE(SUM(wall_seconds), 0), COALESCE(SUM(cpu_seconds), 0), "
            "SUM(cpu_seconds IS NULL), MAX(peak_rss_bytes), COALESCE(SUM(output_bytes), 0), "
            "SUM(status != 'done')"
        )
        exprs = [GROUPS[g] for g in group_by]
        cond = " AND ".join(where)
        head = ", ".join([*exprs, measures])
        sql = f"SELECT {head} FROM usage WHERE {cond}"
        if exprs:
            order = ", ".join(str(i + 1) for i in range(len(exprs)))
            sql += f" GROUP BY {order} ORDER BY {order}"
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute(sql + " LIMIT ?", (*args, max_rows + 1)).fetchall()
            total = conn.execute(f"SELECT {measures} FROM usage WHERE {cond}", args).fetchone()
        out_rows = []
        for row in rows[:max_rows]:
            keys = dict(zip(group_by, row[: len(exprs)], strict=True))
            out_rows.append({**keys, **_measures(row[len(exprs) :])})
        return {"rows": out_rows, "totals": _measures(total), "truncated": len(rows) > max_rows}

    # ---- what was sent where (stripe_export) ----------------------------

    def sent_ids(self, event_name: str) -> set[str]:
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute("SELECT execution_id FROM sent WHERE event_name = ?", (event_name,))
            return {r[0] for r in rows}

    @staticmethod
    def mark_sent(conn: sqlite3.Connection, execution_id: str, event_name: str, value: str) -> None:
        with conn:
            conn.execute(
                "INSERT OR IGNORE INTO sent VALUES (?, ?, ?, ?)",
                (execution_id, event_name, value, time.time()),
            )


def _record(row: tuple[Any, ...]) -> UsageRecord:
    doc = dict(zip(COLUMNS, row, strict=True))
    doc["cpu_complete"] = bool(doc["cpu_complete"])
    return UsageRecord(**doc)


def _measures(row: tuple[Any, ...]) -> dict[str, Any]:
    count, wall, cpu, unmeasured, peak, out_bytes, not_done = row
    return {
        "executions": int(count or 0),
        "wall_seconds": round(float(wall or 0.0), 6),
        "cpu_seconds": round(float(cpu or 0.0), 6),
        "cpu_unmeasured": int(unmeasured or 0),
        "peak_rss_bytes": int(peak) if peak is not None else None,
        "output_bytes": int(out_bytes or 0),
        "not_done": int(not_done or 0),
    }
