"""The session kernels' spec, built in code: no global Jupyter kernelspec that a front-end
could start outside the sandbox, and nothing to find on disk in an installed wheel.

``KERNELS_DIR`` may point at a folder with a ``pixell-python/kernel.json`` of the operator's;
it must name the sandbox provisioner, or the runtime refuses to start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

KERNEL_NAME = "pixell-python"
PROVISIONER_NAME = "pixell-sandbox"


def builtin_spec() -> KernelSpec:
    return KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Pixell Python (sandboxed)",
        language="python",
        # A wrapper sits in front of the kernel: SIGINT would kill bwrap and the kernel with it.
        interrupt_mode="message",
        metadata={
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": {}},
        },
        resource_dir="",
    )


class SpecError(RuntimeError):
    pass


class RuntimeKernelSpecManager(KernelSpecManager):  # type: ignore[misc]
    """The built-in spec, or the operator's from ``kernels_dir``, checked either way."""

    def __init__(self, kernels_dir: Path | None = None, **kw: Any) -> None:
        super().__init__(kernel_dirs=[str(kernels_dir)] if kernels_dir else [], **kw)
        self.kernels_dir = kernels_dir
        self._spec = self._load()

    def _load(self) -> KernelSpec:
        if self.kernels_dir is None:
            return builtin_spec()
        try:
            spec = super().get_kernel_spec(KERNEL_NAME)
        except NoSuchKernel:
            raise SpecError(f"kernel spec missing: {self.kernels_dir}/{KERNEL_NAME}") from None
        name = (spec.metadata or {}).get("kernel_provisioner", {}).get("provisioner_name")
        if name != PROVISIONER_NAME:
            raise SpecError(
                f"kernel spec {self.kernels_dir}/{KERNEL_NAME} does not launch through the "
                f"sandbox (metadata.kernel_provisioner.provisioner_name must be "
                f"{PROVISIONER_NAME!r}, got {name!r}): refusing to start unconfined kernels"
            )
        return spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != KERNEL_NAME:
            raise NoSuchKernel(kernel_name)
        return self._spec

    def find_kernel_specs(self) -> dict[str, str]:
        return {KERNEL_NAME: self._spec.resource_dir}

    def describe(self) -> dict[str, Any]:
        return {
            "name": KERNEL_NAME,
            "source": str(self.kernels_dir / KERNEL_NAME) if self.kernels_dir else "built-in",
            "provisioner": PROVISIONER_NAME,
            "argv": list(self._spec.argv),
        }
