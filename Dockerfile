# pgveil: the proxy (port 6432) and its admin server (/metrics, /healthz, /readyz; port 9187).
#
#   docker build -t pgveil .
#   docker run -p 6432:6432 -p 9187:9187 -v "$PWD/pgveil.yaml:/etc/pgveil/pgveil.yaml:ro" \
#       -v pgveil-keys:/var/lib/pgveil pgveil
#
# The configuration is mounted, never baked in: it references key files and tokens, which must come from
# a secret mount too. The proxy must listen on 0.0.0.0 inside the container (listen and admin addresses in
# the configuration) for the published ports to reach it. The one writable place is /var/lib/pgveil (a
# volume): point the local key provider there (`master_key: {provider: local, path:
# /var/lib/pgveil/master.key}`), because relative paths resolve against the configuration's directory,
# which is read-only. The image runs with a read-only root filesystem (`--read-only --tmpfs /tmp`).
# docs/deployment.md has the rest (docker compose, Prometheus, Grafana).
# Build stage: wheels for pgveil (with its native accelerator, compiled against OpenSSL) and its
# dependencies. The runtime stage installs only the wheels: no compiler in the image.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
# PGVEIL_BUILD_NATIVE=1: a failed accelerator build fails the image instead of falling back to Python.
RUN PGVEIL_BUILD_NATIVE=1 pip wheel --no-cache-dir --wheel-dir /wheels /src

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric uid, so orchestrators can check runAsNonRoot without resolving names.
RUN groupadd --system --gid 10001 pgveil \
 && useradd --system --uid 10001 --gid pgveil --home-dir /var/lib/pgveil --no-create-home \
        --shell /usr/sbin/nologin pgveil \
 && install -d -o root -g pgveil -m 0750 /etc/pgveil \
 && install -d -o pgveil -g pgveil -m 0700 /var/lib/pgveil

# The slim image already has OpenSSL's runtime library (libssl3), which the accelerator links against.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels pgveil && rm -rf /tmp/wheels \
 && PGVEIL_IMPL=native pgveil --version

LABEL org.opencontainers.image.title="pgveil" \
      org.opencontainers.image.description="PostgreSQL proxy with transparent column encryption" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 10001:10001
WORKDIR /var/lib/pgveil
# Key files of the local provider (generated on first run, mode 0600) and their older versions: keep them
# on a volume, or the key that encrypts every stored value is lost with the container.
VOLUME ["/var/lib/pgveil"]

EXPOSE 6432 9187

# Only this check reads the variable; change it if the admin server listens elsewhere. No proxy
# handler, so an HTTP(S)_PROXY in the environment cannot send the check off the container.
ENV PGVEIL_HEALTHCHECK_URL=http://127.0.0.1:9187/healthz
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['PGVEIL_HEALTHCHECK_URL'], timeout=3)"]

# SIGTERM: stop accepting, let busy sessions finish for sessions.shutdown_timeout, then end.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgveil"]
CMD ["serve", "--config", "/etc/pgveil/pgveil.yaml"]
