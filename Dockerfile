# balancer: the gevent reverse proxy and its management API in one slim image.
#   docker build -t balancer .
#   docker run -p 8080:8080 balancer          (routes in a file inside the container)
# Settings come from BALANCER_* environment variables (every one: docs/settings.md).

# Build stage: the data plane's hot modules are compiled with mypyc (setup.py),
# which needs a C compiler; the image that runs gets only the wheel.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY balancer ./balancer
COPY management ./management
COPY loadtest ./loadtest
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gevent, httptools and hiredis ship manylinux wheels for 3.11: no compiler needed here.
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# An unprivileged user owns only its working directory (the file store lives there).
RUN groupadd --system --gid 10001 balancer \
 && useradd --system --uid 10001 --gid balancer --home-dir /var/lib/balancer \
            --create-home --shell /usr/sbin/nologin balancer
USER balancer:balancer
WORKDIR /var/lib/balancer

# The proxy listens on every interface of the container. The management API stays
# on loopback unless a token is set (it refuses a public address without one):
# to expose it, set BALANCER_MANAGEMENT_LISTEN=0.0.0.0:8081 and BALANCER_MANAGEMENT_TOKEN.
ENV BALANCER_SERVER_LISTEN=0.0.0.0:8080 \
    BALANCER_MANAGEMENT_LISTEN=127.0.0.1:8081 \
    BALANCER_STORE_URL=file:/var/lib/balancer/routes.json \
    HEALTHCHECK_URL=http://127.0.0.1:8081/healthz
EXPOSE 8080 8081
VOLUME ["/var/lib/balancer"]

# /healthz needs no token; the image has no curl, so Python's urllib asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2).status == 200 else 1)"]

# SIGTERM (docker stop) drains in-flight requests for timeouts.graceful seconds;
# give docker stop at least that long (docker stop -t 35).
STOPSIGNAL SIGTERM
CMD ["balancer", "serve"]
