"""Helpers that run INSIDE every session kernel (ipykernel / IPython), never in the server.

The server does not import this module. It reads this file's source text and executes it
silently in each fresh kernel as a module object registered as ``sys.modules["__pixell__"]``
and bound in the user namespace as ``__pixell__``, then calls ``__pixell__.install()``.
Hence: standard library only at import time, no side effects at import except definitions,
everything at module level. numpy / pandas are never imported here: a value can only be a
numpy or pandas object if that library is already in ``sys.modules``, so they are looked up
there (``sys.modules.get``) when a value needs converting.

API (all functions are safe to call from ``user_expressions``):

``install()``
    Registers ``pre_run_cell`` / ``post_run_cell`` callbacks on the IPython shell (idempotent,
    also across a re-bootstrap of this source: stale callbacks of an older copy are removed).
    Silent executes do not fire these events, so they never disturb the "last cell" state.

``collect(max_rows=100, max_chars=100_000)``
    Returns a :class:`JSONPayload` for ``{"has_result", "result", "result_source"}``.
    ``result_source`` is ``"handler"`` (a value stored by :func:`set_handler_result` since the
    last collect), ``"result"`` (the last non-silent cell bound the name ``result``: its identity
    changed, or the cell's AST stores to ``result`` at module level), ``"expression"`` (the
    cell's last expression value, when not None) or None (``has_result`` false). Never raises.

``to_json(value, max_rows=100, max_chars=100_000)``
    Bounded, JSON-safe conversion (see :class:`_Converter`). Never raises.

``call_handler(module, function, input_json)``, ``isawaitable``, ``set_handler_result(value)``
    The server calls an agent handler with a silent cell::

        __pixell_rv = __pixell__.call_handler("src.main", "handler", '{"a": 1}')
        if __pixell__.isawaitable(__pixell_rv): __pixell_rv = await __pixell_rv
        __pixell__.set_handler_result(__pixell_rv); del __pixell_rv

    Verified on ipykernel 7.4 / IPython 8.12: top-level ``await`` works with ``silent=True``
    (ipykernel runs it through ``run_cell_async``), coroutines are awaited, handler exceptions
    make the execute_reply ``status: "error"`` with ``ename``/``evalue``. Module state of the
    handler module persists between calls (``sys.modules`` cache).

``variables()``
    A :class:`JSONPayload` for ``{"variables": [{"name", "type", "shape", "length",
    "size_bytes"}], "truncated": bool}`` over the user namespace. Never raises.

How the server reads the payloads
---------------------------------
Send ``user_expressions={"r": "__pixell__.collect()"}`` with the execute_request and read
``reply["content"]["user_expressions"]["r"]``. When ``status == "ok"``, its ``data`` holds:

* ``"application/json"``: the payload dict itself (IPython's JSONFormatter is enabled by default
  and picks up ``_repr_json_``; verified in the tests), and
* ``"text/plain"``: the same payload as one line of JSON text (``repr()`` of the object), a
  fallback for kernels whose JSON formatter was disabled. Parse it with ``json.loads``.

ipykernel evaluates ``user_expressions`` only when the cell succeeded (on error it sends ``{}``),
after ``post_run_cell`` has fired. If the user rebinds or deletes ``__pixell__``, the expression
``__import__("sys").modules["__pixell__"].collect()`` still reaches this module.
"""

import ast
import base64
import collections
import collections.abc
import datetime
import decimal
import inspect
import json
import math
import pathlib
import reprlib
import sys
import types
import uuid

__all__ = [
    "JSONPayload",
    "call_handler",
    "collect",
    "install",
    "isawaitable",
    "set_handler_result",
    "to_json",
    "variables",
]

isawaitable = inspect.isawaitable

RESULT_NAME = "result"
MAX_DEPTH = 20
MAX_ITEMS = 100_000  # elements over a whole conversion (containers and their members)
MAX_CONTAINER_ITEMS = 10_000  # elements of any single list / dict / set
MAX_COLUMNS = 1_000  # DataFrame columns kept
ARRAY_ELEMENTS_PER_ROW = 50  # ndarray elements kept: max_rows * this
MAX_VARIABLES = 1_000
_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "__pixell__"})

