"""A loopback HTTP server standing in for Stripe's API: ``POST /v1/billing/meter_events``.

It checks what Stripe checks that matters here (the secret key in ``Authorization: Bearer``,
the form-encoded fields, the customer, the value, the 35-day timestamp window), keeps every
request it received, and behaves as Stripe does on a repeat: a request with an Idempotency-Key
it saw before gets the first answer again (``Idempotent-Replayed: true``), and an event whose
``identifier`` it already holds is accepted but not counted a second time. ``hang_after=N``
makes it stop answering after N accepted events (until ``close()``), to stand a crash in.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

PATH = "/v1/billing/meter_events"
MAX_AGE = 35 * 86400
MAX_AHEAD = 300


@dataclass
class Received:
    authorization: str | None
    idempotency_key: str | None
    fields: dict[str, str]
    status: int


@dataclass
class FakeStripe:
    api_key: str
    customers: set[str]
    hang_after: int | None = None
    requests: list[Received] = field(default_factory=list)
    # identifier -> the accepted event (Stripe's dedupe by identifier)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    _replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)
    hanging: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                status, reply, extra = fake.handle(
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Idempotency-Key"),
                    self.headers.get("Content-Type", ""),
                    body,
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.send_header("Request-Id", f"req_{len(fake.requests)}")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # ---- Stripe's behaviour ---------------------------------------------

    def handle(
        self, path: str, auth: str | None, key: str | None, ctype: str, body: str
    ) -> tuple[int, bytes, dict[str, str]]:
        fields = dict(parse_qsl(body, keep_blank_values=True))
        with self._lock:
            if (
                self.hang_after is not None
                and len(self.events) >= self.hang_after
                and auth == f"Bearer {self.api_key}"
            ):
                hang = True
            else:
                hang = False
        if hang:
            self.hanging.set()
            self._release.wait()
            return 503, _error("api_error", "shutting down"), {}
        with self._lock:
            status, reply, extra = self._answer(path, auth, key, ctype, fields)
            self.requests.append(Received(auth, key, fields, status))
            return status, reply, extra

    def _answer(
        self, path: str, auth: str | None, key: str | None, ctype: str, fields: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        if auth != f"Bearer {self.api_key}":
            return 401, _error("invalid_request_error", "Invalid API Key provided"), {}
        if path != PATH:
            return 404, _error("invalid_request_error", f"Unrecognized request URL {path}"), {}
        if not ctype.startswith("application/x-www-form-urlencoded"):
            return 400, _error("invalid_request_error", "form-encoded body expected"), {}
        if key is not None and key in self._replies:
            status, reply = self._replies[key]
            return status, reply, {"Idempotent-Replayed": "true"}
        status, reply = self._create(fields)
        if key is not None:
            self._replies[key] = (status, reply)
        return status, reply, {}

    def _create(self, fields: dict[str, str]) -> tuple[int, bytes]:
        name = fields.get("event_name", "")
        customer = fields.get("payload[stripe_customer_id]")
        value = fields.get("payload[value]", "")
        ident = fields.get("identifier", "")
        stamp = fields.get("timestamp", "")
        if not name or len(name) > 100:
            return 400, _error("invalid_request_error", "event_name", param="event_name")
        if customer not in self.customers:
            return 400, _error(
                "invalid_request_error",
                f"No such customer: {customer!r}",
                code="resource_missing",
                param="payload[stripe_customer_id]",
            )
        if not value.isdigit():
            return 400, _error("invalid_request_error", "value", param="payload[value]")
        now = time.time()
        if not stamp.isdigit() or not now - MAX_AGE <= int(stamp) <= now + MAX_AHEAD:
            return 400, _error("invalid_request_error", "timestamp", param="timestamp")
        if not ident or len(ident) > 100:
            return 400, _error("invalid_request_error", "identifier", param="identifier")
        event = {
            "object": "billing.meter_event",
            "created": int(now),
            "event_name": name,
            "identifier": ident,
            "livemode": False,
            "payload": {"stripe_customer_id": customer, "value": value},
            "timestamp": int(stamp),
        }
        if ident in self.events:
            self.duplicates.append(ident)
        else:
            self.events[ident] = event
        return 200, json.dumps(event).encode()


def _error(kind: str, message: str, **extra: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message, **extra}}).encode()
