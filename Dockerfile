# The retriever API server (`retriever serve`) with the search page at /.
#
#   docker build -t retriever .                                   # CPU image (default)
#   docker build -t retriever:gpu --build-arg EXTRAS=gpu \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple .     # CUDA torch + faiss-gpu
#
# docker-compose.yml builds both (service api, and api-gpu under the "gpu" profile).
# See docs/deployment.md.

FROM python:3.11-slim

# Extras of the package to install: "" for the CPU image, "gpu" for faiss-gpu.
ARG EXTRAS=""
# Where torch comes from. The CPU wheel index keeps the image small; PyPI's default torch is the
# multi-GB CUDA build, which is what the GPU image wants.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/data/hf \
    RETRIEVER_HOME=/data/index

# A fixed non-root user. /data/index and /data/hf exist in the image, owned by that user, so named
# volumes mounted there start out writable by it.
RUN groupadd --gid 1000 retriever \
 && useradd --uid 1000 --gid retriever --create-home --shell /usr/sbin/nologin retriever \
 && mkdir -p /data/index /data/hf \
 && chown -R retriever:retriever /data

# torch on its own layer, first: it is by far the largest dependency and changes least.
# The pin must equal the one in pyproject.toml (tests/deploy checks it).
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
# The package's three source folders: index/ and cli/ install as retriever.index and retriever.cli
# (pyproject's package-dir mapping).
COPY pyproject.toml README* ./
COPY retriever/ retriever/
COPY index/ index/
COPY cli/ cli/

# pyproject's `faiss-cpu; extra != 'gpu'` is installed even with the gpu extra (pip evaluates base
# requirements with no extra), and faiss-cpu and faiss-gpu-cu12 both own the `faiss` module: on the
# GPU image faiss-cpu is removed and faiss-gpu-cu12 reinstalled over it.
RUN set -eux; \
    if [ -n "${EXTRAS}" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi; \
    case ",${EXTRAS}," in \
      *,gpu,*) \
        gpu_faiss="$(pip list --format=freeze | grep -i '^faiss-gpu-cu12==')"; \
        pip uninstall -y faiss-cpu; \
        pip install --no-deps --force-reinstall "${gpu_faiss}";; \
    esac; \
    cd /; rm -rf /src; \
    retriever --help > /dev/null

WORKDIR /data
USER retriever

EXPOSE 8000

# Healthy once the server answers /health (models may still be loading then; search answers 503
# with Retry-After until they are). No curl in the slim image: Python's urllib does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["retriever", "serve", "--host", "0.0.0.0", "--port", "8000"]
