"""SandboxProvisioner: how jupyter_client launches, kills and cleans up a session kernel.

Named in the kernel spec (``metadata.kernel_provisioner``) and registered under the
``jupyter_client.kernel_provisioners`` entry point, so that every start and restart of a
session kernel, by the runtime or by anything driving its kernel manager, goes through here:

* ``pre_launch``: the connection file (written by jupyter_client in the root-owned server dir)
  becomes readable by the kernel's group only; the kernel's environment moves into the pinned
  policy; the process itself starts as ``python -I <launcher>`` with cwd ``/`` and a fixed
  four-variable environment; its output goes to a log opened off the event loop, never through
  a link or a FIFO.
* ``kill``: the whole tree at once through the kernel's cgroup.
* ``cleanup``: on every restart as well as at shutdown, nothing the old kernel forked survives
  (cgroup and session ids swept) and its cgroups are removed.

The kernel manager carries the session: ``km.sandbox`` (the server's ``Sandbox``) and
``km.sandbox_session`` (its ``SandboxSession``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from typing import Any

from jupyter_client.provisioning import LocalProvisioner

from . import layout


class SandboxProvisioner(LocalProvisioner):  # type: ignore[misc]
    _log_fd: int | None = None

    def _session(self) -> tuple[Any, Any]:
        km = self.parent
        sandbox = getattr(km, "sandbox", None)
        session = getattr(km, "sandbox_session", None)
        if sandbox is None or session is None:
            raise RuntimeError(
                "the pixell sandbox provisioner only launches kernels of a runtime session"
            )
        return sandbox, session

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        sandbox, session = self._session()
        kwargs = await super().pre_launch(**kwargs)
        kernel_env = dict(kwargs.get("env") or {})
        await asyncio.to_thread(
            layout.secure_connection_file, session.dirs.connection_file, session.owners
        )
        # Locked again by the kernel's owner once the new kernel has bound its sockets.
        await asyncio.to_thread(layout.open_socket_dir, session.dirs, session.owners)
        prefix, env, cwd = await asyncio.to_thread(sandbox.prepare_launch, session, kernel_env)
        kwargs["cmd"] = prefix + list(kwargs["cmd"])
        kwargs["env"] = env
        kwargs["cwd"] = cwd
        self._close_log()
        self._log_fd = await asyncio.to_thread(layout.open_log, session.dirs.log_file)
        kwargs["stdout"] = kwargs["stderr"] = self._log_fd
        kwargs["stdin"] = subprocess.DEVNULL
        return kwargs

    async def post_launch(self, **kwargs: Any) -> None:
        # The child holds its own copy of the log descriptor.
        self._close_log()
        await super().post_launch(**kwargs)

    async def kill(self, restart: bool = False) -> None:
        sandbox, session = self._session()
        await asyncio.to_thread(sandbox.kill, session)
        await super().kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        self._close_log()
        sandbox, session = self._session()
        await asyncio.to_thread(sandbox.end_launch, session)

    def _close_log(self) -> None:
        fd, self._log_fd = self._log_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
