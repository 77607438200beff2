"""Running code in session kernels: bootstrap, kernel-side helpers, execution."""
