"""An execution is a record: what one call (an invoke, a notebook cell) did, as it happens.

Every surface reads the same record: plain invoke waits for its ``answer``; SSE and websocket
streams follow its event log; the Jupyter channels feed it the cells they run; the notebook
export reads a session's records; metering will read finished ones. None of them gathers
kernel messages on its own.

The event log is append-only and bounded (events and bytes): when it is full the oldest
events go, and a reader that had not read them gets one ``gap`` event saying what it missed.
Writers never wait for readers: a slow reader only falls behind, it never slows the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pixell_kernel_runtime.errors import NotFound, RuntimeAPIError

log = logging.getLogger(__name__)

# Failures that are answers (the envelope's status and message), not incidents to log.
ANSWERED = (RuntimeAPIError,)

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
ERROR = "error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
KERNEL_DIED = "kernel_died"
STATES = (QUEUED, RUNNING, DONE, ERROR, TIMEOUT, CANCELLED, KERNEL_DIED)
FINAL = frozenset(STATES) - {QUEUED, RUNNING}

# What a stream reader is sent (the log's own kinds, plus ``gap``).
EVENT_KINDS = ("status", "stdout", "stderr", "display", "result", "error", "done", "gap")


@dataclass(frozen=True)
class Event:
    seq: int  # 1, 2, ... per execution: an SSE event id, what Last-Event-ID names
    kind: str
    data: dict[str, Any]
    size: int  # bytes of its JSON, counted against the log's bound

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "event": self.kind, "data": self.data}


@dataclass(frozen=True)
class LogLimits:
    events: int = 10_000
    bytes: int = 8 * 1024 * 1024


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass
class Hooks:
    """Callbacks on every execution's start and end (on the loop; they must not block)."""

    started: list[Callable[[Execution], None]] = field(default_factory=list)
    finished: list[Callable[[Execution], None]] = field(default_factory=list)

    @staticmethod
    def call(callbacks: list[Callable[[Execution], None]], execution: Execution) -> None:
        for callback in callbacks:
            try:
                callback(execution)
            except Exception:  # noqa: BLE001 - a hook's failure must not fail the call
                log.exception("execution hook %r failed for %s", callback, execution.id)


@dataclass
class Execution:
    """One call's record. Mutated only on the event loop."""

    id: str
    agent_id: str | None
    session_key: str
    session_id: str
    tenant: str
    subject: str
    kind: str  # the agent kind (code-executor, handler) or "notebook" for a Jupyter cell
    code: str | None = None  # the cell's source, when there is one (export, replay)
    input: dict[str, Any] | None = None  # a handler call's input (export)
    # A silent execute (a front end's own, not a user's cell): not exported as a cell.
    silent: bool = False
    limits: LogLimits = field(default_factory=LogLimits)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    # The body a plain invoke answers (``output`` inside); a notebook cell's outputs.
    answer: dict[str, Any] | None = None
    execution_count: int | None = None
    # Set by the runner of the call: interrupts it (then restarts past the grace).
    canceller: Callable[[], Awaitable[None]] | None = None
    cancel_requested: bool = False
    # What ended the call before it had an answer of its own (plain invoke raises it again).
    failure: BaseException | None = None
    # Told when the call starts running and when it ends (metering): the store's hooks.
    hooks: Hooks | None = None
    # What its output weighed on the wire (stream bytes and rich outputs), for metering.
    output_bytes: int = 0
    # The log: _log[_head:] is what is kept (a list, so that a reader finds its next event by
    # seq in O(1); the trimmed head is compacted away now and then).
    _log: list[Event] = field(default_factory=list)
    _head: int = 0
    _bytes: int = 0
    _next_seq: int = 1
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    # ---- writing (the call's runner) -----------------------------------

    def emit(self, kind: str, data: dict[str, Any]) -> Event:
        size = len(json.dumps(data, default=str, ensure_ascii=False))
        event = Event(self._next_seq, kind, data, size)
        self._next_seq += 1
        self._log.append(event)
        self._bytes += size
        # The newest event always stays, even alone over the byte bound.
        while self.kept > 1 and (self.kept > self.limits.events or self._bytes > self.limits.bytes):
            self._bytes -= self._log[self._head].size
            self._head += 1
        if self._head > 256 and self._head * 2 > len(self._log):
            del self._log[: self._head]
            self._head = 0
        self._wake()
        return event

    def start(self) -> None:
        if self.state == QUEUED:
            self.state = RUNNING
            self.started = time.time()
            self.emit("status", {"state": RUNNING, "execution_id": self.id})
            if self.hooks is not None:
                self.hooks.call(self.hooks.started, self)

    def finish(self, state: str, answer: dict[str, Any] | None) -> None:
        """The final state and answer; the log's last event is ``done`` with the answer."""
        if self.state in FINAL:
            return
        assert state in FINAL, state
        self.state = state
        self.answer = answer
        self.ended = time.time()
        # A kept record must not keep its finished task (and the call's frames) alive.
        self.canceller = None
        self.emit("done", {"state": state, "execution_id": self.id, **(answer or {})})
        self._finished.set()
        if self.hooks is not None:
            self.hooks.call(self.hooks.finished, self)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- reading (every surface) ---------------------------------------

    @property
    def done(self) -> bool:
        return self.state in FINAL

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    async def wait(self) -> None:
        await self._finished.wait()

    @property
    def kept(self) -> int:
        return len(self._log) - self._head

    def events(self) -> list[Event]:
        """The events the log still holds, oldest first."""
        return self._log[self._head :]

    def _at(self, seq: int) -> Event | None:
        """The kept event ``seq``, if the log holds it."""
        if self.kept == 0:
            return None
        index = self._head + seq - self._log[self._head].seq
        return self._log[index] if self._head <= index < len(self._log) else None

    async def follow(self, after: int = 0, keepalive: float | None = None) -> AsyncIterator[Event]:
        """Events with ``seq > after``, as they come, until ``done``; a ``gap`` event first
        for what the log no longer holds. With ``keepalive`` a quiet stream yields a
        ``keepalive`` event (seq 0, not logged) every that many seconds."""
        while True:
            changed = self._changed
            first = self._log[self._head].seq if self.kept else self._next_seq
            if after + 1 < first:
                yield Event(0, "gap", {"from": after + 1, "to": first - 1}, 0)
                after = first - 1
                continue
            event = self._at(after + 1)
            if event is not None:
                yield event
                after = event.seq
                if event.kind == "done":
                    return
                continue
            if self.done:
                return
            try:
                await asyncio.wait_for(changed.wait(), keepalive)
            except TimeoutError:
                yield Event(0, "keepalive", {}, 0)

    async def cancel(self) -> bool:
        """Ask the call to stop; False if it had already finished."""
        if self.done:
            return False
        self.cancel_requested = True
        self._wake()
        if self.canceller is not None:
            await self.canceller()
        return True

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "agent_id": self.agent_id,
            "session": self.session_key,
            "session_id": self.session_id,
            "kind": self.kind,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "events": self.last_seq,
            "execution_count": self.execution_count,
        }
        if self.done:
            out["answer"] = self.answer
        return out


