# echo-async in a container: a slim Python base, a virtualenv built in a first stage, a non-root
# user, and a drain that `docker stop` can wait for.
#
#   docker build -t echo-async .
#   docker run --rm -p 12000:12000 -p 127.0.0.1:9100:9100 --stop-timeout 20 echo-async
#
# `docker stop` waits 10 s by default, no longer than --shutdown-timeout: give it more
# (--stop-timeout, or stop_grace_period in Compose). Kubernetes: deploy/kubernetes/.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY echo_async ./echo_async
RUN python -m venv /opt/echo-async \
 && /opt/echo-async/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin echo-async
COPY --from=build /opt/echo-async /opt/echo-async
ENV PATH=/opt/echo-async/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
# The echo port, and /metrics and /healthz.
EXPOSE 12000 9100
# echo-async drains on SIGTERM, also as PID 1: /healthz turns 503, open connections get their
# echo and EOF, then it exits 0.
STOPSIGNAL SIGTERM
# 200 while accepting; 503 (draining) or no answer makes urlopen raise, so the exit status is 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]
ENTRYPOINT ["echo-async", "serve"]
# Inside a container the service must listen beyond loopback to be reachable.
CMD ["--host", "0.0.0.0", "--port", "12000", "--metrics", "0.0.0.0:9100", "--log-format", "json", "--shutdown-timeout", "10"]
