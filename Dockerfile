# DermFusion: the web app, its REST API and /healthz on port 7860, run as uid 1000.
# Research and education only — not a diagnosis.
#
#   docker build -t dermfusion .
#   docker run -p 7860:7860 -e DERMFUSION_AUTH_FILE=/run/secrets/auth \
#       -v "$PWD/dermfusion_auth.txt:/run/secrets/auth:ro" dermfusion   # logins never in env
#   docker compose up            # with PostgreSQL (compose.yaml)
#
# The install steps are docker/install.sh, which CI also runs (tests/test_hosting_install.py):
# images are not built on the CI machines. Configuration is by DERMFUSION_* environment
# variables (docs/deploy/configuration.md); the shipped model (model/shipped) is inside the
# installed package. A smaller image: --build-arg TORCH_INDEX=<a CPU-only PyTorch wheel index>.
FROM python:3.11-slim

ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PATH=/opt/dermfusion/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY data_pipeline ./data_pipeline
COPY db ./db
COPY model ./model
COPY service ./service
COPY app ./app
COPY scripts ./scripts
COPY docker/install.sh ./docker/install.sh
RUN bash docker/install.sh --src /src --venv /opt/dermfusion/venv --user dermfusion:1000 \
        --data /data ${TORCH_INDEX:+--torch-index "$TORCH_INDEX"} \
    && rm -rf /src

USER 1000
WORKDIR /data
ENV DERMFUSION_HOST=0.0.0.0 \
    DERMFUSION_PORT=7860 \
    DERMFUSION_DB_URL=sqlite:////data/predictions.db \
    GRADIO_TEMP_DIR=/tmp/gradio
VOLUME ["/data"]
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('DERMFUSION_PORT', '7860'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# exec form: the app is PID 1 and gets docker stop's SIGTERM (finishes requests, exits 0)
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
