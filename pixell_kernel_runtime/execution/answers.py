"""Shape a finished cell into the contract's answers (code executor and handler)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pixell_kernel_runtime.execution.runner import CellRun


@dataclass(frozen=True)
class Fate:
    """How the call ended, beyond what the kernel's messages say."""

    outcome: str  # done | timeout | timeout_restarted | cancelled | cancelled_restarted | dead
    timeout: float
    exit: Any = None  # sessions.kernel.Exit when the kernel died
    restarted_note: str | None = None


def user_expression(run: CellRun, name: str = "r") -> dict[str, Any]:
    """The JSON document our kernel-side helper returned through user_expressions.

    Only its ``application/json`` (IPython's JSON formatter, fed by ``JSONPayload._repr_json_``)
    is read. ``text/plain`` is whatever the kernel's code made a repr say: never parsed.
    """
    entry = run.user_expressions.get(name)
    if not isinstance(entry, dict) or entry.get("status") != "ok":
        return {}
    doc = (entry.get("data") or {}).get("application/json")
    return doc if isinstance(doc, dict) else {}


def handler_pending(run: CellRun) -> bool:
    """Did phase one of a handler call leave an awaitable to await (``HANDLER_EXPRESSIONS``)?

    The expression is a bool whose repr is compared, not parsed (the runner keeps only short
    text/plain answers).
    """
    if run.status != "ok":
        return False
    entry = run.user_expressions.get("pending")
    if not isinstance(entry, dict) or entry.get("status") != "ok":
        return False
    return (entry.get("data") or {}).get("text/plain") == "True"


def _one_line(exc: dict[str, Any] | None) -> str:
    if not exc:
        return "execution failed"
    ename, evalue = exc.get("ename", ""), str(exc.get("evalue", ""))
    first = evalue.strip().splitlines()[0] if evalue.strip() else ""
    return f"{ename}: {first}" if first else ename or "execution failed"


def _failure(run: CellRun, fate: Fate) -> tuple[str, dict[str, Any]] | None:
    """The error message and extra fields for a call that did not finish normally."""
    if fate.outcome in ("timeout", "timeout_restarted"):
        lost = fate.outcome == "timeout_restarted"
        return "timeout", {
            "timeout_seconds": fate.timeout,
            "state_lost": lost,
            "detail": (
                f"the cell ran past {fate.timeout:g}s; "
                + (
                    "it ignored the interrupt, so the kernel was restarted and the session's"
                    " state is lost"
                    if lost
                    else "it was interrupted and the session's state is kept"
                )
            ),
        }
    if fate.outcome in ("cancelled", "cancelled_restarted"):
        lost = fate.outcome == "cancelled_restarted"
        return "cancelled", {
            "state_lost": lost,
            "detail": (
                "the call was cancelled; "
                + (
                    "it ignored the interrupt, so the kernel was restarted and the session's"
                    " state is lost"
                    if lost
                    else "it was interrupted (or had not started) and the session's state is kept"
                )
            ),
        }
    if fate.outcome == "dead":
        described = fate.exit.describe() if fate.exit is not None else "the kernel died"
        return f"kernel died: {described}", {
            "state_lost": True,
            "kernel_exit": fate.exit.to_json() if fate.exit is not None else None,
        }
    if run.status != "ok":
        return _one_line(run.error), {}
    return None


def code_output(run: CellRun, fate: Fate, session_id: str, duration_ms: float) -> dict[str, Any]:
    """The code executor's ``output``, in the contract's key order."""
    failure = _failure(run, fate)
    out: dict[str, Any] = {}
    if failure is None:
        collected = user_expression(run)
        out["status"] = "success"
        out["result"] = collected.get("result") if collected.get("has_result") else None
    else:
        out["status"] = "error"
        out["error"] = failure[0]
    out["stdout"] = run.stdout
    out["stderr"] = run.stderr
    out["session_id"] = session_id
    out["execution_count"] = run.execution_count
    out["outputs"] = run.outputs
    out["exception"] = run.error
    out["duration_ms"] = duration_ms
    out["session_restarted"] = fate.restarted_note is not None
    if run.truncated:
        out["truncated"] = True
        out["truncation"] = run.truncation()
    if failure is not None:
        out.update(failure[1])
    return out


def handler_output(run: CellRun, fate: Fate) -> tuple[Any, dict[str, Any]]:
    """A handler's ``output`` (its JSON-converted return value) and the answer's metadata."""
    meta: dict[str, Any] = {"stdout": run.stdout, "stderr": run.stderr}
    if run.outputs:
        meta["outputs"] = run.outputs
    if run.truncated:
        meta["truncated"] = True
        meta["truncation"] = run.truncation()
    failure = _failure(run, fate)
    if failure is None:
        collected = user_expression(run)
        return collected.get("result"), meta
    meta["error"] = True
    output = {"status": "error", "error": failure[0], "exception": run.error, **failure[1]}
    return output, meta
