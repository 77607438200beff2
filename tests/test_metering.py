"""Usage metering (issue 11, item 6): the ledger, GET /runtime/usage, the Stripe export.

Part A: the ledger (a real SQLite file), the recorder's bounded queue, the /proc probe (real
processes). Part B: ``usage export`` as a user runs it (a subprocess), with the real ``stripe``
library posting to a loopback stand-in for Stripe (tests/stripe_fake.py). Part C: real servers,
real sandboxed kernels: every execution one record, the REST view per tenant and scope, the
export of what they recorded, SIGKILL mid-execution and SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from conftest import REPO, Response, Server, minimal_env, stop_all, wait_for
from jwks_server import assert_forbidden, request
from stripe_fake import FakeStripe

from pixell_kernel_runtime.auth import tokens as tokens_mod
from pixell_kernel_runtime.metering import probe
from pixell_kernel_runtime.metering.ledger import Ledger, UsageRecord, parse_bound
from pixell_kernel_runtime.metering.recorder import Finished, Recorder

CE = "pixell-python-agent@0.1.0/code-executor"
GREET = "hello-handler@0.1.0/greet"
KEY = "sk_test_" + "k" * 24
DAY = 86400.0


def utc_day(offset_days: int = 0) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + offset_days * DAY))


def make_record(execution_id: str, **extra: Any) -> UsageRecord:
    ended = extra.pop("ended", time.time() - 60)
    wall = extra.pop("wall_seconds", 1.5)
    doc: dict[str, Any] = {
        "execution_id": execution_id,
        "tenant": "acme",
        "subject": "ci",
        "agent_id": CE,
        "package_id": "pixell-python-agent@0.1.0",
        "package_name": "pixell-python-agent",
        "session_key": "pixell-python-agent@0.1.0:default",
        "session_id": "default",
        "kind": "code-executor",
        "status": "done",
        "created": ended - wall - 0.01,
        "started": ended - wall,
        "ended": ended,
        "wall_seconds": wall,
        "cpu_seconds": 0.25,
        "cpu_source": probe.CGROUP,
        "cpu_complete": True,
        "kernels_started": 0,
        "peak_rss_bytes": 50_000_000,
        "rss_source": probe.PEAK_CALL,
        "output_bytes": 10,
        "recorded": ended + 0.01,
    }
    doc.update(extra)
    return UsageRecord(**doc)


def write(ledger: Ledger, records: list[UsageRecord]) -> int:
    with contextlib.closing(ledger.connect()) as conn:
        return Ledger.insert(conn, records)


def finished(execution_id: str, tenant: str = "acme", started: float | None = 1.0) -> Finished:
    return Finished(
        execution_id=execution_id,
        tenant=tenant,
        subject="ci",
        agent_id=CE,
        package_id="pixell-python-agent@0.1.0",
        package_name="pixell-python-agent",
        session_key="pixell-python-agent@0.1.0:default",
        session_id="default",
        kind="code-executor",
        status="done",
        created=0.5,
        started=started,
        ended=3.0,
        output_bytes=7,
    )


# ---- part A: the ledger, the queue, the probe -------------------------------------------------


def test_ledger_is_private_wal_and_keeps_the_first_record(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state" / "metering.db")
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(ledger.path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first = make_record("e1", wall_seconds=2.0)
    assert write(ledger, [first]) == 1
    # The same execution again (a retry, a replay): ignored, the first row stays as it was.
    assert write(ledger, [make_record("e1", wall_seconds=99.0), make_record("e2")]) == 1
    assert ledger.count() == 2
    assert ledger.get("e1") == first
    # Reopening (a restart) keeps everything and changes nothing.
    again = Ledger(ledger.path)
    assert again.count() == 2 and again.get("e1") == first


def test_summary_groups_and_filters(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "metering.db")
    day1 = parse_bound("2030-01-01") + 3600
    day2 = parse_bound("2030-01-02") + 3600
    write(
        ledger,
        [
            make_record("a1", ended=day1, wall_seconds=1.0, cpu_seconds=0.5),
            make_record("a2", ended=day1 + 5, wall_seconds=2.0, cpu_seconds=None, status="error"),
            make_record("a3", ended=day2, agent_id=GREET, peak_rss_bytes=70_000_000),
            make_record("g1", ended=day2, tenant="globex", wall_seconds=4.0),
        ],
    )
    out = ledger.summary(tenant="acme", start=None, end=None)
    # Ordered by the groups (tenant, agent, day).
    assert [(r["tenant"], r["agent"], r["day"], r["executions"]) for r in out["rows"]] == [
        ("acme", GREET, "2030-01-02", 1),
        ("acme", CE, "2030-01-01", 2),
    ]
    first = out["rows"][1]
    assert first["wall_seconds"] == 3.0 and first["cpu_seconds"] == 0.5
    assert first["cpu_unmeasured"] == 1 and first["not_done"] == 1
    assert out["totals"]["executions"] == 3 and out["totals"]["peak_rss_bytes"] == 70_000_000
    every = ledger.summary(tenant=None, start=None, end=None, group_by=("tenant",))
    assert [(r["tenant"], r["executions"]) for r in every["rows"]] == [("acme", 3), ("globex", 1)]
    one_day = ledger.summary(
        tenant=None,
        start=parse_bound("2030-01-02"),
        end=parse_bound("2030-01-02", end=True),
        group_by=(),
    )
    assert one_day["totals"]["executions"] == 2 and one_day["rows"][0]["executions"] == 2
    assert (
        ledger.summary(tenant=None, start=None, end=None, agent=GREET)["totals"]["executions"] == 1
    )


def test_period_bounds() -> None:
    assert parse_bound("2030-01-01") == 1893456000.0
    assert parse_bound("2030-01-01", end=True) == 1893456000.0 + DAY  # the day is included
    assert parse_bound("2030-01-01T06:00:00Z") == 1893456000.0 + 6 * 3600
    assert parse_bound("2030-01-01T06:00:00+02:00") == 1893456000.0 + 4 * 3600
    assert parse_bound("2030-01-01T06:00") == 1893456000.0 + 6 * 3600  # naive is UTC
    for bad in ("", "yesterday", "2030-13-01", "2030-01-01T25:00", "1893456000", "2030/01/01"):
        with pytest.raises(ValueError):
            parse_bound(bad)


def test_queue_is_bounded_reports_lag_and_drains_on_close(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "metering.db")
    recorder = Recorder(ledger, queue_size=5)
    blocker = sqlite3.connect(ledger.path, timeout=1.0)
    try:
        # Another writer holds the database: the recorder's first commit waits for it.
        blocker.execute("BEGIN EXCLUSIVE")
        assert recorder.post("finish", (finished("x0"), None))
        assert wait_for(lambda: recorder.lag()["oldest_seconds"] > 0.05, 5.0)
        assert recorder.lag()["queued"] == 1
        for i in range(1, 6):
            assert recorder.post("finish", (finished(f"x{i}"), None))
        assert not recorder.post("finish", (finished("x6"), None))  # the queue is full
        lag = recorder.lag()
        assert lag["queued"] == 6 and lag["dropped"] == 1 and lag["written"] == 0
        assert not recorder.flush(timeout=0.2)
    finally:
        blocker.rollback()
        blocker.close()
    assert recorder.flush(timeout=30.0)
    assert ledger.count() == 6
    assert recorder.lag() == {
        "queued": 0,
        "oldest_seconds": 0.0,
        "dropped": 1,
        "written": 6,
        "write_errors": 0,
        "lost": 0,
    }
    # A call cancelled while it queued never started: recorded with no CPU and no wall time.
    assert recorder.post("finish", (finished("never", started=None), None))
    assert recorder.close(timeout=30.0)
    never = ledger.get("never")
    assert never is not None and never.wall_seconds == 0.0 and never.cpu_seconds == 0.0
    assert ledger.get("x1") is not None and ledger.get("x6") is None
    assert not recorder.post("finish", (finished("late"), None))  # closed: refused, counted
    assert recorder.lag()["dropped"] == 2


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_proc_probe_counts_the_tree_and_reaped_children() -> None:
    # A parent that runs a CPU-burning child to its end, then waits: the child's time is then
    # only in the parent's cutime; the parent burns a little of its own first.
    code = (
        BURN.format(s=0.2)
        + "import subprocess, sys\n"
        + f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.6)!r}], check=True)\n"
        + "print('done', flush=True)\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "done\n"
        session = SimpleNamespace(
            kernel=SimpleNamespace(pid=proc.pid, died=False), sandbox=SimpleNamespace(cgroups=None)
        )
        target = probe.target_of(session)
        assert target == probe.Target(key=f"pid:{proc.pid}", pid=proc.pid, cgroup_dirs=())
        reading = probe.read(target)
        assert reading.cpu_source == probe.PROC
        assert reading.cpu_seconds is not None and 0.75 <= reading.cpu_seconds <= 3.0
        assert reading.rss_bytes is not None and reading.rss_bytes > 1_000_000
    finally:
        proc.kill()
        proc.wait()
    gone = probe.read(target)  # nothing to read any more
    assert (gone.cpu_seconds, gone.cpu_source, gone.rss_bytes) == (None, probe.NONE, None)
    session.kernel.died = True
    assert probe.target_of(session) is None


# ---- part B: the export, with the stripe library against a loopback Stripe ----------------


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe(api_key=KEY, customers={"cus_acme", "cus_initech"}).start()
    yield fake
    fake.close()


def export(
    *args: str, home: Path, stripe: FakeStripe | None = None, key: str = KEY
) -> subprocess.CompletedProcess[str]:
    env = minimal_env(home)
    if stripe is not None:
        env.update({"STRIPE_API_KEY": key, "STRIPE_API_BASE": stripe.url})
    return subprocess.run(
        [sys.executable, "-m", "pixell_kernel_runtime", "usage", "export", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def export_popen(*args: str, home: Path, stripe: FakeStripe) -> subprocess.Popen[str]:
    env = minimal_env(home) | {"STRIPE_API_KEY": KEY, "STRIPE_API_BASE": stripe.url}
    return subprocess.Popen(
        [sys.executable, "-m", "pixell_kernel_runtime", "usage", "export", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def customers_file(path: Path, mapping: dict[str, str]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"customers": mapping}))
    return path


def events_of(text: str) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def period_ledger(tmp_path: Path) -> tuple[Path, list[UsageRecord]]:
    ledger = Ledger(tmp_path / "state" / "metering.db")
    now = time.time()
    records = [
        make_record("a-1", ended=now - 300, wall_seconds=0.2, cpu_seconds=0.0101),
        make_record("a-2", ended=now - 200, wall_seconds=2.5, cpu_seconds=1.1),
        make_record("a-3", ended=now - 100, wall_seconds=61.0, cpu_seconds=None),
        make_record("g-1", ended=now - 150, tenant="globex"),
        make_record("never", ended=now - 50, started=None, wall_seconds=0.0, status="cancelled"),
        make_record("old", ended=now - 40 * DAY),  # outside the period below
    ]
    write(ledger, records)
    return ledger.path, records


def test_export_writes_one_event_per_execution(
    tmp_path: Path, period_ledger: tuple[Path, list[UsageRecord]]
) -> None:
    db, records = period_ledger
    customers = customers_file(tmp_path / "customers.yaml", {"acme": "cus_acme"})
    common = ["--from", utc_day(-2), "--to", utc_day(0), "--db", str(db)]
    res = export(*common, "--customers", str(customers), home=tmp_path / "h")
    assert res.returncode == 0, res
    by_id = {r.execution_id: r for r in records}
    assert events_of(res.stdout) == [
        {
            "event_name": "pixell_wall_seconds",
            "payload": {"stripe_customer_id": "cus_acme", "value": value},
            "identifier": ident,
            "timestamp": int(by_id[ident].ended),
        }
        for ident, value in (("a-1", "1"), ("a-2", "3"), ("a-3", "61"))
    ]
    assert "tenant 'globex' has no Stripe customer (1 executions)" in res.stderr
    out = tmp_path / "cpu.jsonl"
    res = export(
        *common,
        "--customers",
        str(customers),
        "--value",
        "cpu_ms",
        "--event-name",
        "kernel_cpu",
        "--out",
        str(out),
        "--strict",
        home=tmp_path / "h",
    )
    assert res.returncode == 3, res  # --strict: globex has no customer
    assert res.stdout == ""
    events = events_of(out.read_text())
    assert [(e["identifier"], e["payload"]["value"], e["event_name"]) for e in events] == [
        ("a-1", "11", "kernel_cpu"),
        ("a-2", "1100", "kernel_cpu"),
    ]
    assert "1 executions without a CPU reading" in res.stderr
    bad = export(*common, "--customers", str(customers), "--from", "soon", home=tmp_path / "h")
    assert bad.returncode == 2 and "not an ISO 8601" in bad.stderr
    missing = export(*common, home=tmp_path / "h")
    assert missing.returncode == 2 and "--customers" in missing.stderr
    nodb = export(
        "--from", utc_day(-1), "--to", utc_day(0), "--state-dir", str(tmp_path / "nowhere"),
        "--customers", str(customers), home=tmp_path / "h",
    )  # fmt: skip
    assert nodb.returncode == 2 and "no metering ledger" in nodb.stderr


def test_send_resumes_after_a_crash_and_never_sends_twice(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    ledger = Ledger(tmp_path / "state" / "metering.db")
    now = time.time()
    ids = [f"exec-{i}" for i in range(6)]
    write(ledger, [make_record(e, ended=now - 600 + i) for i, e in enumerate(ids)])
    customers = customers_file(tmp_path / "customers.json", {"acme": "cus_acme"})
    args = ["--from", utc_day(-1), "--to", utc_day(0), "--db", str(ledger.path), "--send"]
    args += ["--customers", str(customers)]
    # Stripe stops answering after three events: the export is killed there, mid-send.
    fake_stripe.hang_after = 3
    proc = export_popen(*args, home=tmp_path / "h", stripe=fake_stripe)
    try:
        assert fake_stripe.hanging.wait(60), proc.communicate(timeout=5)
        proc.kill()
    finally:
        proc.wait(30)
    assert ledger.sent_ids("pixell_wall_seconds") == set(ids[:3])
    assert sorted(fake_stripe.events) == ids[:3]
    fake_stripe.hang_after = None
    before = len(fake_stripe.requests)
    res = export(*args, home=tmp_path / "h", stripe=fake_stripe)
    assert res.returncode == 0, res
    assert "sent 3, already sent 3, refused 0" in res.stderr
    # The rerun sent only the rest; each request carried the key and an idempotency key.
    again = fake_stripe.requests[before:]
    assert [r.fields["identifier"] for r in again] == ids[3:]
    assert {r.authorization for r in fake_stripe.requests} == {f"Bearer {KEY}"}
    assert [r.idempotency_key for r in again] == [f"pkr-pixell_wall_seconds-{e}" for e in ids[3:]]
    assert sorted(fake_stripe.events) == ids and fake_stripe.duplicates == []
    assert ledger.sent_ids("pixell_wall_seconds") == set(ids)
    # A crash between Stripe's answer and the `sent` row: the event goes again, Stripe replays
    # its first answer (same Idempotency-Key) and counts nothing twice.
    with contextlib.closing(ledger.connect()) as conn, conn:
        conn.execute("DELETE FROM sent WHERE execution_id = ?", (ids[4],))
    before = len(fake_stripe.requests)
    res = export(*args, home=tmp_path / "h", stripe=fake_stripe)
    assert res.returncode == 0 and "sent 1, already sent 5" in res.stderr, res
    assert [r.fields["identifier"] for r in fake_stripe.requests[before:]] == [ids[4]]
    assert len(fake_stripe.events) == 6 and fake_stripe.duplicates == []
    # Nothing left: a third run sends nothing.
    before = len(fake_stripe.requests)
    res = export(*args, home=tmp_path / "h", stripe=fake_stripe)
    assert res.returncode == 0 and "sent 0, already sent 6" in res.stderr, res
    assert len(fake_stripe.requests) == before


def test_send_reports_what_stripe_refuses(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    ledger = Ledger(tmp_path / "state" / "metering.db")
    now = time.time()
    write(
        ledger,
        [
            make_record("ok-1", ended=now - 100),
            make_record("unknown-customer", ended=now - 90, tenant="hooli"),
            make_record("ok-2", ended=now - 80),
        ],
    )
    customers = customers_file(
        tmp_path / "customers.yaml", {"acme": "cus_acme", "hooli": "cus_gone"}
    )
    args = ["--from", utc_day(-1), "--to", utc_day(0), "--db", str(ledger.path), "--send"]
    args += ["--customers", str(customers)]
    wrong = export(*args, home=tmp_path / "h", stripe=fake_stripe, key="sk_test_wrong")
    assert wrong.returncode == 1 and "refused the API key" in wrong.stderr, wrong
    assert [r.authorization for r in fake_stripe.requests] == ["Bearer sk_test_wrong"]
    assert fake_stripe.events == {} and ledger.sent_ids("pixell_wall_seconds") == set()
    res = export(*args, home=tmp_path / "h", stripe=fake_stripe)
    assert res.returncode == 1, res
    assert "refused: unknown-customer: No such customer: 'cus_gone'" in res.stderr
    assert sorted(fake_stripe.events) == ["ok-1", "ok-2"]
    assert ledger.sent_ids("pixell_wall_seconds") == {"ok-1", "ok-2"}
    no_key = export(*args, home=tmp_path / "h")
    assert no_key.returncode == 2 and "STRIPE_API_KEY" in no_key.stderr


# ---- part C: a real server, real kernels -----------------------------------------------------


def invoke(srv: Server, token: str | None, agent: str, input_: dict[str, Any]) -> dict[str, Any]:
    resp = request(
        srv.port,
        "POST",
        f"/runtime/agents/{quote(agent, safe='@')}/invoke",
        token,
        body={"input": input_},
    )
    assert resp.status == 200, resp
    return resp.json()


def usage(srv: Server, token: str | None, query: str = "") -> Response:
    return request(srv.port, "GET", "/runtime/usage" + query, token)


def ledger_of(state_dir: Path) -> Ledger:
    return Ledger(state_dir / "metering.db")


def recorded(ledger: Ledger, ids: list[str], timeout: float = 15.0) -> dict[str, UsageRecord]:
    """The records of ``ids``, once all are committed (they are written off the answer path)."""
    assert wait_for(lambda: all(ledger.get(i) is not None for i in ids), timeout), ids
    return {i: r for i in ids if (r := ledger.get(i)) is not None}


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A server with tokens for two tenants and an admin, and the calls it metered."""
    base = tmp_path_factory.mktemp("metered")
    tokens_file = base / "tokens.yaml"
    toks = {
        "acme": tokens_mod.create(
            tokens_file, tenant="acme", name="ci", scopes=["invoke", "usage"]
        ),
        "acme_invoke": tokens_mod.create(tokens_file, tenant="acme", name="bot", scopes=["invoke"]),
        "globex": tokens_mod.create(
            tokens_file, tenant="globex", name="ops", scopes=["invoke", "usage"]
        ),
        "admin": tokens_mod.create(tokens_file, tenant="root", name="root", scopes=["admin"]),
    }
    # No warm pool (conftest's default, said here since the test depends on it): each
    # session's first call starts its kernel.
    env = {"AUTH_TOKENS_FILE": str(tokens_file), "POOL_SIZE": "0"}
    srv = Server(base / "state", ["--examples"], env)
    srv.start()
    try:
        a = toks["acme"]
        calls: dict[str, dict[str, Any]] = {}
        calls["first"] = invoke(srv, a, CE, {"code": "result = 1", "session_id": "m"})
        calls["burn"] = invoke(
            srv, a, CE, {"code": BURN.format(s=0.8) + "result = 2", "session_id": "m"}
        )
        calls["big"] = invoke(
            srv,
            a,
            CE,
            {"code": "x = bytearray(200 * 2**20)\nprint('y' * 20000)", "session_id": "m"},
        )
        calls["free"] = invoke(srv, a, CE, {"code": "del x", "session_id": "m"})
        calls["small"] = invoke(srv, a, CE, {"code": "result = 3", "session_id": "m"})
        calls["timeout"] = invoke(
            srv, a, CE, {"code": "sum(range(10**12))", "timeout_seconds": 1, "session_id": "m"}
        )
        calls["died"] = invoke(srv, a, CE, {"code": "import os\nos._exit(3)", "session_id": "d"})
        calls["greet"] = invoke(srv, toks["globex"], GREET, {"name": "Ada"})
        ids = {k: v["metadata"]["execution_id"] for k, v in calls.items()}
        report = request(srv.port, "GET", "/runtime/sandbox", toks["admin"]).json()
        yield SimpleNamespace(
            server=srv, tokens=toks, calls=calls, ids=ids, report=report, state=base / "state"
        )
    finally:
        stop_all([srv])


