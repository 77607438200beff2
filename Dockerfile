# Stage 1: build the wheel from the source tree (the examples ship inside the package).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pixell_kernel_runtime ./pixell_kernel_runtime
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

# Stage 2: install that wheel as users do (not editable); no source tree in the image.
FROM python:3.11-slim-bookworm

# bubblewrap: per-kernel namespaces.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir "$(ls /tmp/wheels/pixell_kernel_runtime-*.whl)[analysis]" \
    && rm -rf /tmp/wheels

# Bound to 0.0.0.0 with no AUTH_TOKENS_FILE or OIDC_ISSUER set, the server generates a token,
# prints it once at start (`docker logs`) and requires it. Mount a tokens file and set
# AUTH_TOKENS_FILE (or OIDC_ISSUER/OIDC_AUDIENCE) for real tenants; AUTH=none turns
# authentication off (loudly): only for a private, trusted network.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    STATE_DIR=/var/lib/pixell-kernel-runtime \
    PACKAGES_DIR=/tmp/pixell-runtime/packages
RUN mkdir -p /var/lib/pixell-kernel-runtime /tmp/pixell-runtime/packages
WORKDIR /var/lib/pixell-kernel-runtime
EXPOSE 8000
# Drop the packages to load into the mounted PACKAGES_DIR (as the original's image did).
CMD ["pixell-kernel-runtime", "serve", "--examples"]
