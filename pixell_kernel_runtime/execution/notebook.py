"""A session's executions as a Jupyter notebook (nbformat 4.5): ``GET .../notebook``.

The cells come from the session's execution records (creation order, which is run order: a
session runs its calls one at a time, first in first out), their outputs from each record's
event log. Two steps: :func:`collect` picks the records and copies what it needs of them on the
event loop (records change only there); :func:`render` builds, validates (nbformat) and
serialises the notebook, which is CPU work on data the kernel produced (hostile, up to the log
bounds), so the API runs it in a thread.

How each record becomes a cell:

* a code executor's call, and a notebook cell run through the Jupyter channels: a code cell
  with its ``code``;
* a handler call: a code cell that calls the handler as a user would, ``from <module> import
  <function>`` then the call with the invoke ``input`` as a Python literal (awaited when it
  returns an awaitable). It runs where the package is importable: in the session's own kernel
  (JupyterLab attached to the session), or a kernel started in the package's folder;
* records still running are left out (``metadata.pixell.running_left_out``), and so are calls
  that never reached the kernel (cancelled while queued, no kernel could be started:
  ``executions_not_run``).

Outputs follow the log: stdout/stderr -> ``stream`` (adjacent pieces of one stream merged),
display -> ``display_data``, result -> ``execute_result`` (a handler's return value as
``application/json`` plus its repr), error -> ``error`` (the traceback as a list of lines). When
the log lost events (its bound), the outputs come from the record's answer instead, unordered
(``metadata.pixell.outputs_from: "answer"``). Replay: cells that raised carry the tag
``raises-exception``; cells that timed out, were cancelled or killed their kernel carry
``skip-execution`` (nbclient and ``jupyter execute`` honour both).
"""

from __future__ import annotations

import ast
import json
import pprint
import re
import time
from dataclasses import dataclass, field
from typing import Any

from pixell_kernel_runtime.execution.record import (
    CANCELLED,
    ERROR,
    KERNEL_DIED,
    TIMEOUT,
    Event,
    Execution,
)
from pixell_kernel_runtime.jupyter import models
from pixell_kernel_runtime.packages.manifest import CODE_EXECUTOR