def test_every_execution_is_one_usage_record(metered: SimpleNamespace) -> None:
    ids, calls = metered.ids, metered.calls
    # The server made the ledger at <state_dir>/metering.db, owner-only.
    db = metered.state / "metering.db"
    assert db.is_file() and stat.S_IMODE(db.stat().st_mode) == 0o600
    ledger = ledger_of(metered.state)
    rec = recorded(ledger, list(ids.values()))
    assert ledger.count() == len(ids)  # nothing else, nothing twice
    cgroups = metered.report["layers"]["cgroups"]["enabled"]
    expected_source = probe.CGROUP if cgroups else probe.PROC
    first, burn, big, small = (rec[ids[k]] for k in ("first", "burn", "big", "small"))
    for r in rec.values():
        assert r.started is not None and r.created <= r.started <= r.ended
        assert r.wall_seconds == pytest.approx(r.ended - r.started, abs=1e-5)
    done = (first, burn, big, small, rec[ids["free"]], rec[ids["greet"]])
    assert {(r.status, r.cpu_source, r.cpu_complete) for r in done} == {
        ("done", expected_source, True)
    }
    assert (first.tenant, first.subject, first.agent_id, first.kind) == (
        "acme",
        "ci",
        CE,
        "code-executor",
    )
    assert (first.package_id, first.package_name, first.session_id) == (
        "pixell-python-agent@0.1.0",
        "pixell-python-agent",
        "m",
    )
    # The session's first call started its kernel: counted from its boot, and said so.
    assert first.kernels_started == 1 and burn.kernels_started == 0
    # 0.8 s of CPU burnt in the kernel: the call's CPU, within its wall time.
    assert burn.cpu_seconds is not None and 0.78 <= burn.cpu_seconds <= burn.wall_seconds + 0.05
    assert burn.cpu_complete
    assert small.cpu_seconds is not None and small.cpu_seconds < 0.3
    # Peak memory per call: the 200 MiB buffer shows in its call, not in one after it is freed.
    assert big.peak_rss_bytes is not None and big.peak_rss_bytes >= 200 * 2**20
    assert small.peak_rss_bytes is not None and small.peak_rss_bytes < 150 * 2**20
    assert big.rss_source == small.rss_source
    assert big.rss_source == (probe.PEAK_CALL if cgroups else probe.SAMPLED)
    assert big.output_bytes >= 20000 and big.output_bytes < 30000
    timeout = rec[ids["timeout"]]
    assert calls["timeout"]["output"]["error"] == "timeout"
    assert timeout.status == "timeout" and timeout.wall_seconds >= 1.0
    # It ignored the interrupt: its kernel was replaced mid-call (so its last readings are
    # what is known of it), and the replacement's start is counted too.
    assert not timeout.cpu_complete and timeout.kernels_started == 1
    assert timeout.cpu_source == expected_source
    assert timeout.cpu_seconds is not None and timeout.cpu_seconds > 0.1
    died = rec[ids["died"]]
    # Its kernel started and died within the call: what it used is known only if a reading
    # caught it alive, and the record says it is not complete.
    assert died.status == "kernel_died" and died.session_id == "d" and not died.cpu_complete
    greet = rec[ids["greet"]]
    assert (greet.tenant, greet.subject, greet.agent_id, greet.kind) == (
        "globex",
        "ops",
        GREET,
        "handler",
    )
    assert (greet.package_id, greet.package_name) == ("hello-handler@0.1.0", "hello-handler")


