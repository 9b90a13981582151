# syntax=docker/dockerfile:1
#
# The extauthz guard as a container: gRPC on 9191 (ext_authz, ext_proc, health, reflection,
# admin) and HTTP on 9192 (/metrics, /healthz, /readyz). Build from the repo root:
#
#   docker build -t extauthz:0.1.0 .
#
# The runtime runs as uid 10001 and writes nothing: it works with readOnlyRootFilesystem: true
# (tests/integration/test_dockerfile.py runs this stage's command read-only, as a non-root user).
# Both stages use the same base so the venv's interpreter link and bytecode match; pin it by
# digest (python:3.11-slim@sha256:...) in a release pipeline for reproducible builds.

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the checkout out).
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz

# Build the project's wheel, then install it with its core dependencies only (no `dev` or
# `demo` extras) into a venv that the runtime stage copies whole. pip compiles bytecode at
# install time, so the read-only runtime never needs to write .pyc files.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/extauthz \
    && /opt/extauthz/bin/pip install --no-cache-dir /wheels/extauthz-*.whl \
    && /opt/extauthz/bin/pip uninstall --yes pip

FROM python:3.11-slim AS runtime

# A system user and group 10001 with no login shell and no home directory: nothing may be
# written under $HOME.
RUN groupadd --system --gid 10001 extauthz \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin extauthz

COPY --from=builder /opt/extauthz /opt/extauthz

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/extauthz/bin:$PATH

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
WORKDIR /

EXPOSE 9191 9192

# For docker and compose (Kubernetes uses the Deployment's probes instead). The slim image has no
# curl: the venv's Python asks /healthz directly, bypassing any http_proxy, on the port from
# EXTAUTHZ_HTTP_PORT when that is set. Any non-2xx answer or connection error exits non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/extauthz/bin/python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % (os.environ.get('EXTAUTHZ_HTTP_PORT') or '9192'), timeout=2)"]

ENTRYPOINT ["/opt/extauthz/bin/extauthz"]
# Bind all interfaces inside the pod; Envoy (sidecar or gateway) reaches the guard over the pod IP.
CMD ["serve", "--host", "0.0.0.0"]
