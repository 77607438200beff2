"""The one place that builds a kernel's environment.

The result travels inside the pinned policy and is applied by the launcher only at its last
step, as the kernel's own ids: no privileged stage ever runs with it.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("pixell_kernel_runtime.sandbox")

# Variables a package may not set: they would change how Python, the loader or the C library
# start, or impersonate the runtime's own wiring. (They can no longer reach a privileged stage;
# inside the kernel they would still break the runtime's helper or its view of the session.)
RESERVED = frozenset(
    {
        "PATH",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONSAFEPATH",
        "PYTHONNOUSERSITE",
        "PYTHONUSERBASE",
        "PYTHONEXECUTABLE",
        "PYTHONPLATLIBDIR",
        "PYTHONWARNINGS",
        "PYTHONINSPECT",
        "HOME",
        "TMPDIR",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCPATH",
        "NLSPATH",
        "RES_OPTIONS",
        "OPENSSL_CONF",
        "OPENSSL_MODULES",
        "OPENSSL_ENGINES",
    }
)
RESERVED_PREFIXES = ("PIXELL_", "JPY_", "JUPYTER_", "IPYTHON", "LD_", "MALLOC_", "BWRAP")


def is_reserved(name: str) -> bool:
    return name in RESERVED or name.startswith(RESERVED_PREFIXES)


def kernel_environment(
    package_env: dict[str, str],
    *,
    package_root: str | None,
    home: str,
    tmp: str,
) -> dict[str, str]:
    """The kernel's whole environment: a fixed minimum, its dirs, then the package's variables."""
    bin_dir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "HOME": home,
        "TMPDIR": tmp,
        "IPYTHONDIR": os.path.join(home, ".ipython"),
        "MPLCONFIGDIR": os.path.join(home, ".config", "matplotlib"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
    }
    if package_root:
        env["PYTHONPATH"] = package_root
    for key, value in package_env.items():
        if is_reserved(key) or key in env:
            log.warning("package variable %s ignored: reserved by the runtime", key)
            continue
        env[key] = value
    return env