def test_usage_api_by_tenant_and_scope(metered: SimpleNamespace) -> None:
    srv, toks, ids = metered.server, metered.tokens, metered.ids
    recorded(ledger_of(metered.state), list(ids.values()))
    mine = usage(srv, toks["acme"])
    assert mine.status == 200, mine
    doc = mine.json()
    assert doc["tenant"] == "acme" and doc["group_by"] == ["tenant", "agent", "day"]
    assert [(r["tenant"], r["agent"], r["day"]) for r in doc["rows"]] == [("acme", CE, utc_day())]
    assert doc["totals"]["executions"] == 7 and doc["totals"]["not_done"] == 2
    assert doc["totals"]["peak_rss_bytes"] >= 200 * 2**20
    ledger_wall = sum(
        r.wall_seconds
        for i in ids.values()
        if (r := ledger_of(metered.state).get(i)) is not None and r.tenant == "acme"
    )
    assert doc["totals"]["wall_seconds"] == pytest.approx(ledger_wall, abs=1e-4)
    theirs = usage(srv, toks["globex"]).json()
    assert theirs["tenant"] == "globex" and theirs["totals"]["executions"] == 1
    assert theirs["rows"][0]["agent"] == GREET
    # Another tenant's usage is an admin's only; without the usage scope, nothing.
    refused = usage(srv, toks["acme"], "?tenant=globex")
    assert refused.status == 403 and refused.json()["code"] == "forbidden", refused
    assert usage(srv, toks["acme"], "?tenant=acme").json()["totals"]["executions"] == 7
    assert_forbidden(usage(srv, toks["acme_invoke"]), "usage")
    assert usage(srv, None).status == 401
    every = usage(srv, toks["admin"], "?group_by=tenant").json()
    assert every["tenant"] is None
    assert [(r["tenant"], r["executions"]) for r in every["rows"]] == [("acme", 7), ("globex", 1)]
    one = usage(srv, toks["admin"], "?tenant=globex&group_by=agent").json()
    assert one["tenant"] == "globex" and [r["agent"] for r in one["rows"]] == [GREET]


