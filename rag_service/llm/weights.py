"""The weight type the local model runs with, converted once and cached.

Prompt evaluation is a matrix product over every prompt token, and on a CPU
llama.cpp multiplies 16-bit weights much faster than 4-bit blocks, which it
must unpack first.  Small models (SmolLM2-135M ships as Q4_1) are therefore
converted once to BF16 (CPUs with AVX512-BF16) or F16 and the copy is kept in
a cache: converting a 4-bit file up loses nothing it still had, so answers
keep the accuracy of the shipped file.  Large files are left alone, since
their 16-bit copy would cost gigabytes of memory for a smaller gain.

A cached copy is named after its source's path, size and modification time,
written to a temporary file, fsynced and renamed into place, so a crash or
two processes converting at once never leave a half-written model where the
next start would load it.  A ``.json`` file next to it records where it came
from.

Failures: ``ModelUnavailable`` when an explicitly requested conversion
cannot be done; with ``weights=auto`` the shipped file is used instead and a
warning logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rag_service.config import LLMSettings
from rag_service.errors import ModelUnavailable

logger = logging.getLogger(__name__)

#: ``weights=auto`` converts only GGUF files up to this size: about a 600M
#: parameter model in 4 bits, whose 16-bit copy still fits in memory easily.
AUTO_MAX_SOURCE_BYTES = 400 * 1024 * 1024

#: Weight types a GGUF file can be converted to -> llama.cpp's ftype name (f32:
#: the exact dequantised weights, a reference for benchmarks).
FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "f32": "LLAMA_FTYPE_ALL_F32",
}

#: ``(source, destination, ftype, threads) -> status``: llama.cpp's quantizer, a seam for tests.
Quantizer = Callable[[Path, Path, str, int], int]

_convert_lock = threading.Lock()


def default_cache_dir() -> Path:
    """Per-user cache of converted weights (``$XDG_CACHE_HOME/rag-service/gguf``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-service" / "gguf"


def cpu_flags() -> dict[str, bool]:
    """The CPU features llama.cpp was built for and found (``llama_print_system_info``)."""
    import llama_cpp

    info: bytes = llama_cpp.llama_print_system_info()
    flags: dict[str, bool] = {}
    for part in info.decode("utf-8", errors="replace").split("|"):
        name, sep, value = part.rpartition("=")
        if sep:
            flags[name.strip().rsplit(":", 1)[-1].strip()] = value.strip() == "1"
    return flags


def chosen_type(settings: LLMSettings, source: Path) -> str | None:
    """The weight type to convert ``source`` to, or ``None`` to run the file as it is."""
    match settings.weights:
        case "file":
            return None
        case "auto":
            if source.stat().st_size > AUTO_MAX_SOURCE_BYTES:
                return None
            return "bf16" if cpu_flags().get("AVX512_BF16") else "f16"
        case explicit:
            return explicit


def resolve_weights(
    settings: LLMSettings, source: Path, *, quantize: Quantizer | None = None
) -> tuple[Path, str]:
    """The GGUF file to load for ``source`` and its weight type (``file`` when unconverted).

    Converts on first use; later starts reuse the cached copy.
    """
    wanted = chosen_type(settings, source)
    if wanted is None:
        return source, "file"
    cache = Path(settings.weights_cache_dir).expanduser() if settings.weights_cache_dir else None
    try:
        return convert_cached(source, wanted, cache or default_cache_dir(), quantize), wanted
    except ModelUnavailable as exc:
        if settings.weights != "auto":
            raise
        logger.warning(
            "local model weights not converted model=%s weights=%s reason=%s; using the file as is",
            source.name,
            wanted,
            exc,
        )
        return source, "file"


def cached_path(source: Path, weights: str, cache_dir: Path) -> Path:
    """Where the ``weights`` copy of ``source`` lives: keyed by its path, size and mtime."""
    stat = source.stat()
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:12]
    return cache_dir / f"{source.stem}.{key}.{weights}.gguf"


def convert_cached(
    source: Path, weights: str, cache_dir: Path, quantize: Quantizer | None = None
) -> Path:
    """The cached ``weights`` copy of ``source``, converted and stored atomically if missing."""
    target = cached_path(source, weights, cache_dir)
    if target.is_file():
        return target
    # One conversion at a time in this process; other processes race on the
    # rename, which is atomic, so the loser's identical copy simply replaces it.
    with _convert_lock:
        if target.is_file():
            return target
        _convert(source, target, weights, quantize or _llama_quantize)
    return target


def _convert(source: Path, target: Path, weights: str, quantize: Quantizer) -> None:
    hint = "; set RAG_LLM__WEIGHTS=file to run the model file as it is"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        status = quantize(source, tmp, FTYPES[weights], os.cpu_count() or 1)
        if status != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise ModelUnavailable(
                f"could not convert {source} to {weights} (RAG_LLM__WEIGHTS): llama.cpp "
                f"returned status {status}{hint}"
            )
        with tmp.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise ModelUnavailable(
            f"could not convert {source} to {weights} in {target.parent} "
            f"(RAG_LLM__WEIGHTS_CACHE_DIR): {exc}{hint}"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    _write_record(source, target, weights, seconds)
    logger.info(
        "local model weights converted model=%s weights=%s path=%s seconds=%.1f",
        source.name,
        weights,
        target,
        seconds,
    )


def _write_record(source: Path, target: Path, weights: str, seconds: float) -> None:
    """The sidecar saying what the cached file was made from (for people, not for loading)."""
    stat = source.stat()
    record = {
        "source": str(source.resolve()),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "weights": weights,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 2),
    }
    try:
        target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        logger.warning("could not write weights record path=%s error=%s", target, exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _llama_quantize(source: Path, target: Path, ftype: str, threads: int) -> int:
    """llama.cpp's ``llama_model_quantize``, allowed to requantize, its log chatter silenced."""
    import llama_cpp

    params: Any = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True
    params.nthread = threads
    # llama-cpp-python prints llama.cpp's log below this logger's level; the
    # quantizer reports every tensor at INFO.
    chatter = logging.getLogger("llama-cpp-python")
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        status: int = llama_cpp.llama_model_quantize(
            str(source).encode("utf-8"), str(target).encode("utf-8"), ctypes.byref(params)
        )
    finally:
        chatter.setLevel(level)
    return status
