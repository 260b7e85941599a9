# syntax=docker/dockerfile:1
# The gateway on a slim Python base, as a non-root user, configured from /etc/gateway.
#   docker build -t gateway .
#   docker run -p 8080:8080 -v $PWD/config:/etc/gateway:ro gateway
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The otel extra: span export works when a config sets tracing.otlp_endpoint.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[otel]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/gateway
WORKDIR /var/lib/gateway
USER gateway
# The shipped config reads these; inside a container the listeners must not be loopback-only.
# A non-loopback admin listener is safe without a token: /healthz, /readyz and /metrics answer
# anyone (probes, Prometheus), everything else only loopback callers until admin.token is set
# (GATEWAY_ADMIN_TOKEN), and then only with it.
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9901 \
    PYTHONUNBUFFERED=1
EXPOSE 8080 9901
# Ready = config loaded and the proxy listening; 503 while draining. The slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('GATEWAY_ADMIN_LISTEN', '0.0.0.0:9901').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway", "run"]
CMD ["--config", "/etc/gateway/gateway.yaml"]