def test_usage_api_periods_filters_and_bad_input(metered: SimpleNamespace) -> None:
    srv, tok = metered.server, metered.tokens["admin"]
    recorded(ledger_of(metered.state), list(metered.ids.values()))

    def total(query: str) -> int:
        resp = usage(srv, tok, query)
        assert resp.status == 200, resp
        return resp.json()["totals"]["executions"]

    assert total(f"?from={utc_day(-1)}&to={utc_day(0)}") == 8
    assert total(f"?from={utc_day(1)}") == 0
    assert total(f"?to={utc_day(-2)}") == 0
    assert total(f"?agent={quote(GREET)}") == 1
    assert total(f"?from={quote(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(0)))}") == 8
    by_day = usage(srv, tok, "?group_by=day,status").json()
    assert by_day["group_by"] == ["day", "status"]
    assert {(r["day"], r["status"]): r["executions"] for r in by_day["rows"]} == {
        (utc_day(), "done"): 6,
        (utc_day(), "timeout"): 1,
        (utc_day(), "kernel_died"): 1,
    }
    for query, field in (
        ("?from=yesterday", "from"),
        ("?to=2030-02-30", "to"),
        ("?from=2030-02-01&to=2030-01-01", "to"),
        ("?group_by=tenant,weather", "group_by"),
        ("?since=2030-01-01", "since"),
        ("?from=2030-01-01&from=2030-01-02", "from"),
    ):
        resp = usage(srv, tok, query)
        assert resp.status == 422, (query, resp)
        body = resp.json()
        assert body["code"] == "validation_error", body
        assert [d["loc"] for d in body["details"]] == [["query", field]], body