class ExecutionStore:
    """Live executions, and finished ones for ``keep_seconds`` (at most ``keep_count``)."""

    # Ids of executions that aged out, so that they answer "expired" rather than "not found".
    # About 200 bytes each.
    EXPIRED_IDS = 10_000

    def __init__(
        self, keep_seconds: float = 3600.0, keep_count: int = 1000, limits: LogLimits | None = None
    ) -> None:
        self.keep_seconds = keep_seconds
        self.keep_count = keep_count
        self.limits = limits or LogLimits()
        self._all: OrderedDict[str, Execution] = OrderedDict()
        # The finished ones in the order they finished: the oldest is first, so pruning looks
        # only at what it removes (it runs on every create and lookup).
        self._finished: OrderedDict[str, Execution] = OrderedDict()
        self.hooks = Hooks()
        self.hooks.finished.append(self._note_finished)
        self._expired: OrderedDict[str, None] = OrderedDict()

    def create(
        self,
        *,
        agent_id: str | None,
        session_key: str,
        session_id: str,
        tenant: str,
        subject: str,
        kind: str,
        code: str | None = None,
        input: dict[str, Any] | None = None,
        silent: bool = False,
    ) -> Execution:
        self.prune()
        execution = Execution(
            id=str(uuid.uuid4()),
            agent_id=agent_id,
            session_key=session_key,
            session_id=session_id,
            tenant=tenant,
            subject=subject,
            kind=kind,
            code=code,
            input=input,
            silent=silent,
            limits=self.limits,
            hooks=self.hooks,
        )
        self._all[execution.id] = execution
        return execution

    def get(self, execution_id: str, tenant: str) -> Execution:
        """Another tenant's execution is not found, exactly as a missing one."""
        self.prune()
        execution = self._all.get(execution_id)
        if execution is not None and execution.tenant == tenant:
            return execution
        if execution is None and execution_id in self._expired:
            raise NotFound(
                f"Execution {execution_id} has expired: finished executions are kept for "
                f"{self.keep_seconds:g}s (EXECUTIONS_KEEP_SECONDS), at most "
                f"{self.keep_count} of them (EXECUTIONS_KEEP_COUNT)",
                code="execution_expired",
            )
        raise NotFound(f"Execution not found: {execution_id}", code="execution_not_found")

    def for_session(self, tenant: str, session_key: str) -> list[Execution]:
        self.prune()
        return [
            e for e in self._all.values() if e.tenant == tenant and e.session_key == session_key
        ]

    def _note_finished(self, execution: Execution) -> None:
        if execution.id in self._all:
            self._finished[execution.id] = execution

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        while self._finished:
            oldest = next(iter(self._finished.values()))
            assert oldest.ended is not None
            if len(self._finished) <= self.keep_count and now - oldest.ended <= self.keep_seconds:
                break
            del self._finished[oldest.id]
            self._expire(oldest.id)

    def _expire(self, execution_id: str) -> None:
        self._all.pop(execution_id, None)
        self._expired[execution_id] = None
        while len(self._expired) > self.EXPIRED_IDS:
            self._expired.popitem(last=False)

    def counts(self) -> dict[str, int]:
        running = sum(1 for e in self._all.values() if not e.done)
        return {"kept": len(self._all), "running": running}


def envelope(exc: BaseException) -> dict[str, Any]:
    """The error envelope (as an HTTP error answer has it) of what ended a call early."""
    if isinstance(exc, RuntimeAPIError):
        return {"error": exc.kind, "message": exc.message, "code": exc.code, "status": exc.status}
    if isinstance(exc, asyncio.CancelledError):
        return {
            "error": "ServiceUnavailable",
            "message": "the server shut down before the call finished",
            "code": "shutting_down",
            "status": 503,
        }
    return {
        "error": "InternalError",
        "message": "the call failed inside the server; see its log",
        "code": "internal_error",
        "status": 500,
    }


@contextlib.contextmanager
def finishing(execution: Execution):  # type: ignore[no-untyped-def]
    """Whatever ends the call early (an API error, a shutdown), the record ends too."""
    try:
        yield execution
    except BaseException as exc:
        if not execution.done:
            execution.failure = exc
            cancelled = isinstance(exc, asyncio.CancelledError)
            execution.finish(CANCELLED if cancelled else ERROR, envelope(exc))
        raise
