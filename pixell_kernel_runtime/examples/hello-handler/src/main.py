"""hello-handler: each export takes ONE dict (the invoke ``input``) and returns a JSON-able dict.

``handler`` is the kit's entrypoint (``{"action", "data"}`` in, ``{"status", "data", "error"}``
out); the runtime calls the sub-agent functions ``greet``, ``count`` and ``echo_async`` directly.
"""

import asyncio

_counter = 0


def greet(data: dict) -> dict:
    """Return a greeting for ``data["name"]`` (default "world") and print a line to stdout."""
    data = data if isinstance(data, dict) else {}
    name = str(data.get("name") or "world")
    print(f"greeting {name}")
    return {"greeting": f"Hello, {name}!"}


def count(data: dict) -> dict:
    """Increment a module-level counter: it keeps growing within one session's kernel."""
    global _counter
    data = data if isinstance(data, dict) else {}
    step = data.get("step", 1)
    _counter += step if isinstance(step, int) and not isinstance(step, bool) else 1
    return {"count": _counter}


async def echo_async(data: dict) -> dict:
    """Return the input unchanged, after yielding to the event loop once."""
    await asyncio.sleep(0)
    return {"echo": data}


def handler(request: dict) -> dict:
    """Kit-style entrypoint: dispatch ``request["action"]`` to greet, count or echo."""
    request = request if isinstance(request, dict) else {}
    action = request.get("action", "greet")
    data = request.get("data") or {}
    if action == "greet":
        result = greet(data)
    elif action == "count":
        result = count(data)
    elif action in ("echo", "echo-async"):
        result = {"echo": data}
    else:
        return {"status": "error", "data": None, "error": f"unknown action: {action!r}"}
    return {"status": "success", "data": result, "error": None}
