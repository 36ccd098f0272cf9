# CPU image of the RAG service: the embedder and the local language model ship
# inside Python packages, so the image answers questions with no network.
FROM python:3.11-slim-bookworm

# Compilers for llama-cpp-python, which builds from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RAG_DATA_DIR=/data \
    RAG_SERVER__HOST=0.0.0.0 \
    RAG_SERVER__PORT=8000 \
    RAG_AUTH__REQUIRED=true
# Listening beyond loopback, every /v1 request needs a key; make the first with
#   docker exec <container> rag keys create --collections '*' --scope admin
# (/healthz, /readyz and /metrics stay open for probes and scrapers).

WORKDIR /app
# torch first, from the CPU wheel index, so the pinned 2.13.0 is the CPU build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY rag_service ./rag_service
COPY ingest ./ingest
RUN pip install . \
 && apt-get purge -y build-essential cmake && apt-get autoremove -y

RUN useradd --create-home --uid 10001 rag \
 && mkdir -p /data && chown rag:rag /data
USER rag
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"

CMD ["rag", "serve"]