_MISSING = object()
_MAX_NESTED_CELLS = 16

# Mutable module state. Reset by the pre_run_cell hook, filled by post_run_cell.
_STATE = {
    # Objects bound to `result` before each running cell (dropped after). A stack: a cell
    # magic such as %%capture runs its body as a nested cell, whose hooks fire in between.
    "snapshots": [],
    "raw_cell": "",
    "result_bound": False,  # the last non-silent cell bound the name `result`
    "last_value": None,  # ExecutionResult.result of the last non-silent cell
    "error": False,  # the last non-silent cell raised
    "handler_result": _MISSING,  # set by set_handler_result, consumed by collect
}


# --------------------------------------------------------------------------------------------
# IPython plumbing
# --------------------------------------------------------------------------------------------


def _shell():
    try:
        from IPython import get_ipython

        return get_ipython()
    except Exception:
        return None


def _user_ns():
    shell = _shell()
    if shell is not None:
        return shell.user_ns
    main = sys.modules.get("__main__")
    return getattr(main, "__dict__", {})


def _pre_run_cell(info=None):
    try:
        _STATE["handler_result"] = _MISSING
        _STATE["result_bound"] = False
        _STATE["last_value"] = None
        _STATE["error"] = False
        raw = getattr(info, "raw_cell", None)
        _STATE["raw_cell"] = raw if isinstance(raw, str) else ""
        snapshots = _STATE["snapshots"]
        del snapshots[:-_MAX_NESTED_CELLS]  # bounded, should a post hook ever be missed
        snapshots.append(_user_ns().get(RESULT_NAME, _MISSING))
    except Exception:
        pass


def _post_run_cell(exec_result=None):
    try:
        snapshots = _STATE["snapshots"]
        # Popped: do not keep a rebound old value alive.
        snapshot = snapshots.pop() if snapshots else _MISSING
        if exec_result is not None:
            _STATE["last_value"] = getattr(exec_result, "result", None)
            _STATE["error"] = not getattr(exec_result, "success", True)
            info = getattr(exec_result, "info", None)
            raw = getattr(info, "raw_cell", None)
            if isinstance(raw, str):
                _STATE["raw_cell"] = raw
        ns = _user_ns()
        if RESULT_NAME not in ns:
            _STATE["result_bound"] = False
        elif ns[RESULT_NAME] is not snapshot:
            _STATE["result_bound"] = True
        else:
            _STATE["result_bound"] = _cell_binds_name(_STATE["raw_cell"], RESULT_NAME)
    except Exception:
        pass


_pre_run_cell._pixell_hook = "pre_run_cell"
_post_run_cell._pixell_hook = "post_run_cell"


def _hook_tag(callback):
    tag = getattr(callback, "_pixell_hook", None)
    if tag is None:
        tag = getattr(getattr(callback, "__wrapped__", None), "_pixell_hook", None)
    return tag


def _is_hook(callback, hook):
    return callback is hook or getattr(callback, "__wrapped__", None) is hook


def install():
    """Register the cell hooks on the running IPython shell (idempotent). Returns the shell."""
    shell = _shell()
    if shell is None:
        return None
    for event, hook in (
        ("pre_run_cell", _pre_run_cell),
        ("post_run_cell", _post_run_cell),
        ("pre_execute", _reset_output_budget),
    ):
        callbacks = shell.events.callbacks[event]
        for cb in list(callbacks):
            if _hook_tag(cb) == event and not _is_hook(cb, hook):
                callbacks.remove(cb)  # left over by an older copy of this module
        if not any(_is_hook(cb, hook) for cb in callbacks):
            shell.events.register(event, hook)
    # exit()/quit() end an ipykernel (ZMQExitAutocall sets keepkernel_on_exit False); a session
    # ends through the runtime's API. So, on every IPython: front-ends are asked to leave while
    # the kernel keeps running, and REST callers see a note (see _ask_exit).
    shell.ask_exit = _ask_exit
    _reset_output_budget()
    return shell


