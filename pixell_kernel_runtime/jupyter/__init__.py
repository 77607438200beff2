"""The Jupyter Server kernels API over the session kernels (what a gateway client speaks)."""

from __future__ import annotations

from typing import Any


def routes(kw: dict[str, Any]) -> list[Any]:
    """The Jupyter API's routes, for ``app.make_app``."""
    return []
