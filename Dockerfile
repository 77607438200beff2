# syntax=docker/dockerfile:1
# The production image (docs/deploy.md explains each choice; tests/test_docker.py checks this
# file against the package: entry point, flags, user, ports, volumes, health check).
# Build: docker build -t pixell-kernel-runtime .   (BuildKit, the default since Docker 23)

# Stage 1: the runtime's wheel, built from the source tree (the example agents ship inside the
# package), and wheels of everything it depends on, so that the image installs from files only.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pixell_kernel_runtime ./pixell_kernel_runtime
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[analysis]"

# Stage 2: that wheel installed as users install it (not editable); no source tree in the image.
FROM python:3.11-slim-bookworm

# bubblewrap: each kernel's namespaces. tini: PID 1, which hands SIGTERM to the server (a
# process that is PID 1 gets no default signal handling) and reaps orphans.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap tini \
    && rm -rf /var/lib/apt/lists/*

# The server's own account: a fixed numeric uid, so that Kubernetes' runAsNonRoot can check it
# and a host can own mounted volumes by number.
RUN groupadd --system --gid 10001 pixell \
    && useradd --system --uid 10001 --gid pixell --no-create-home \
        --home-dir /var/lib/pixell-kernel-runtime --shell /usr/sbin/nologin pixell

# From the builder's wheels only: --no-index keeps a same-named package of an index out, and the
# wheels are bind-mounted, not copied, so they leave no layer behind.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --only-binary=:all: --find-links=/wheels \
        "pixell-kernel-runtime[analysis]"

# Settings by environment (docs/deploy.md): the port from PORT (the health check follows it),
# metrics on their own port, reachable from outside the container. Bound to 0.0.0.0 with no
# AUTH_TOKENS_FILE or OIDC_ISSUER, the server generates a token and prints it once at start
# (`docker logs`); mount a tokens file and set AUTH_TOKENS_FILE (or OIDC_ISSUER/OIDC_AUDIENCE)
# for real tenants.
ENV PORT=8000 \
    METRICS_PORT=9090 \
    METRICS_HOST=0.0.0.0 \
    STATE_DIR=/var/lib/pixell-kernel-runtime \
    PACKAGES_DIR=/tmp/pixell-runtime/packages

# Created here, owned by the server's account, before VOLUME: a new named volume starts as a copy
# of this (owner included), and changes made after VOLUME would be discarded.
RUN mkdir -p /var/lib/pixell-kernel-runtime /tmp/pixell-runtime/packages \
    && chown pixell:pixell /var/lib/pixell-kernel-runtime /tmp/pixell-runtime/packages \
    && chmod 0750 /var/lib/pixell-kernel-runtime
# The state (package store, examples' builds) and the folder of APKGs loaded at start (the seed's
# `-v /path/to/packages:/tmp/pixell-runtime/packages`).
VOLUME ["/var/lib/pixell-kernel-runtime", "/tmp/pixell-runtime/packages"]
WORKDIR /var/lib/pixell-kernel-runtime
USER 10001:10001
EXPOSE 8000 9090

# /runtime/health needs no token. `-I`: nothing of the working directory (the state) is imported.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/runtime/health', timeout=4)"]

# SIGTERM (what `docker stop` sends) goes to the server alone (tini without -g): it drains running
# calls for SHUTDOWN_GRACE_SECONDS and shuts its kernels down itself. Give `docker stop` longer.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["pixell-kernel-runtime", "serve", "--host", "0.0.0.0"]
