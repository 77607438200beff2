"""PLACEHOLDER until the sandbox implementation lands (same interface)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SandboxUnavailable(Exception):
    pass


class Sandbox:
    def __init__(self, mode: str = "best_effort", config_path: Path | None = None,
                 run_dir: Path | None = None) -> None:
        self.mode = mode

    async def start(self) -> None:
        return None

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "layers": {}}

    def prepare_kernel(self, **kw: Any) -> dict[str, str]:
        return {}

    def release_kernel(self, kernel_dir: Path) -> None:
        return None