# What one execution may print per stream; the server keeps 1 MiB of it in the answer. Capping
# here, at the source, keeps a program that prints a huge table from flooding the server with
# messages it would throw away (the server bounds its receive queues too, for hostile code).
OUTPUT_BUDGET_CHARS = 1024 * 1024 - 4096  # its marker fits in what the server keeps
_output_used = {"stdout": 0, "stderr": 0}


def _reset_output_budget(*_args):
    """Before every execution: a fresh budget, on whatever streams are current (IPython 9
    swaps sys.stdout during a silent cell, so capping once at install is not enough)."""
    for name in ("stdout", "stderr"):
        _output_used[name] = 0
        _cap_stream(getattr(sys, name, None), name)


def _cap_stream(stream, name):
    if stream is None or getattr(getattr(stream, "write", None), "_pixell_capped", False):
        return
    original = stream.write

    def write(text):
        try:
            used = _output_used[name]
            room = OUTPUT_BUDGET_CHARS - used
            _output_used[name] = used + len(text)
            if room <= 0:
                return len(text)
            if len(text) > room:
                original(text[:room])
                original("\n[output truncated by the runtime]\n")
                return len(text)
        except Exception:
            pass
        return original(text)

    write._pixell_capped = True
    try:
        stream.write = write
    except Exception:
        pass


EXIT_NOTE = (
    "exit() does not end a runtime session: its state is kept."
    " DELETE /runtime/sessions/{id} ends it.\n"
)


def _ask_exit(*_args, **_kwargs):
    """``exit``/``quit``/``get_ipython().ask_exit()``: never stops the kernel.

    ipykernel's own ``ask_exit`` sets ``exit_now`` (stopping the kernel) unless
    ``keepkernel_on_exit``, and sends the payload ``{"source": "ask_exit", "keepkernel"}`` with
    the execute_reply: jupyter console leaves on it, and shuts the kernel down unless
    ``keepkernel`` is true. Here the payload always says ``keepkernel: True`` and ``exit_now``
    is never touched, so a console leaves the usual way and the kernel lives on; clients that
    ignore payloads (the runtime's REST invoke, JupyterLab) only see the note on stderr."""
    try:
        sys.stderr.write(EXIT_NOTE)
    except Exception:
        pass
    shell = _shell()
    manager = getattr(shell, "payload_manager", None)
    if manager is None:
        return
    try:
        # single=True (the default): one ask_exit payload per reply, however often called.
        manager.write_payload({"source": "ask_exit", "keepkernel": True})
    except Exception:
        pass


def _transform(raw):
    shell = _shell()
    if shell is not None:
        try:
            return shell.transform_cell(raw)
        except Exception:
            pass
    return raw


def _cell_binds_name(raw_cell, name):
    """True if the cell's code stores to ``name`` at module level (AST walk, never raises)."""
    if not raw_cell or name not in raw_cell:
        return False
    try:
        tree = ast.parse(_transform(raw_cell))
    except Exception:
        try:
            tree = ast.parse(raw_cell)
        except Exception:
            return False
    try:
        return _binds(tree, name)
    except Exception:
        return False


def _binds(tree, name):
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
            # Only what is evaluated in the module scope: decorators, defaults, bases.
            stack.extend(node.decorator_list)
            if isinstance(node, ast.ClassDef):
                stack.extend(node.bases)
                stack.extend(kw.value for kw in node.keywords)
            else:
                stack.extend(node.args.defaults)
                stack.extend(d for d in node.args.kw_defaults if d is not None)
            continue
        if isinstance(node, ast.Lambda):
            stack.extend(node.args.defaults)
            stack.extend(d for d in node.args.kw_defaults if d is not None)
            continue
        if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
            # Comprehension targets are local; a walrus inside binds the enclosing scope.
            for gen in node.generators:
                stack.append(gen.iter)
                stack.extend(gen.ifs)
            if isinstance(node, ast.DictComp):
                stack.extend((node.key, node.value))
            else:
                stack.append(node.elt)
            continue
        if isinstance(node, ast.Name):
            if node.id == name and isinstance(node.ctx, ast.Store):
                return True
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound == name:
                    return True
            continue
        if isinstance(node, ast.AnnAssign) and node.value is None:
            continue  # `result: int` declares, does not bind
        if isinstance(node, ast.MatchAs | ast.MatchStar) and node.name == name:
            return True
        if isinstance(node, ast.MatchMapping) and node.rest == name:
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


