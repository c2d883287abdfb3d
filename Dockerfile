# Tollgate services (dispatcher, simulator, agents) for docker-compose / Kubernetes.
FROM python:3.11-slim
WORKDIR /opt/tollgate
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOLLGATE_STATE_DIR=/var/lib/tollgate
COPY pyproject.toml README.md ./
COPY app ./app
COPY agents ./agents
COPY schemas ./schemas
COPY deploy ./deploy
RUN pip install -e . && useradd --system --home /var/lib/tollgate tollgate \
    && mkdir -p /var/lib/tollgate && chown tollgate /var/lib/tollgate
USER tollgate
ENTRYPOINT ["tollgate"]
CMD ["--help"]
