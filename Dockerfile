# One image for every node: the CPU-only PyTorch build keeps it small (no CUDA libraries).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU wheels of torch and torchvision first, so the project's own install finds them satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

COPY pyproject.toml README.md ./
COPY main.py console.py config.py ./
COPY chain ./chain
COPY fl ./fl
COPY node ./node
COPY proto ./proto
COPY storage ./storage
COPY examples ./examples
RUN pip install . && useradd --create-home fledger && mkdir /data && chown fledger /data
USER fledger

# Every setting comes from FLEDGER_* variables (see config.py); `main.py node` starts an SN or EN.
ENV FLEDGER_DATA_ROOT=/data FLEDGER_IP=0.0.0.0
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --retries=5 CMD ["python", "-m", "node.cli.health", "127.0.0.1:8080"]
CMD ["python", "main.py", "node"]
