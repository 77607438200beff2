"""What the load test drives a server with: a raw HTTP/1.1 client on asyncio streams (keep-alive,
Content-Length and chunked bodies, SSE read as the bytes arrive), a per-session gate, and the
server-side readings (RSS from /proc, every process the server's tree ever held), and the
checks of the runtime's answers that every kind of call shares.

No HTTP library: what goes on the wire is what a plain client sends, and nothing buffers a
stream behind the test's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import process_tree

MAX_LINE = 1 << 20  # a status line, a header, a chunk-size line: far below this
MAX_BODY = 64 << 20  # a whole answer, or one SSE event


class ProtocolError(Exception):
    """The server sent something that is not HTTP/1.1 as this client reads it."""


@dataclass
class Head:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:400]!r}>"


@dataclass
class SseEvent:
    id: int | None
    event: str
    data: Any


class Conn:
    """One keep-alive HTTP/1.1 connection to a loopback server, opened on first use and again
    after the server (or an error) closed it. One request at a time."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._writer.is_closing() or self._reader is None:
            self.close()
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=MAX_LINE
            )
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Head:
        """Write one request; read its status line and headers (the body is the caller's)."""
        reader, writer = await self._open()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ProtocolError("the server closed the connection before answering")
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:200]!r}")
        found: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            if not line:
                raise ProtocolError("the connection closed inside the headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:200]!r}")
            found[name.strip().lower()] = value.strip()
        return Head(int(parts[1]), found)

    async def chunks(self, head: Head) -> AsyncIterator[bytes]:
        """The body of ``head``'s response, piece by piece as it arrives (chunked decoded).
        Afterwards the connection is ready for the next request, or closed if the server said
        so."""
        reader, _ = await self._open()
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                size_text = size_line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_line[:100]!r}") from None
                if size == 0:
                    while (trailer := await reader.readline()) not in (b"\r\n", b"\n"):
                        if not trailer:
                            raise ProtocolError("the connection closed inside the trailers")
                    break
                if size > MAX_BODY:
                    raise ProtocolError(f"chunk of {size} bytes")
                data = await reader.readexactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise ProtocolError("a chunk did not end with CRLF")
                yield data
        elif "content-length" in head.headers:
            length = int(head.headers["content-length"])
            if length > MAX_BODY:
                raise ProtocolError(f"body of {length} bytes")
            if length:
                yield await reader.readexactly(length)
        else:  # delimited by the close (HTTP/1.1 allows it): read to the end
            while data := await reader.read(1 << 16):
                yield data
            self.close()
        if head.headers.get("connection", "").lower() == "close":
            self.close()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        head = await self.send(method, path, body, headers)
        data = b"".join([chunk async for chunk in self.chunks(head)])
        return Reply(head.status, head.headers, data)

    async def events(self, head: Head) -> AsyncIterator[SseEvent]:
        """``head``'s body as Server-Sent Events, each as soon as its blank line arrives."""
        buffer = b""
        async for chunk in self.chunks(head):
            buffer += chunk
            if len(buffer) > MAX_BODY:
                raise ProtocolError("an SSE event over the size bound")
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                event = parse_event(block.decode())
                if event is not None:
                    yield event
        if buffer.strip():
            raise ProtocolError(f"the stream ended inside an event: {buffer[:200]!r}")


def parse_event(block: str) -> SseEvent | None:
    """One SSE block (without its blank line); None for a comment-only block (keepalive)."""
    ident, kind, data = None, None, []
    for line in block.split("\n"):
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            ident = int(value)
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        else:
            raise ProtocolError(f"unknown SSE field in {block[:200]!r}")
    if kind is None:
        if data or ident is not None:
            raise ProtocolError(f"an SSE event without a name: {block[:200]!r}")
        return None
    return SseEvent(ident, kind, json.loads("\n".join(data)))


class Gate:
    """A session's readers-writer gate on the client side: ordinary calls share it; a call
    whose *next* call must be known (a kernel death, then the call that sees the restart)
    holds it alone, so no other client's call lands between the two."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._alone and not self._shared)
            finally:
                self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._cond:
                self._alone = False
                self._cond.notify_all()


def rss_bytes(pid: int) -> int:
    """A process's resident set (VmRSS of /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProtocolError(f"no VmRSS for pid {pid}")


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in ticks): a pid with another start time is
    another process. None when the pid is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass
class Watch:
    """Every process seen in the server's tree (pid -> start time), and the server's RSS."""

    server_pid: int
    seen: dict[int, str] = field(default_factory=dict)
    rss: list[int] = field(default_factory=list)

    def sample(self) -> None:
        for pid in process_tree(self.server_pid) - {self.server_pid}:
            started = start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)
        self.rss.append(rss_bytes(self.server_pid))

    def alive(self) -> dict[int, str]:
        """The seen processes that still run (not another process on a recycled pid)."""
        return {pid: st for pid, st in self.seen.items() if start_time(pid) == st}

    async def run(self, every: float, stop: asyncio.Event) -> None:
        """Sample off the loop every ``every`` seconds until ``stop`` is set."""
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# ---- the runtime's answers, as the load test checks them ----


class Unexpected(Exception):
    pass


def check(cond: bool, what: str, got: Any) -> None:
    if not cond:
        raise Unexpected(f"{what}: {str(got)[:600]}")


JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def answer(reply: Reply) -> dict[str, Any]:
    """A plain invoke's answer: 200, JSON, its execution id in the header and the body."""
    check(reply.status == 200, "status", reply)
    check(reply.headers.get("content-type", "").startswith("application/json"), "type", reply)
    doc = reply.json()
    check(set(doc) >= {"agent_id", "output", "duration_ms", "trace_id", "metadata"}, "keys", doc)
    eid = doc["metadata"].get("execution_id")
    check(eid is not None and reply.headers.get("x-execution-id") == eid, "execution id", doc)
    return doc


def stream_head(head: Head) -> str:
    check(head.status == 200, "stream status", head)
    check(head.headers.get("content-type", "").startswith("text/event-stream"), "type", head)
    return head.headers.get("x-execution-id", "")


def done_of(events: list[SseEvent], eid: str, state: str) -> dict[str, Any]:
    """The ``done`` data of a whole stream: ids 1..n, starts queued, ends with ``done``."""
    check([e.id for e in events] == list(range(1, len(events) + 1)), "event ids", events)
    first, last = events[0], events[-1]
    check(first.event == "status" and first.data.get("state") == "queued", "first", first)
    check(first.data.get("execution_id") == eid, "first event's execution id", first)
    check(last.event == "done" and last.data.get("execution_id") == eid, "last", last)
    check(last.data.get("state") == state, f"done state (want {state})", last)
    check(sum(e.event == "done" for e in events) == 1, "one done", events)
    return last.data
