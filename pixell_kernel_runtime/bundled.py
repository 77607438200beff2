"""What ships inside the package besides its modules, found with importlib.resources.

Kept free of the runtime's heavier imports: the tests and the builder reach it on their own.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def examples_dir() -> Path:
    """The example agent sources installed with the package (what ``serve --examples`` builds)."""
    root = importlib.resources.files("pixell_kernel_runtime") / "examples"
    # An ordinary install is a folder; a zipped one has nothing the builder could walk.
    if not isinstance(root, Path):
        raise RuntimeError(
            f"the bundled examples are not on a filesystem ({root}): use --examples-dir"
        )
    return root
