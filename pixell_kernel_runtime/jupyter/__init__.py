"""The Jupyter Server kernels API over the session kernels (what a gateway client speaks)."""

from __future__ import annotations

from typing import Any

# jupyter_server's own kernel id pattern: only UUID-shaped ids reach these handlers.
KERNEL_ID = r"(\w+-\w+-\w+-\w+-\w+)"


def routes(kw: dict[str, Any]) -> list[Any]:
    """The Jupyter API's routes, for ``app.make_app``."""
    from pixell_kernel_runtime.jupyter import channels, kernels

    return [
        (r"/api", kernels.APIVersionHandler, kw),
        (r"/api/kernelspecs", kernels.KernelSpecsHandler, kw),
        (r"/api/kernelspecs/([^/]+)", kernels.KernelSpecHandler, kw),
        (r"/kernelspecs/([^/]+)/([^/]+)", kernels.KernelSpecResourceHandler, kw),
        (r"/api/kernels", kernels.KernelsHandler, kw),
        (rf"/api/kernels/{KERNEL_ID}", kernels.KernelHandler, kw),
        (rf"/api/kernels/{KERNEL_ID}/interrupt", kernels.InterruptHandler, kw),
        (rf"/api/kernels/{KERNEL_ID}/restart", kernels.RestartHandler, kw),
        (rf"/api/kernels/{KERNEL_ID}/channels", channels.ChannelsHandler, kw),
    ]
