# carod in a container. Build: docker build -t carod .
# Run:   docker run --rm -e CAROD_BROKER_URL=amqp://user:pass@broker:5672/ carod
# carod runs as root inside the container so that it can start jobs as `nobody`.
FROM python:3.11-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap procps \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY carod ./carod
RUN pip install --no-cache-dir . && rm -rf /src
COPY etc/carod.conf /etc/carod/carod.conf
RUN mkdir -p /var/lib/carod && chmod 0711 /var/lib/carod
VOLUME /var/lib/carod
ENV CAROD_CONFIG=/etc/carod/carod.conf
HEALTHCHECK --interval=30s --timeout=5s CMD pgrep -f "carod" >/dev/null || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["carod"]
