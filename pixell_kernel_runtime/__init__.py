"""Pixell Kernel Runtime: a sandboxed, Jupyter-kernel-backed executor for agent packages."""

__version__ = "0.1.0"