# --------------------------------------------------------------------------------------------
# Payload object read through user_expressions
# --------------------------------------------------------------------------------------------


class JSONPayload:
    """Wraps a JSON-safe dict; IPython renders it as application/json and as JSON text/plain."""

    __slots__ = ("_data", "_text")

    def __init__(self, data):
        self._data = data
        self._text = None

    def _repr_json_(self):
        return self._data

    def to_text(self):
        if self._text is None:
            self._text = json.dumps(self._data, allow_nan=False, ensure_ascii=False)
        return self._text

    def __repr__(self):
        try:
            return self.to_text()
        except Exception:
            return '{"error": "unserialisable payload"}'

    def __str__(self):
        return self.__repr__()


def _checked_payload(data, fallback_key, max_chars):
    """Return a JSONPayload whose data is proven to serialise; degrade ``fallback_key``."""
    payload = JSONPayload(data)
    try:
        payload.to_text()
        return payload
    except Exception:
        pass
    try:
        data[fallback_key] = _safe_repr(data.get(fallback_key), max_chars)
        payload = JSONPayload(data)
        payload.to_text()
        return payload
    except Exception:
        data[fallback_key] = None
        return JSONPayload(data)


def _clamp(value, default, low=1):
    try:
        value = int(value)
    except Exception:
        return default
    return max(low, value)


def collect(max_rows=100, max_chars=100_000):
    """The result of the last call: handler value, ``result`` binding or last expression."""
    max_rows = _clamp(max_rows, 100)
    max_chars = _clamp(max_chars, 100_000, 16)
    data = {"has_result": False, "result": None, "result_source": None}
    try:
        handler_value = _STATE["handler_result"]
        _STATE["handler_result"] = _MISSING
        if handler_value is not _MISSING:
            value, source = handler_value, "handler"
        else:
            ns = _user_ns()
            value, source = _MISSING, None
            if _STATE["result_bound"] and RESULT_NAME in ns:
                value, source = ns[RESULT_NAME], "result"
            elif _STATE["last_value"] is not None:
                value, source = _STATE["last_value"], "expression"
        if source is not None:
            data = {
                "has_result": True,
                "result": to_json(value, max_rows, max_chars),
                "result_source": source,
            }
    except BaseException:
        pass
    return _checked_payload(data, "result", max_chars)


def call_handler(module, function, input_json):
    """Import ``module``, call ``function(json.loads(input_json))``; may return an awaitable."""
    import importlib

    _STATE["handler_result"] = _MISSING
    mod = importlib.import_module(module)
    func = getattr(mod, function)
    argument = json.loads(input_json) if input_json else {}
    return func(argument)


def set_handler_result(value):
    """Store a handler's return value for the next :func:`collect` (source ``"handler"``)."""
    _STATE["handler_result"] = value


# --------------------------------------------------------------------------------------------
# JSON conversion
# --------------------------------------------------------------------------------------------


def _type_name(obj):
    try:
        t = type(obj)
        module = getattr(t, "__module__", None)
        qual = getattr(t, "__qualname__", None) or getattr(t, "__name__", "object")
        if not module or module == "builtins":
            return str(qual)
        return f"{module}.{qual}"
    except BaseException:
        return "object"


def _truncate(text, limit):
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [truncated {len(text) - limit} chars]"


_CONTAINER_TYPES = (list, tuple, dict, set, frozenset, collections.deque)


def _safe_repr(obj, max_chars=100_000):
    """``repr(obj)`` bounded to ``max_chars``; ``"<unrepresentable T>"`` if repr fails."""
    try:
        if isinstance(obj, _CONTAINER_TYPES):
            r = reprlib.Repr()
            r.maxlevel = 4
            r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = 50
            r.maxstring = r.maxother = max(16, min(max_chars, 200))
            text = r.repr(obj)
        else:
            text = repr(obj)
        if not isinstance(text, str):
            raise TypeError("__repr__ returned non-string")
        return _clean_str(_truncate(text, max_chars))
    except BaseException:
        return f"<unrepresentable {_type_name(obj)}>"


