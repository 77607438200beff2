"""The code sent into kernels: the helper module at start, and the cells that call handlers.

``kernel_side.py`` is never imported by the server; its source is executed in
each fresh kernel as a module named ``__pixell__``, so the runtime's own
package never has to be on a kernel's ``sys.path``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

_KERNEL_SIDE = Path(__file__).with_name("kernel_side.py")

# Reached through sys.modules, so user code that rebinds or deletes the name
# ``__pixell__`` cannot break the runtime's read-back.
_HELPER = "__import__('sys').modules['__pixell__']"
# What the server reads back after each cell, through user_expressions.
COLLECT_EXPRESSION = {"r": f"{_HELPER}.collect()"}
VARIABLES_EXPRESSION = {"r": f"{_HELPER}.variables()"}


# Compiling the bootstrap cell (IPython's passes over it, then the helper's source) leaves its
# peak in malloc's free lists: given back, with what the kernel's start left there, some 2 MiB
# of every idle session (glibc only; elsewhere nothing happens).
TRIM_CELL = (
    "try:\n    __import__('ctypes').CDLL('libc.so.6').malloc_trim(0)\nexcept Exception:\n    pass\n"
)


@cache
def bootstrap_code() -> str:
    source = _KERNEL_SIDE.read_text(encoding="utf-8")
    return (
        "import sys as __s, types as __t\n"
        "__m = __t.ModuleType('__pixell__')\n"
        f"exec(compile({source!r}, '<pixell-runtime>', 'exec'), __m.__dict__)\n"
        "__s.modules['__pixell__'] = __m\n"
        "__pixell__ = __m\n"
        "__pixell__.install()\n"
        "del __s, __t, __m\n"
    ) + TRIM_CELL


# The name under which phase one leaves an awaitable return value for phase two.
_PENDING = "__pixell_pending"
# Read back after phase one: did the handler return an awaitable?
HANDLER_EXPRESSIONS = {**COLLECT_EXPRESSION, "pending": f"{_PENDING!r} in globals()"}


def handler_cell(module: str, function: str, payload: dict) -> str:
    """Phase one of a handler call: import ``module`` and call ``function(payload)``.

    The cell holds no ``await``: ipykernel (7.4, verified end to end) does not interrupt a
    cell with a top-level ``await``, so with one a synchronous handler that loops or sleeps
    could never be interrupted (a timeout restarted the kernel, losing the session's state).
    An awaitable return value is left in ``__pixell_pending`` for :data:`AWAIT_HANDLER_CELL`
    (async handlers keep that limitation).

    The module and function names were validated as dotted identifiers when the
    package was loaded; the payload travels as a JSON string literal, so no
    caller-supplied text is ever spliced into code.
    """
    data = json.dumps(payload, ensure_ascii=True, allow_nan=False)
    return (
        f"globals().pop({_PENDING!r}, None)\n"
        f"__pixell_rv = {_HELPER}.call_handler({module!r}, {function!r}, {data!r})\n"
        f"if {_HELPER}.isawaitable(__pixell_rv):\n"
        f"    {_PENDING} = __pixell_rv\n"
        "else:\n"
        f"    {_HELPER}.set_handler_result(__pixell_rv)\n"
        "del __pixell_rv\n"
    )


# Phase two, only when phase one left an awaitable: await it.
AWAIT_HANDLER_CELL = (
    f"__pixell_rv = {_PENDING}\n"
    f"del {_PENDING}\n"
    "__pixell_rv = await __pixell_rv\n"
    f"{_HELPER}.set_handler_result(__pixell_rv)\n"
    "del __pixell_rv\n"
)
