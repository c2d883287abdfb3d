# Tollgate services (dispatcher, simulator, agents) for docker-compose / Kubernetes.
FROM python:3.11-slim
WORKDIR /opt/tollgate
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOLLGATE_STATE_DIR=/var/lib/tollgate
COPY pyproject.toml README.md ./
COPY app ./app
COPY agents ./agents
COPY devtools ./devtools
COPY schemas ./schemas
COPY deploy ./deploy
# /var/lib/tollgate-secrets: a named volume mounted there starts owned by tollgate, mode 0700.
RUN pip install -e . && useradd --system --home /var/lib/tollgate tollgate \
    && mkdir -p /var/lib/tollgate /var/lib/tollgate-secrets \
    && chown tollgate /var/lib/tollgate /var/lib/tollgate-secrets \
    && chmod 0700 /var/lib/tollgate-secrets
USER tollgate
ENTRYPOINT ["tollgate"]
CMD ["--help"]
