"""Kernel sandbox: a launcher in front of ipykernel plus the server-side bookkeeping.

``from pixell_kernel_runtime.sandbox import Sandbox, SandboxUnavailable``

Kept import-free on purpose: the server-side classes are loaded lazily on first attribute
access, so that importing ``pixell_kernel_runtime.sandbox.<module>`` (the provisioner, the
stdlib-only ``confine``/``seccomp`` the launcher also loads by path) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .core import Sandbox, SandboxUnavailable

__all__ = ["Sandbox", "SandboxUnavailable"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
