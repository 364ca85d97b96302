# The API / training image of the COVID-19 CXR reference system (one image for `cxr serve`,
# `cxr train`, `cxr model ...` and the MLflow server of docker-compose.yml).
#
#   docker build -t covid-cxr:0.1.0 .                          # CPU torch (default, ~2 GB)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t covid-cxr:0.1.0-gpu .
#
# torch/torchvision are installed first from the PyTorch index named by TORCH_INDEX so that the
# project's pins (torch==2.14.1, torchvision==0.29.1) resolve to the CPU wheels instead of the ~3 GB
# CUDA build from PyPI. psycopg2 (PostgreSQL for the app database and the MLflow backend) and
# boto3 (MinIO/S3 artefacts, used by the MLflow server) are site-deployment extras, pinned here.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    CXR_HOME=/var/lib/cxr \
    CXR_API_HOST=0.0.0.0 \
    CXR_API_PORT=8000

# git: the training code records the commit; libgomp1: torch CPU threads
RUN apt-get update \
 && apt-get install -y --no-install-recommends git libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cxr
RUN pip install --index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1

# dependencies first (cached layer), then the code
COPY pyproject.toml README.md* ./
COPY app ./app
COPY models ./models
COPY pipelines ./pipelines
COPY compliance ./compliance
RUN pip install . "psycopg2-binary==2.9.10" "boto3>=1.35,<2" \
 && python -c "import app.metrics, core.config; print('covid-cxr image ok')"

RUN useradd --system --uid 10001 --home-dir /var/lib/cxr cxr \
 && mkdir -p /var/lib/cxr && chown cxr /var/lib/cxr
USER cxr
VOLUME ["/var/lib/cxr"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"

CMD ["cxr", "serve", "--host", "0.0.0.0", "--port", "8000"]
