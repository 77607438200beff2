"""``pixell-kernel-runtime usage export --format stripe``: the ledger as Stripe meter events.

One event per execution that ran and ended in the period (``ended`` in ``[from, to)``)::

    {"event_name": NAME, "payload": {"stripe_customer_id": CUS, "value": "N"},
     "identifier": <execution id>, "timestamp": <end, epoch seconds>}

``value`` (``--value``), a whole number per execution, each rounded up on its own (Stripe sums
them): ``wall_seconds`` (default: the call's wall time, at least 1), ``cpu_ms`` or
``cpu_seconds`` (the kernel's CPU; a record without a CPU reading is reported and skipped, a
zero one is skipped), ``executions`` (1 each). The identifier is the execution id, so Stripe
drops a second copy of an event; the Idempotency-Key of each request is derived from it too.

The customers file (YAML or JSON, ``{tenant: customer}`` or ``{customers: {tenant: customer}}``)
maps tenants to Stripe customers; a tenant without one is reported and skipped (exit 3 with
``--strict``). ``--send`` posts every event with the official ``stripe`` library (the key from
STRIPE_API_KEY, never a flag; STRIPE_API_BASE overrides the API address), and records each one
Stripe accepted in the ledger's ``sent`` table before the next: a rerun after a crash sends only
the rest. Exit codes: 0 done, 1 Stripe refused or failed some, 2 bad arguments, 3 --strict and
tenants without a customer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from pixell_kernel_runtime.metering.ledger import Ledger, UsageRecord, iso, parse_bound

VALUES = ("wall_seconds", "cpu_ms", "cpu_seconds", "executions")
# Stripe takes events from the past 35 days (and up to 5 minutes ahead); a minute of margin.
STRIPE_MAX_AGE = 35 * 86400 - 60
_CUSTOMER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


class ExportError(Exception):
    """Bad arguments or files: exit 2 with this message."""


def load_customers(path: Path) -> dict[str, str]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ExportError(f"customers file {path}: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("customers"), dict):
        doc = doc["customers"]
    if not isinstance(doc, dict):
        raise ExportError(f"customers file {path}: expected a mapping of tenant to customer id")
    out: dict[str, str] = {}
    for tenant, customer in doc.items():
        if not isinstance(tenant, str) or not isinstance(customer, str):
            raise ExportError(f"customers file {path}: {tenant!r}: both must be strings")
        if not _CUSTOMER.match(customer):
            raise ExportError(f"customers file {path}: {tenant!r}: bad customer id {customer!r}")
        out[tenant] = customer
    return out


def meter_value(record: UsageRecord, kind: str) -> int | None:
    """What one execution bills, or None when there is nothing to bill it by."""
    if kind == "executions":
        return 1
    if kind == "wall_seconds":
        return max(1, math.ceil(round(record.wall_seconds, 6)))
    if record.cpu_seconds is None:
        return None
    scale = 1000 if kind == "cpu_ms" else 1
    return math.ceil(round(record.cpu_seconds * scale, 6))


@dataclass
class Export:
    events: list[dict[str, Any]] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)  # tenant -> executions skipped
    unmeasured: int = 0
    zero: int = 0


def build(
    ledger: Ledger,
    start: float,
    end: float,
    customers: dict[str, str],
    *,
    event_name: str,
    value: str,
) -> Export:
    out = Export()
    for record in ledger.records(start, end, ran_only=True):
        customer = customers.get(record.tenant)
        if customer is None:
            out.unmapped[record.tenant] = out.unmapped.get(record.tenant, 0) + 1
            continue
        amount = meter_value(record, value)
        if amount is None:
            out.unmeasured += 1
            continue
        if amount <= 0:
            out.zero += 1
            continue
        out.events.append(
            {
                "event_name": event_name,
                "payload": {"stripe_customer_id": customer, "value": str(amount)},
                "identifier": record.execution_id,
                "timestamp": int(record.ended),
            }
        )
    return out


@dataclass
class Sent:
    sent: int = 0
    already: int = 0
    too_old: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (identifier, why)
    aborted: str | None = None  # why sending stopped early
    unsent: int = 0


def send(ledger: Ledger, events: list[dict[str, Any]], *, api_key: str, event_name: str) -> Sent:
    """Post ``events`` to Stripe, skipping those the ledger says were sent to this meter."""
    import stripe  # the export's own dependency: the server never imports it

    base = os.environ.get("STRIPE_API_BASE") or os.environ.get("PIXELL_STRIPE_API_BASE")
    client = stripe.StripeClient(
        api_key, base_addresses={"api": base} if base else None, max_network_retries=2
    )
    service = (client.v1 if hasattr(client, "v1") else client).billing.meter_events
    done = ledger.sent_ids(event_name)
    result = Sent()
    oldest = time.time() - STRIPE_MAX_AGE
    # A lost `sent` row only means one event is sent again, and Stripe drops it: NORMAL suffices.
    with contextlib.closing(ledger.connect(synchronous="NORMAL")) as conn:
        for index, event in enumerate(events):
            ident = event["identifier"]
            if ident in done:
                result.already += 1
                continue
            if event["timestamp"] < oldest:
                result.too_old += 1
                continue
            try:
                service.create(event, {"idempotency_key": f"pkr-{event_name}-{ident}"})
            except (stripe.AuthenticationError, stripe.PermissionError) as exc:
                result.aborted = f"Stripe refused the API key: {exc.user_message or exc}"
            except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
                result.refused.append((ident, str(exc.user_message or exc)))
                continue
            except stripe.StripeError as exc:  # connection, rate limit, 5xx past the retries
                result.aborted = f"{type(exc).__name__}: {exc.user_message or exc}"
            if result.aborted:
                result.unsent = len(events) - index
                break
            ledger.mark_sent(conn, ident, event_name, event["payload"]["value"])
            result.sent += 1
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["stripe"], default="stripe", help="only stripe")
    p.add_argument("--from", dest="start", required=True, help="ISO date or datetime, included")
    p.add_argument("--to", dest="end", required=True, help="ISO date (included) or datetime")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--db", type=Path, help="the ledger (default METERING_DB, else STATE_DIR)")
    where.add_argument("--state-dir", type=Path, help="a runtime's state dir: its metering.db")
    p.add_argument(
        "--customers",
        type=Path,
        default=os.environ.get("STRIPE_CUSTOMERS_FILE"),
        help="tenant -> Stripe customer id, YAML or JSON (env STRIPE_CUSTOMERS_FILE)",
    )
    p.add_argument("--event-name", help="the meter's event name (default pixell_<value>)")
    p.add_argument("--value", choices=VALUES, default="wall_seconds", help="what is billed")
    p.add_argument(
        "--out", type=Path, help="write the events here, JSON Lines (default stdout, unless --send)"
    )
    p.add_argument("--send", action="store_true", help="post them to Stripe (STRIPE_API_KEY)")
    p.add_argument("--strict", action="store_true", help="exit 3 if a tenant has no customer")


def _ledger_path(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    if args.state_dir is not None:
        return Path(args.state_dir) / "metering.db"
    from pixell_kernel_runtime.config import from_env
    from pixell_kernel_runtime.metering import db_path

    return db_path(from_env())


def _write(events: list[dict[str, Any]], out: TextIO) -> None:
    for event in events:
        out.write(json.dumps(event, sort_keys=True) + "\n")


def run(args: argparse.Namespace, stderr: TextIO = sys.stderr) -> int:
    try:
        start, end = parse_bound(args.start), parse_bound(args.end, end=True)
        if start >= end:
            raise ExportError("--to must be later than --from")
        event_name = args.event_name or f"pixell_{args.value}"
        if not _EVENT_NAME.match(event_name):
            raise ExportError(f"bad --event-name {event_name!r}")
        if args.customers is None:
            raise ExportError("give --customers FILE (or set STRIPE_CUSTOMERS_FILE)")
        customers = load_customers(Path(args.customers))
        path = _ledger_path(args)
        if not path.is_file():
            raise ExportError(f"no metering ledger at {path}")
        api_key = os.environ.get("STRIPE_API_KEY") or ""
        if args.send and not api_key:
            raise ExportError("--send needs STRIPE_API_KEY in the environment")
        ledger = Ledger(path)
    except (ExportError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    export = build(ledger, start, end, customers, event_name=event_name, value=args.value)
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as fh:
            _write(export.events, fh)
    elif not args.send:
        _write(export.events, sys.stdout)
    print(
        f"usage export: {len(export.events)} events ({event_name}, value {args.value}) "
        f"for {iso(start)} .. {iso(end)} from {path}",
        file=stderr,
    )
    for tenant, count in sorted(export.unmapped.items()):
        print(
            f"skipped: tenant {tenant!r} has no Stripe customer ({count} executions)", file=stderr
        )
    if export.unmeasured:
        print(f"skipped: {export.unmeasured} executions without a CPU reading", file=stderr)
    if export.zero:
        print(f"skipped: {export.zero} executions with a value of 0", file=stderr)
    code = 0
    if args.send:
        result = send(ledger, export.events, api_key=api_key, event_name=event_name)
        print(
            f"sent {result.sent}, already sent {result.already}, refused {len(result.refused)}, "
            f"too old for Stripe {result.too_old}, not sent {result.unsent}",
            file=stderr,
        )
        for ident, why in result.refused:
            print(f"refused: {ident}: {why}", file=stderr)
        if result.aborted:
            print(f"error: sending stopped: {result.aborted} (a rerun resumes)", file=stderr)
        if result.refused or result.aborted or result.too_old:
            code = 1
    if code == 0 and args.strict and export.unmapped:
        code = 3
    return code