MEDIA_TYPE = "application/x-ipynb+json"
NOTEBOOK_KIND = "notebook"
# Sources and outputs kept in one export; past it, outputs (then whole cells) are left out and
# counted. The log bounds each record; this bounds what the sum of them costs to serialise.
MAX_EXPORT_BYTES = 64 * 1024 * 1024
_NOT_REPLAYABLE = frozenset({TIMEOUT, CANCELLED, KERNEL_DIED})
_JSON_MIME = re.compile(r"^application/(.*\+)?json$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Record:
    """What the export needs of one finished execution, copied on the event loop."""

    id: str
    kind: str
    agent_id: str | None
    state: str
    code: str | None
    input: dict[str, Any] | None
    handler: tuple[str, str] | None  # (module, function) of a handler call
    events: tuple[Event, ...]
    gapped: bool  # the log dropped its oldest events
    answer: dict[str, Any] | None
    execution_count: int | None
    started: float | None
    ended: float | None


@dataclass
class Export:
    """Everything :func:`render` needs; no reference to live runtime objects but records'
    (immutable) events."""

    session_key: str
    session_id: str
    package_id: str
    # The package's kernelspec on the Jupyter kernels API: opened through a gateway, the
    # notebook starts (or attaches to) a kernel of that package.
    kernel_name: str
    kernel_display_name: str
    records: list[Record]
    running: int = 0
    not_run: int = 0
    expired: int = 0
    exported_at: float = field(default_factory=time.time)

    @property
    def filename(self) -> str:
        return _UNSAFE_NAME.sub("-", f"{self.package_id}-{self.session_id}") + ".ipynb"


def collect(session: Any, executions: list[Execution]) -> Export:
    """The export of ``session`` from its records (``runtime.executions.for_session``).

    Only records made since this session was created count: a deleted session's records,
    still kept, may share its key."""
    package = session.package
    exports = {f"{package.id}/{e.name}": e for e in package.manifest.exports}
    spec = models.kernelspec(package)
    out = Export(
        session_key=session.key,
        session_id=session.session_id,
        package_id=package.id,
        kernel_name=spec["name"],
        kernel_display_name=spec["spec"]["display_name"],
        records=[],
    )
    ran = 0  # calls that reached the kernel (what session.executions counts)
    for e in executions:
        if e.created < session.created:
            continue
        rest = e.kind != NOTEBOOK_KIND
        if not e.done:
            out.running += 1
            ran += e.started is not None
            continue
        answer = e.answer if isinstance(e.answer, dict) else None
        if rest and (answer is None or "output" not in answer):
            out.not_run += 1  # it ended before reaching the kernel: nothing to show
            continue
        ran += 1
        if e.silent:
            continue  # a front end's own execute (completions, inspectors), not a user's cell
        export = exports.get(e.agent_id or "")
        handler = None
        if rest and e.kind != CODE_EXECUTOR and export is not None:
            if export.module and export.function:
                handler = (export.module, export.function)
        events = tuple(e.events())  # a copy: the thread reads it while the loop runs on
        out.records.append(
            Record(
                id=e.id,
                kind=e.kind,
                agent_id=e.agent_id,
                state=e.state,
                code=e.code,
                input=e.input,
                handler=handler,
                events=events,
                gapped=bool(events) and events[0].seq > 1,
                answer=answer,
                execution_count=e.execution_count,
                started=e.started,
                ended=e.ended,
            )
        )
    # The records of calls that aged out of the store (its keep_seconds / keep_count).
    out.expired = max(0, session.executions - ran)
    return out


# ---- building (in a thread) ------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _literal(value: Any) -> str:
    """``value`` (parsed JSON) as Python source that evaluates back to it, and to nothing else:
    reprs of dicts, lists, strings, numbers, booleans and None are literals, and the round trip
    through ``ast.literal_eval`` proves it; otherwise the JSON text, decoded by ``json``."""
    text = repr(value)
    try:
        if ast.literal_eval(text) == value:
            return text
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        pass
    return f"__import__('json').loads({json.dumps(value, ensure_ascii=True)!r})"


def handler_source(agent_id: str | None, module: str, function: str, input_: Any) -> str:
    """A cell that calls a handler the way the runtime did: with the invoke's input."""
    return (
        f"# {agent_id}: the handler {module}:{function}, called with the invoke's input\n"
        "import inspect\n"
        f"from {module} import {function}\n"
        "\n"
        f"_value = {function}({_literal(input_ if input_ is not None else {})})\n"
        "await _value if inspect.isawaitable(_value) else _value"
    )


def _bundle(data: Any) -> dict[str, Any]:
    """A MIME bundle nbformat accepts: JSON types keep any value, others need text."""
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for mime, value in data.items():
        if not isinstance(mime, str):
            continue
        if _JSON_MIME.match(mime):
            out[mime] = value
        elif isinstance(value, str):
            out[mime] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[mime] = value
    return out


def _metadata(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class _Outputs:
    """One cell's outputs in order, adjacent stream pieces merged."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.raised = False

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        last = self.items[-1] if self.items else None
        if last is not None and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        else:
            self.items.append({"output_type": "stream", "name": name, "text": text})

    def rich(self, kind: str, data: Any, metadata: Any, count: Any = None) -> None:
        item: dict[str, Any] = {
            "output_type": kind,
            "data": _bundle(data),
            "metadata": _metadata(metadata),
        }
        if kind == "execute_result":
            item["execution_count"] = _count(count)
        self.items.append(item)

    def value(self, value: Any) -> None:
        """A handler's return value (JSON), as its execute result."""
        try:
            text = pprint.pformat(value, sort_dicts=False)
        except RecursionError:
            text = f"<{type(value).__name__}>"
        self.rich("execute_result", {"application/json": value, "text/plain": text}, {})

    def error(self, data: Any) -> None:
        data = data if isinstance(data, dict) else {}
        traceback = data.get("traceback")
        if isinstance(traceback, list):
            lines = [t for t in traceback if isinstance(t, str)]
        else:
            lines = _text(traceback).split("\n") if traceback else []
        self.items.append(
            {
                "output_type": "error",
                "ename": _text(data.get("ename")),
                "evalue": _text(data.get("evalue")),
                "traceback": lines,
            }
        )
        self.raised = True


def _from_log(record: Record, outputs: _Outputs) -> None:
    for event in record.events:
        data = event.data
        if event.kind in ("stdout", "stderr"):
            outputs.stream(event.kind, _text(data.get("text")))
        elif event.kind == "display":
            outputs.rich("display_data", data.get("data"), data.get("metadata"))
        elif event.kind == "result":
            if "data" in data:
                count = data.get("execution_count", record.execution_count)
                outputs.rich("execute_result", data["data"], data.get("metadata"), count)
            elif "output" in data:
                outputs.value(data["output"])
        elif event.kind == "error":
            outputs.error(data)


def _from_answer(record: Record, outputs: _Outputs) -> None:
    """The answer's copy of the outputs (a log with gaps): streams, rich outputs, error.

    A code executor's are in its ``output``, a handler's in the answer's ``metadata`` (its
    value in ``output``), a notebook cell's (jupyter/cells.py) in the answer itself."""
    answer = record.answer or {}
    output = answer.get("output")
    meta = _metadata(answer.get("metadata"))
    if record.kind == NOTEBOOK_KIND:
        source: dict[str, Any] = answer
        exception = answer.get("exception")
    elif record.kind == CODE_EXECUTOR and isinstance(output, dict):
        source = output
        exception = output.get("exception")
    else:
        source = meta
        failed = meta.get("error") and isinstance(output, dict)
        exception = output.get("exception") if failed else None
    outputs.stream("stdout", _text(source.get("stdout")))
    outputs.stream("stderr", _text(source.get("stderr")))
    rich = source.get("outputs")
    for item in rich if isinstance(rich, list) else []:
        if not isinstance(item, dict):
            continue
        kind = "execute_result" if item.get("type") == "execute_result" else "display_data"
        outputs.rich(kind, item.get("data"), item.get("metadata"), record.execution_count)
    if isinstance(exception, dict):
        outputs.error(exception)
    elif record.handler is not None and not meta.get("error") and "output" in answer:
        outputs.value(output)


def _source(record: Record) -> str:
    if record.handler is not None:
        return handler_source(record.agent_id, *record.handler, record.input)
    if record.code is not None:
        return record.code
    return f"# {record.agent_id}: called with {_literal(record.input)}"


def _cell(record: Record) -> dict[str, Any]:
    outputs = _Outputs()
    if record.gapped:
        _from_answer(record, outputs)
    else:
        _from_log(record, outputs)
    answer = record.answer or {}
    output = answer.get("output")
    meta = _metadata(answer.get("metadata"))
    pixell: dict[str, Any] = {
        "execution_id": record.id,
        "agent_id": record.agent_id,
        "kind": record.kind,
        "state": record.state,
        "started": _iso(record.started),
        "ended": _iso(record.ended),
    }
    if record.gapped:
        pixell["outputs_from"] = "answer"
    if meta.get("session_restarted"):
        pixell["session_restarted"] = True
    if meta.get("truncated") or (isinstance(output, dict) and output.get("truncated")):
        pixell["truncated"] = True
    tags = []
    if record.state in _NOT_REPLAYABLE:
        tags.append("skip-execution")
    elif outputs.raised or record.state == ERROR:
        tags.append("raises-exception")
    metadata: dict[str, Any] = {"pixell": pixell}
    if tags:
        metadata["tags"] = tags
    count = None if record.handler is not None else _count(record.execution_count)
    return {
        "cell_type": "code",
        "id": record.id,
        "metadata": metadata,
        "execution_count": count,
        "source": _source(record),
        "outputs": outputs.items,
    }


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str))


