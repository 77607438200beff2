"""Entrypoint required by the pixell-kit schema.

The Pixell Kernel Runtime never calls this: the package's capabilities include
``code-execution``, so every sub-agent (code-executor, stream-executor, data-analyzer,
ml-runner) is served by the runtime's own code executor, which runs ``input.code`` as a cell in
the session's kernel. This handler only answers the kit's ``{"action", "data"}`` convention with
a description of the agent; it never executes code.
"""

AGENT = "pixell-python-agent"
VERSION = "0.1.0"
SUB_AGENTS = ["code-executor", "stream-executor", "data-analyzer", "ml-runner"]


def handler(request: dict) -> dict:
    """Describe the agent; the runtime's code executor does the actual work."""
    request = request if isinstance(request, dict) else {}
    action = request.get("action", "info")
    return {
        "status": "success",
        "data": {
            "agent": AGENT,
            "version": VERSION,
            "action": action,
            "sub_agents": SUB_AGENTS,
            "message": "Code execution is served by the Pixell Kernel Runtime's code executor; "
            "invoke e.g. pixell-python-agent@0.1.0/code-executor with input.code.",
        },
        "error": None,
    }