def _clean_str(text):
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Converter:
    """One bounded conversion: depth <= MAX_DEPTH, total items <= MAX_ITEMS, strings bounded."""

    def __init__(self, max_rows, max_chars):
        self.max_rows = max_rows
        self.max_chars = max_chars
        self.items_left = MAX_ITEMS
        self.chars_left = max_chars * 10
        self.active = set()
        self.truncations = 0

    # -- helpers -------------------------------------------------------------------------------
    def text(self, s):
        limit = max(16, min(self.max_chars, self.chars_left))
        if len(s) > limit:
            self.truncations += 1
            s = _truncate(s, limit)
        self.chars_left -= len(s)
        return _clean_str(s)

    def repr(self, obj):
        return self.text(_safe_repr(obj, self.max_chars))

    def convert(self, obj, depth=0):
        try:
            return self._convert(obj, depth)
        except BaseException:
            return self.repr(obj)

    # -- dispatch ------------------------------------------------------------------------------
    def _convert(self, obj, depth):
        t = type(obj)
        if obj is None or t is bool or t is int:
            return obj
        if t is str:
            return self.text(obj)
        if t is float:
            return obj if math.isfinite(obj) else None
        if depth > MAX_DEPTH:
            self.truncations += 1
            return self.repr(obj)

        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray | np.generic):
            return self._numpy(obj, np, depth)
        pd = sys.modules.get("pandas")
        if pd is not None:
            converted = self._pandas(obj, pd, depth)
            if converted is not _MISSING:
                return converted

        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            value = float(obj)
            return value if math.isfinite(value) else None
        if isinstance(obj, str):
            return self.text(str.__str__(obj))
        if isinstance(obj, datetime.datetime | datetime.date | datetime.time):
            return obj.isoformat()
        if isinstance(obj, datetime.timedelta):
            return str(obj)
        if isinstance(obj, decimal.Decimal):
            if not obj.is_finite():
                return None
            return float(obj)
        if isinstance(obj, uuid.UUID | pathlib.PurePath):
            return self.text(str(obj))
        if isinstance(obj, bytes | bytearray | memoryview):
            return self._bytes(obj)
        if isinstance(obj, dict | collections.abc.Mapping):
            return self._mapping(obj, depth)
        if isinstance(obj, list | tuple | set | frozenset | collections.deque):
            return self._sequence(obj, depth)
        if hasattr(t, "__dataclass_fields__") and not isinstance(obj, type):
            return self._dataclass(obj, depth)
        return self.repr(obj)

    # -- containers ----------------------------------------------------------------------------
    def _enter(self, obj):
        key = id(obj)
        if key in self.active:
            return False
        self.active.add(key)
        return True

    def _sequence(self, obj, depth):
        if not self._enter(obj):
            return f"<cycle {_type_name(obj)}>"
        try:
            items = obj
            if isinstance(obj, set | frozenset):
                try:
                    items = sorted(obj)
                except Exception:
                    items = list(obj)
            out = []
            total = len(obj)
            for item in items:
                if len(out) >= MAX_CONTAINER_ITEMS or self.items_left <= 0:
                    self.truncations += 1
                    out.append(f"... [truncated: {total - len(out)} more items]")
                    break
                self.items_left -= 1
                out.append(self.convert(item, depth + 1))
            return out
        finally:
            self.active.discard(id(obj))

    def _key(self, key):
        if isinstance(key, str):
            return self.text(str.__str__(key))
        if key is None or isinstance(key, bool | int | float):
            return str(key)
        converted = self.convert(key, MAX_DEPTH)  # scalars convert, containers become repr
        if isinstance(converted, str):
            return converted
        return self.text(json.dumps(converted, allow_nan=False, default=str))

    def _mapping(self, obj, depth):
        if not self._enter(obj):
            return f"<cycle {_type_name(obj)}>"
        try:
            out = {}
            total = len(obj)
            for count, (key, value) in enumerate(obj.items()):
                if count >= MAX_CONTAINER_ITEMS or self.items_left <= 0:
                    self.truncations += 1
                    out["__truncated__"] = f"{total - count} more items"
                    break
                self.items_left -= 1
                out[self._key(key)] = self.convert(value, depth + 1)
            return out
        finally:
            self.active.discard(id(obj))

    def _dataclass(self, obj, depth):
        if not self._enter(obj):
            return f"<cycle {_type_name(obj)}>"
        try:
            out = {}
            for name in type(obj).__dataclass_fields__:
                if self.items_left <= 0:
                    self.truncations += 1
                    out["__truncated__"] = True
                    break
                self.items_left -= 1
                out[str(name)] = self.convert(getattr(obj, name, None), depth + 1)
            return out
        finally:
            self.active.discard(id(obj))

    def _bytes(self, obj):
        raw = bytes(obj)
        limit = max(12, self.max_chars * 3 // 4)
        truncated = len(raw) > limit
        if truncated:
            self.truncations += 1
        encoded = base64.b64encode(raw[:limit]).decode("ascii")
        self.chars_left -= len(encoded)
        return {"type": "bytes", "length": len(raw), "base64": encoded, "truncated": truncated}

    # -- numpy ---------------------------------------------------------------------------------
    def _numpy(self, obj, np, depth):
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, np, depth)
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            value = float(obj)
            return value if math.isfinite(value) else None
        if isinstance(obj, np.datetime64):
            return None if np.isnat(obj) else str(np.datetime_as_string(obj))
        if isinstance(obj, np.timedelta64):
            return None if np.isnat(obj) else str(obj)
        if isinstance(obj, np.str_):
            return self.text(str(obj))
        if isinstance(obj, np.bytes_):
            return self._bytes(bytes(obj))
        return self.repr(obj)

    def _ndarray(self, arr, np, depth):
        if arr.ndim == 0:
            return self.convert(arr[()], depth + 1)
        limit = self.max_rows * ARRAY_ELEMENTS_PER_ROW
        truncated = False
        shape = [int(n) for n in arr.shape]
        if arr.size > limit:
            truncated = True
            self.truncations += 1
            per_row = max(1, arr.size // arr.shape[0])
            rows = limit // per_row
            if rows >= 1:
                arr = arr[:rows]
            else:
                side = max(1, int(limit ** (1.0 / arr.ndim)))
                arr = arr[tuple(slice(0, side) for _ in range(arr.ndim))]
        kind = arr.dtype.kind
        if kind in "Mm":
            text = np.datetime_as_string(arr) if kind == "M" else arr.astype(str)
            text = text.astype(object)
            text[np.isnat(arr)] = None
            data = text.tolist()
        else:
            data = arr.tolist()
        data = self.convert(data, depth)
        if not truncated:
            return data
        return {
            "type": "ndarray",
            "dtype": str(arr.dtype),
            "shape": shape,
            "data": data,
            "truncated": True,
        }

    # -- pandas --------------------------------------------------------------------------------
    def _pandas(self, obj, pd, depth):
        DataFrame = getattr(pd, "DataFrame", None)
        if DataFrame is not None and isinstance(obj, DataFrame):
            return self._dataframe(obj, depth)
        Series = getattr(pd, "Series", None)
        if Series is not None and isinstance(obj, Series):
            return self._series(obj, depth)
        if obj is getattr(pd, "NaT", _MISSING) or obj is getattr(pd, "NA", _MISSING):
            return None
        Timedelta = getattr(pd, "Timedelta", None)
        if Timedelta is not None and isinstance(obj, Timedelta):
            return str(obj)
        Index = getattr(pd, "Index", None)
        if Index is not None and isinstance(obj, Index):
            return self._index(obj, depth)[0]
        Period, Interval = getattr(pd, "Period", None), getattr(pd, "Interval", None)
        if Period is not None and isinstance(obj, Period | Interval):
            return self.text(str(obj))
        return _MISSING

    def _index(self, index, depth, limit=None):
        limit = self.max_rows if limit is None else limit
        values = index[:limit].tolist()
        return self.convert(values, depth + 1), len(index) > limit

    def _dataframe(self, df, depth):
        before = self.truncations
        n_rows, n_cols = (int(n) for n in df.shape)
        part = df.iloc[: self.max_rows, :MAX_COLUMNS]
        columns = [self.text(str(c)) for c in part.columns]
        dtypes = {}
        for col, dtype in zip(columns, part.dtypes, strict=False):
            dtypes[col] = str(dtype)
        index, _ = self._index(part.index, depth, self.max_rows)
        data = []
        for row in part.itertuples(index=False, name=None):
            if self.items_left <= 0:
                self.truncations += 1
                break
            self.items_left -= 1
            data.append(self.convert(list(row), depth + 1))
        truncated = n_rows > len(data) or n_cols > len(columns) or self.truncations > before
        return {
            "type": "dataframe",
            "columns": columns,
            "dtypes": dtypes,
            "index": index,
            "data": data,
            "shape": [n_rows, n_cols],
            "truncated": bool(truncated),
        }

    def _series(self, series, depth):
        before = self.truncations
        n = int(len(series))
        part = series.iloc[: self.max_rows]
        index, _ = self._index(part.index, depth, self.max_rows)
        data = self.convert(part.tolist(), depth + 1)
        return {
            "type": "series",
            "name": self.convert(series.name, depth + 1),
            "dtype": str(series.dtype),
            "index": index,
            "data": data,
            "shape": [n],
            "truncated": bool(n > len(part) or self.truncations > before),
        }


def to_json(value, max_rows=100, max_chars=100_000):
    """Convert ``value`` to JSON-safe data (bounded, NaN/inf -> None). Never raises."""
    max_rows = _clamp(max_rows, 100)
    max_chars = _clamp(max_chars, 100_000, 16)
    try:
        return _Converter(max_rows, max_chars).convert(value)
    except BaseException:
        return _safe_repr(value, max_chars)


# --------------------------------------------------------------------------------------------
# Variable listing
# --------------------------------------------------------------------------------------------

_CHEAP_LEN_TYPES = (
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
    range,
    collections.deque,
    collections.abc.KeysView,
    collections.abc.ValuesView,
    collections.abc.ItemsView,
)


def _describe(name, value):
    entry = {"name": name, "type": _type_name(value), "shape": None, "length": None}
    try:
        if not isinstance(value, type) and getattr(type(value), "shape", None) is not None:
            shape = value.shape
            if isinstance(shape, tuple) and all(
                isinstance(n, int) or type(n).__module__ == "numpy" for n in shape
            ):
                entry["shape"] = [int(n) for n in shape]
    except BaseException:
        pass
    try:
        if entry["shape"] is None and isinstance(value, _CHEAP_LEN_TYPES):
            entry["length"] = len(value)
    except BaseException:
        pass
    entry["size_bytes"] = _size_bytes(value)
    return entry


def _size_bytes(value):
    try:
        pd = sys.modules.get("pandas")
        if pd is not None:
            if isinstance(value, pd.DataFrame):
                return int(value.memory_usage(deep=False).sum())
            if isinstance(value, pd.Series):
                return int(value.memory_usage(deep=False))
        np = sys.modules.get("numpy")
        if np is not None and isinstance(value, np.ndarray):
            return int(value.nbytes)
    except BaseException:
        pass
    try:
        return int(sys.getsizeof(value))
    except BaseException:
        return None


def variables():
    """The user's variables (sorted, at most MAX_VARIABLES) as a :class:`JSONPayload`."""
    entries = []
    truncated = False
    try:
        shell = _shell()
        ns = _user_ns()
        hidden = getattr(shell, "user_ns_hidden", None) or {}
        names = sorted(
            k
            for k in list(ns)
            if isinstance(k, str) and not k.startswith("_") and k not in _IPYTHON_NAMES
        )
        for name in names:
            value = ns.get(name, _MISSING)
            if value is _MISSING or isinstance(value, types.ModuleType):
                continue
            if name in hidden and hidden[name] is value:
                continue
            if len(entries) >= MAX_VARIABLES:
                truncated = True
                break
            try:
                entries.append(_describe(name, value))
            except BaseException:
                entries.append(
                    {
                        "name": name,
                        "type": "object",
                        "shape": None,
                        "length": None,
                        "size_bytes": None,
                    }
                )
    except BaseException:
        pass
    return _checked_payload({"variables": entries, "truncated": truncated}, "variables", 1000)