def build(export: Export) -> dict[str, Any]:
    """The notebook as a dict (nbformat 4.5), within :data:`MAX_EXPORT_BYTES`."""
    cells = []
    budget = MAX_EXPORT_BYTES
    outputs_omitted = cells_omitted = 0
    for record in export.records:
        cell = _cell(record)
        source_size = len(cell["source"])
        if source_size > budget:
            cells_omitted += 1
            continue
        budget -= source_size
        size = _size(cell["outputs"])
        if size > budget:
            outputs_omitted += 1
            cell["outputs"] = []
            cell["metadata"]["pixell"]["outputs_omitted"] = True
        else:
            budget -= size
        cells.append(cell)
    pixell: dict[str, Any] = {
        "session": export.session_key,
        "session_id": export.session_id,
        "package_id": export.package_id,
        "exported_at": _iso(export.exported_at),
        "executions": len(cells),
    }
    extra = {
        "executions_expired": export.expired,
        "running_left_out": export.running,
        "executions_not_run": export.not_run,
        "outputs_omitted": outputs_omitted,
        "cells_omitted": cells_omitted,
    }
    pixell.update({k: v for k, v in extra.items() if v})
    if outputs_omitted or cells_omitted:
        pixell["max_export_bytes"] = MAX_EXPORT_BYTES
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {
                "name": export.kernel_name,
                "display_name": export.kernel_display_name,
                "language": "python",
            },
            "language_info": {
                "name": "python",
                "file_extension": ".py",
                "mimetype": "text/x-python",
                "codemirror_mode": {"name": "ipython", "version": 3},
                "pygments_lexer": "ipython3",
                "nbconvert_exporter": "python",
            },
            "pixell": pixell,
        },
        "cells": cells,
    }


def render(export: Export) -> bytes:
    """The .ipynb file: built, validated against the nbformat schema, serialised as nbformat
    writes it. Raises ``nbformat.ValidationError`` for a notebook that is not valid."""
    import nbformat  # imported here: only the export needs it (jsonschema is slow to import)

    notebook = build(export)
    try:
        json.dumps(notebook, allow_nan=False)
    except ValueError:
        # A kernel's JSON output held NaN or Infinity (jupyter_client parses them): not JSON,
        # so they become null, as the runtime's own answers have them.
        notebook = json.loads(json.dumps(notebook), parse_constant=lambda _name: None)
    nbformat.validate(nbformat.from_dict(notebook))
    text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")
