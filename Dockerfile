FROM python:3.11-slim-bookworm

# bubblewrap: per-kernel namespaces; make: the README's commands.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pixell-kernel-runtime
COPY pyproject.toml README.md ./
COPY pixell_kernel_runtime ./pixell_kernel_runtime
COPY kernels ./kernels
COPY examples ./examples
RUN pip install --no-cache-dir -e '.[analysis]'

ENV HOST=0.0.0.0 \
    PORT=8000 \
    STATE_DIR=/var/lib/pixell-kernel-runtime \
    PACKAGES_DIR=/tmp/pixell-runtime/packages
RUN mkdir -p /var/lib/pixell-kernel-runtime /tmp/pixell-runtime/packages
EXPOSE 8000
# Drop the packages to load into the mounted PACKAGES_DIR (as the original's image did).
CMD ["python", "-m", "pixell_kernel_runtime", "serve", "--examples"]
