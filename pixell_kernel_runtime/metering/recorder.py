"""Execution hooks -> usage records, through one thread that probes and writes.

The hooks run on the event loop and only append to a bounded in-memory queue (never a file, a
lock held by I/O, or a wait). One thread takes the queue in order: a ``start`` reads the
session's kernel CPU and resets its peak memory; a ``finish`` reads them again and becomes a
usage record; records are committed in batches. While calls run, the thread also reads their
kernels once a second, so that a kernel killed mid-call (a timeout's restart, an out-of-memory
kill) loses at most that second of CPU.

Order is what keeps CPU from being counted twice: a session runs one call at a time, and its
``finish`` is handled before the next call's ``start``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pixell_kernel_runtime.metering import probe
from pixell_kernel_runtime.metering.ledger import Ledger, UsageRecord

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
BATCH = 500
SAMPLE_SECONDS = 0.5
SYNC_SECONDS = 1.0
RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Finished:
    """What the ``finished`` hook copies off an execution (on the loop)."""

    execution_id: str
    tenant: str
    subject: str
    agent_id: str | None
    package_id: str | None
    package_name: str | None
    session_key: str
    session_id: str
    kind: str
    status: str
    created: float
    started: float | None
    ended: float
    output_bytes: int


@dataclass
class _Kernel:
    # Its CPU when the call began (0 for one started during the call; None until a reading
    # of the kernel the call started on succeeds).
    base: float | None
    last: float | None
    peak: probe.PeakWatch | None
    # Started during the call: its whole life (and its peak) is the call's.
    born_in_call: bool
    peak_max: int | None = None

    @property
    def peak_is_calls(self) -> bool:
        return self.born_in_call or (self.peak is not None and self.peak.reset)


@dataclass
class _Call:
    session: Any
    kernels: dict[str, _Kernel] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)
    rss_max: int = 0
    started_kernels: int = 0

    def see(self, target: probe.Target | None, *, first: bool) -> None:
        if target is None:
            return
        kernel = self.kernels.get(target.key)
        if kernel is None:
            # The kernel the call starts on: its peak is reset now. One seen later was started
            # during the call (the first call of a session, a restart): it is counted whole.
            peak = probe.PeakWatch.start(target, reset=first)
            reading = probe.read(target, peak)
            base = reading.cpu_seconds if first else 0.0
            kernel = self.kernels[target.key] = _Kernel(base, None, peak, born_in_call=not first)
            self.started_kernels += 0 if first else 1
        else:
            reading = probe.read(target, kernel.peak)
        if reading.cpu_seconds is not None:
            if kernel.base is None:
                kernel.base = reading.cpu_seconds
            kernel.last = reading.cpu_seconds
            self.sources.add(reading.cpu_source)
        if reading.peak_bytes is not None:
            kernel.peak_max = max(kernel.peak_max or 0, reading.peak_bytes)
        self.rss_max = max(self.rss_max, reading.rss_bytes or 0)

    def totals(self, current: str | None) -> tuple[Any, ...]:
        """cpu, cpu source, complete, kernels started, peak, peak source."""
        kernels = list(self.kernels.values())
        cpu = None
        read = [k for k in kernels if k.last is not None and k.base is not None]
        if read:
            cpu = sum(max(0.0, (k.last or 0.0) - (k.base or 0.0)) for k in read)
        # A kernel of the call that is not the session's kernel at its end ended mid-call: what
        # it used after its last reading (the sampling interval) is not known. None seen: a
        # kernel that started and died between two readings, or none could start.
        complete = bool(self.kernels) and all(key == current for key in self.kernels)
        source = next((s for s in (probe.CGROUP, probe.PROC) if s in self.sources), probe.NONE)
        peaks = [k.peak_max for k in kernels]
        if peaks and None not in peaks:
            whole = all(k.peak_is_calls for k in kernels)
            peak_source = probe.PEAK_CALL if whole else probe.PEAK_KERNEL
            return cpu, source, complete, self.started_kernels, max(peaks), peak_source
        known = [p for p in peaks if p is not None]
        peak = max([self.rss_max, *known]) or None
        return cpu, source, complete, self.started_kernels, peak, probe.SAMPLED

    def close(self) -> None:
        for kernel in self.kernels.values():
            if kernel.peak is not None:
                kernel.peak.close()


class Recorder:
    def __init__(
        self,
        ledger: Ledger,
        *,
        queue_size: int = QUEUE_SIZE,
        sample_seconds: float = SAMPLE_SECONDS,
    ) -> None:
        self.ledger = ledger
        self.queue_size = queue_size
        self.sample_seconds = sample_seconds
        self._cond = threading.Condition()
        self._queue: deque[tuple[float, str, Any]] = deque()
        self._in_flight: float | None = None  # when the oldest item being handled was queued
        self._accepted = 0
        self._handled = 0
        self._closing = False
        self.dropped = 0
        self.written = 0
        self.write_errors = 0
        self.lost = 0
        self._calls: dict[str, _Call] = {}  # the thread's own
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._main, name="pkr-metering", daemon=True)
        self._thread.start()

    # ---- the loop's side: enqueue only ----------------------------------

    def post(self, kind: str, item: Any) -> bool:
        with self._cond:
            if self._closing or len(self._queue) >= self.queue_size:
                self.dropped += 1
                dropped = True
            else:
                self._queue.append((time.monotonic(), kind, item))
                self._accepted += 1
                self._cond.notify()
                dropped = False
        if dropped:
            log.error("metering: queue full or closed, usage of %s dropped", _id(kind, item))
        return not dropped

    def lag(self) -> dict[str, Any]:
        with self._cond:
            oldest = self._in_flight if self._in_flight is not None else None
            if oldest is None and self._queue:
                oldest = self._queue[0][0]
            return {
                "queued": self._accepted - self._handled,
                "oldest_seconds": round(time.monotonic() - oldest, 6) if oldest else 0.0,
                "dropped": self.dropped,
                "written": self.written,
                "write_errors": self.write_errors,
                "lost": self.lost,
            }

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued before this call is committed (or ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            while self._handled < target and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return self._handled >= target

    def close(self, timeout: float | None = 30.0) -> bool:
        """Drain the queue, stop the thread. Returns False if it did not end in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the thread -----------------------------------------------------

    def _next_wake(self, next_sample: float, next_sync: float | None) -> float | None:
        """Seconds until the thread has something to do without a new item (None: nothing)."""
        due = [t for t in (next_sample if self._calls else None, next_sync) if t is not None]
        return min(due) - time.monotonic() if due else None

    def _main(self) -> None:
        next_sample = time.monotonic() + self.sample_seconds
        next_sync: float | None = None  # set while commits are not yet synced to the disk
        try:
            # Commits need not wait for the disk (WAL, synchronous=NORMAL): a committed row is
            # in the OS's cache, which a crash of the server does not lose. The WAL is synced
            # (a checkpoint) within SYNC_SECONDS after, for a crash of the host.
            self._conn = self.ledger.connect(synchronous="NORMAL")
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        wait = self._next_wake(next_sample, next_sync)
                        if wait is not None and wait <= 0:
                            break
                        self._cond.wait(wait)
                    if self._closing and not self._queue:
                        break
                    batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                    self._in_flight = batch[0][0] if batch else None
                records = [r for r in map(self._handle, batch) if r is not None]
                now = time.monotonic()
                if now >= next_sample:
                    self._sample()
                    next_sample = now + self.sample_seconds
                if records:
                    self._write(records)
                    next_sync = next_sync or now + SYNC_SECONDS
                if next_sync is not None and now >= next_sync:
                    self._sync()
                    next_sync = None
                with self._cond:
                    self._handled += len(batch)
                    self._in_flight = None
                    self._cond.notify_all()
            self._sync()
        except BaseException:  # noqa: BLE001 - said loudly; flush() then stops waiting
            log.exception("metering: the recorder thread failed; usage is no longer recorded")
        finally:
            for call in self._calls.values():
                call.close()
            if self._conn is not None:
                self._conn.close()
            with self._cond:
                self._cond.notify_all()

    def _sync(self) -> None:
        """Write the WAL's commits through to the disk (a passive checkpoint fsyncs it)."""
        assert self._conn is not None
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # a reader holds the WAL: the next one catches up
            log.warning("metering: checkpoint failed (%s)", exc)

    def _handle(self, item: tuple[float, str, Any]) -> UsageRecord | None:
        _, kind, payload = item
        try:
            if kind == "start":
                execution_id, session, target = payload
                call = self._calls[execution_id] = _Call(session)
                call.see(target, first=True)
                return None
            return self._finish(payload)
        except Exception:  # noqa: BLE001 - one bad probe must not stop the ledger
            log.exception("metering: handling %s failed", _id(kind, payload))
            return None

    def _sample(self) -> None:
        for call in self._calls.values():
            try:
                call.see(probe.target_of(call.session), first=False)
            except Exception:  # noqa: BLE001
                log.exception("metering: sampling a running call failed")

    def _finish(self, done: tuple[Finished, Any]) -> UsageRecord:
        facts, session = done
        call = self._calls.pop(facts.execution_id, None)
        if facts.started is None:  # cancelled while queued: it never ran
            if call is not None:
                call.close()
            return _record(facts, 0.0, probe.NONE, True, 0, None, probe.SAMPLED)
        if call is None:  # its start was not seen (metering began after it started)
            return _record(facts, None, probe.NONE, False, 0, None, probe.SAMPLED)
        try:
            current = probe.target_of(session or call.session)
            call.see(current, first=False)
            return _record(facts, *call.totals(getattr(current, "key", None)))
        finally:
            call.close()

    def _write(self, records: list[UsageRecord]) -> None:
        assert self._conn is not None
        while True:
            try:
                self.written += self.ledger.insert(self._conn, records)
                return
            except sqlite3.Error as exc:
                self.write_errors += 1
                log.error("metering: writing %d records failed (%s); retrying", len(records), exc)
                with self._cond:
                    if self._closing:
                        self.lost += len(records)
                        log.error("metering: shutting down: %d usage records lost", len(records))
                        return
                    self._cond.wait(RETRY_SECONDS)


def _record(
    facts: Finished,
    cpu: float | None,
    cpu_source: str,
    complete: bool,
    kernels_started: int,
    peak: int | None,
    rss_source: str,
) -> UsageRecord:
    wall = max(0.0, facts.ended - facts.started) if facts.started is not None else 0.0
    return UsageRecord(
        execution_id=facts.execution_id,
        tenant=facts.tenant,
        subject=facts.subject,
        agent_id=facts.agent_id,
        package_id=facts.package_id,
        package_name=facts.package_name,
        session_key=facts.session_key,
        session_id=facts.session_id,
        kind=facts.kind,
        status=facts.status,
        created=facts.created,
        started=facts.started,
        ended=facts.ended,
        wall_seconds=round(wall, 6),
        cpu_seconds=round(cpu, 6) if cpu is not None else None,
        cpu_source=cpu_source,
        cpu_complete=complete,
        kernels_started=kernels_started,
        peak_rss_bytes=peak,
        rss_source=rss_source,
        output_bytes=facts.output_bytes,
        recorded=time.time(),
    )


def _id(kind: str, item: Any) -> str:
    if kind == "start":
        return str(item[0])
    return getattr(item[0], "execution_id", "?")