def test_export_of_what_a_server_recorded(
    metered: SimpleNamespace, tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    ids = metered.ids
    ledger = ledger_of(metered.state)
    rec = recorded(ledger, list(ids.values()))
    customers = customers_file(tmp_path / "customers.yaml", {"acme": "cus_acme"})
    args = ["--from", utc_day(-1), "--to", utc_day(0), "--state-dir", str(metered.state)]
    res = export(*args, "--customers", str(customers), "--send", home=tmp_path / "h",
                 stripe=fake_stripe)  # fmt: skip
    assert res.returncode == 0, res
    assert "tenant 'globex' has no Stripe customer (1 executions)" in res.stderr
    acme = sorted(i for i, r in rec.items() if r.tenant == "acme")
    assert sorted(fake_stripe.events) == acme
    for ident in acme:
        event = fake_stripe.events[ident]
        assert event["payload"] == {
            "stripe_customer_id": "cus_acme",
            "value": str(max(1, math.ceil(rec[ident].wall_seconds))),
        }
        assert event["timestamp"] == int(rec[ident].ended)
        assert event["event_name"] == "pixell_wall_seconds"
    strict = export(*args, "--customers", str(customers), "--send", "--strict",
                    home=tmp_path / "h", stripe=fake_stripe)  # fmt: skip
    assert strict.returncode == 3 and "sent 0, already sent 7" in strict.stderr, strict


def process_tree_of(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (not zombies)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                alive.add(pid)
    return alive


def _running(srv: Server, session: str) -> bool:
    resp = srv.client.get("/runtime/sessions")
    for s in resp.json()["sessions"] if resp.status == 200 else []:
        if s["session_id"] == session and s["kernel_execution_state"] == "busy":
            return True
    return False


def test_sigkill_mid_execution_keeps_the_finished_and_restart_resumes(
    server_factory: Any, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    srv = server_factory(["--examples"], state_dir=state)
    ids = [
        srv.client.invoke(CE, {"code": f"result = {i}", "session_id": "k"}).json()["metadata"][
            "execution_id"
        ]
        for i in range(3)
    ]
    outcome: dict[str, Any] = {}

    def long_call() -> None:
        try:
            outcome["answer"] = srv.client.invoke(
                CE, {"code": "import time\ntime.sleep(120)", "session_id": "k"}, timeout=150
            )
        except OSError as exc:  # the server dies under it: that is the expected outcome
            outcome["error"] = exc

    thread = threading.Thread(target=long_call)
    thread.start()
    assert wait_for(lambda: _running(srv, "k"), 30.0), srv.logs()
    kernels = srv.descendants()
    assert kernels
    srv.stop(signal.SIGKILL)
    thread.join(30)
    # The kernels die with the server (bubblewrap's --die-with-parent, the launcher's guard).
    assert wait_for(lambda: not (process_tree_of(kernels)), 10.0), process_tree_of(kernels)
    assert "answer" not in outcome and isinstance(outcome.get("error"), OSError), outcome
    ledger = ledger_of(state)
    with contextlib.closing(sqlite3.connect(ledger.path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT execution_id, status FROM usage ORDER BY ended").fetchall()
    # The finished calls, each once; the running one not at all (it never ended).
    assert rows == [(i, "done") for i in ids]
    again = server_factory(["--examples"], state_dir=state)
    more = again.client.invoke(CE, {"code": "result = 9", "session_id": "k"}).json()
    recorded(ledger, [more["metadata"]["execution_id"]])
    assert ledger.count() == 4
    totals = again.client.get("/runtime/usage?group_by=").json()["totals"]
    assert totals["executions"] == 4 and totals["not_done"] == 0


def test_sigterm_records_the_calls_it_drains(server_factory: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    srv = server_factory(["--examples"], state_dir=state)
    srv.client.invoke(CE, {"code": "result = 0", "session_id": "t"})  # the kernel is up
    outcome: dict[str, Any] = {}

    def call() -> None:
        code = "import time\ntime.sleep(2)\nresult = 'drained'"
        outcome["answer"] = srv.client.invoke(CE, {"code": code, "session_id": "t"}, timeout=60)

    thread = threading.Thread(target=call)
    thread.start()
    assert wait_for(lambda: _running(srv, "t"), 30.0), srv.logs()
    assert srv.stop(signal.SIGTERM) == 0, srv.logs()
    thread.join(30)
    answer = outcome["answer"]
    assert answer.status == 200 and answer.json()["output"]["result"] == "drained", answer
    ident = answer.json()["metadata"]["execution_id"]
    # No wait here: the server has exited, so what it recorded is in the file now.
    drained = ledger_of(state).get(ident)
    assert drained is not None and drained.status == "done" and drained.wall_seconds >= 2.0
    assert ledger_of(state).count() == 2


def pool_size(srv: Server) -> float:
    resp = srv.client.get("/metrics")
    assert resp.status == 200, resp
    for line in resp.body.decode().splitlines():
        if line.startswith("pixell_pool_size "):
            return float(line.split()[1])
    raise AssertionError("no pixell_pool_size in /metrics")


def test_a_notebook_cell_and_a_warm_kernel(server_factory: Any, tmp_path: Path) -> None:
    from test_jupyter_api import KernelSocket, ws_url
    from test_jupyter_api import run as run_async

    state = tmp_path / "state"
    srv = server_factory(["--examples"], env={"POOL_SIZE": "1"}, state_dir=state)
    # A warm kernel for each package: a new session's first call boots nothing, the kernel's
    # start-up was before the call and is not the call's.
    assert wait_for(lambda: pool_size(srv) == 2, 60.0), srv.logs()
    rest = srv.client.invoke(CE, {"code": "x = 1", "session_id": "nb"}).json()
    key = quote("pixell-python-agent@0.1.0:nb", safe="")
    kid = srv.client.get(f"/runtime/sessions/{key}").json()["kernel_id"]

    async def cell() -> dict[str, Any]:
        ks = await KernelSocket.open(ws_url(srv, kid))
        try:
            return await ks.run("print('n' * 5000)")
        finally:
            ks.close()

    got = run_async(cell())
    assert got["reply"]["status"] == "ok", got
    ledger = ledger_of(state)
    recorded(ledger, [rest["metadata"]["execution_id"]])
    warm = ledger.get(rest["metadata"]["execution_id"])
    assert warm is not None and warm.kernels_started == 0 and warm.cpu_complete
    assert warm.cpu_seconds is not None and warm.cpu_seconds < 0.3
    assert wait_for(lambda: ledger.count() == 2, 15.0)
    (nb,) = [r for r in ledger.records(0, time.time() + 60) if r.kind == "notebook"]
    assert (nb.agent_id, nb.tenant, nb.subject, nb.session_id, nb.status) == (
        None,
        "default",
        "anonymous",
        "nb",
        "done",
    )
    assert nb.package_id == "pixell-python-agent@0.1.0" and nb.output_bytes >= 5000
    assert nb.cpu_seconds is not None and nb.cpu_complete
    row = srv.client.get("/runtime/usage?group_by=kind,agent").json()["rows"]
    assert [(r["kind"], r["agent"], r["executions"]) for r in row] == [
        ("code-executor", CE, 1),
        ("notebook", None, 1),
    ]
