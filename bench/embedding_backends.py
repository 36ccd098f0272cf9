"""torch fp32 against onnx-int8 embeddings, side by side on the same real chunks.

    python bench/embedding_backends.py                      # about 10 minutes on 2 quiet cores
    python bench/embedding_backends.py --limit 300 --repeats 3 --variants
    python bench/embedding_backends.py --eval               # plus the labelled retrieval eval

The Debian Reference PDF is chunked by the service's own ``Chunker`` (built as
``Runtime.make_worker`` builds it).  Both backends, built by ``make_embedder``
as the service builds them, embed exactly those chunk texts, in the groups of
``4 x batch_size`` the ingestion pipeline hands to ``Embedder.embed``.  Repeats
alternate the order (torch first, then onnx first, ...) so that a change of
machine load hits both; the ratio is taken per repeat, then its median.  Also:
mean and minimum cosine between the two backends' vectors, the resident memory
of each backend alone (a fresh subprocess each: load, then embed 256 chunks).

Runners: torch on its default threads (the ratio's base) and on one thread,
onnx-int8 on one and two threads.  ``--variants`` adds other quantisation
recipes of the same exported graph, see ``recipe_variants``.

``--eval`` ingests the PDF into a fresh data directory per backend and runs
``rag eval eval/debian-reference.jsonl --skip-answers`` with
``RAG_EMBEDDING__BACKEND`` set each way: hit@5 and nDCG@10, dense and hybrid.

Figures go to stdout and, with the load average next to each, to
``bench/results/embedding_backends-<UTC time>.json``.  On a busy machine read
the ratios, not the absolute chunks/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
EVAL_SET = ROOT / "eval" / "debian-reference.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, default=PDF, help="document to chunk and embed")
    parser.add_argument("--limit", type=int, default=0, help="first N chunks only (0: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per backend")
    parser.add_argument("--batch-size", type=int, default=32, help="RAG_EMBEDDING__BATCH_SIZE")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="onnx-int8 variants too",
    )
    parser.add_argument("--eval", action="store_true", help="also run the labelled eval")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    parser.add_argument("--rss-only", help=argparse.SUPPRESS)  # subprocess mode: one backend
    return parser.parse_args(argv)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def chunk_texts(pdf: Path, limit: int) -> list[str]:
    """The PDF's chunk texts exactly as ingestion cuts them."""
    from ingest.chunking import Chunker
    from ingest.loaders import load_document
    from rag_service.config import Settings
    from rag_service.embedding_onnx import OnnxInt8Embedder

    settings = Settings()
    # Same tokenizer as torch (the tests check it), without loading torch here.
    tokens = OnnxInt8Embedder(settings.embedding.model_copy(update={"backend": "onnx-int8"}))
    doc = load_document(pdf.read_bytes(), pdf.name, settings.ingest, "application/pdf")
    chunker = Chunker(
        settings.chunking,
        tokenizer=tokens.tokenizer(),
        count_tokens=tokens.count_tokens,
        max_seq_length=tokens.max_seq_length,
    )
    texts = [c.text for c in chunker.chunk(doc)]
    return texts[:limit] if limit else texts


def make(backend: str, batch_size: int, threads: int = 1) -> Any:
    from rag_service.config import EmbeddingSettings
    from rag_service.embedding import make_embedder

    settings = {"backend": backend, "batch_size": batch_size, "threads": threads}
    return make_embedder(EmbeddingSettings.model_validate(settings))


class TorchThreads:
    """The torch embedder run on ``threads`` threads (``torch.set_num_threads`` per call)."""

    def __init__(self, embedder: Any, threads: int) -> None:
        self.embedder, self.threads = embedder, threads
        self.batch_size = embedder.batch_size

    def embed(self, texts: list[str]) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.embedder.embed(texts)
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        pass


RECIPES: dict[str, dict[str, Any]] = {
    "all weight MatMuls int8": {"per_channel": True, "op_types_to_quantize": ["MatMul"]},
    "per-tensor": {"per_channel": False, "op_types_to_quantize": ["MatMul"]},
    "per-channel reduce_range": {
        "per_channel": True,
        "reduce_range": True,
        "op_types_to_quantize": ["MatMul"],
    },
    "per-channel all ops": {"per_channel": True},
    "fp32 (no quantisation)": {},
}


def recipe_variants(batch_size: int, folder: Path) -> dict[str, Any]:
    """onnx-int8 with other quantisation recipes than the shipped one, for comparison.

    The shipped recipe (``rag_service.onnx_quantize.quantize``): per-channel int8
    weights of the weight MatMuls but the FFN outputs.  Here the same exported
    fp32 graph is quantised with the FFN outputs in int8 too, with one scale
    per tensor, with 7-bit ranges (reduce_range), with Gather (the token
    embedding table) quantised too, and not at all.
    """
    import onnxruntime as ort  # type: ignore[import-untyped]
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        QuantType,
        quantize_dynamic,
    )

    from rag_service.config import resolve_embedding_model
    from rag_service.onnx_quantize import export_fp32

    fp32 = folder / "fp32.onnx"
    export_fp32(Path(resolve_embedding_model("all-MiniLM-L6-v2")), fp32)
    out: dict[str, Any] = {}
    for name, options in RECIPES.items():
        path = fp32
        if options:
            path = folder / f"{len(out)}.onnx"
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, **options)
        embedder = make("onnx-int8", batch_size)
        session = ort.SessionOptions()
        session.intra_op_num_threads = 1
        session.inter_op_num_threads = 1
        session.add_session_config_entry("session.intra_op.allow_spinning", "0")
        embedder._session = ort.InferenceSession(str(path), session)
        out[f"onnx {name}"] = embedder
    return out


def embed_as_pipeline(embedder: Any, texts: list[str]) -> Any:
    """``IngestPipeline.process``'s embedding loop: groups of 4 x batch_size."""
    import numpy as np

    step = max(1, embedder.batch_size * 4)
    return np.vstack([embedder.embed(texts[i : i + step]) for i in range(0, len(texts), step)])


def timed(embedder: Any, texts: list[str]) -> dict[str, float]:
    load_before = load()
    cpu, wall = time.process_time(), time.perf_counter()
    embed_as_pipeline(embedder, texts)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return {
        "chunks_per_s": round(len(texts) / wall, 2),
        "seconds": round(wall, 2),
        "cpu_per_wall": round(cpu / wall, 2),
        "load_before": load_before,
        "load_after": load(),
    }


def rss_of(backend: str, batch_size: int, pdf: Path) -> dict[str, float]:
    """Memory of one backend alone, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--rss-only", backend, "--pdf", str(pdf)]
    done = subprocess.run(
        [*command, "--batch-size", str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def rss_only(backend: str, batch_size: int, pdf: Path) -> None:
    texts = chunk_texts(pdf, 256)  # loads the tokenizer and pypdfium2 for both alike
    before = rss_mb()
    embedder = make(backend, batch_size)
    loaded = rss_mb()
    embed_as_pipeline(embedder, texts)
    print(
        json.dumps(
            {
                "rss_before_mb": before,
                "rss_loaded_mb": loaded,
                "rss_after_embed_mb": rss_mb(),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def side_by_side(
    runners: dict[str, Any], texts: list[str], repeats: int
) -> dict[str, list[dict[str, float]]]:
    """Timed passes, the order of the runners rotated every repeat."""
    names = list(runners)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for name in names:  # warm-up: first-call allocations and lazy init
        embed_as_pipeline(runners[name], texts[:64])
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(timed(runners[name], texts))
            print(f"  repeat {r + 1} {name:<32} {runs[name][-1]}", flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, float]]], base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rows in runs.items():
        ratios = [b["seconds"] / r["seconds"] for b, r in zip(runs[base], rows, strict=True)]
        out[name] = {
            "chunks_per_s_median": statistics.median(r["chunks_per_s"] for r in rows),
            "speedup_vs_torch_median": round(statistics.median(ratios), 2),
            "speedups_vs_torch": [round(x, 2) for x in ratios],
            "runs": rows,
        }
    return out


def run_eval(pdf: Path) -> dict[str, Any]:
    """The labelled retrieval eval with each backend, each on its own fresh data directory."""
    out: dict[str, Any] = {}
    for backend in ("torch", "onnx-int8"):
        with tempfile.TemporaryDirectory(prefix=f"rag-eval-{backend}-") as tmp:
            report = Path(tmp) / "report.json"
            env = {
                **os.environ,
                "RAG_DATA_DIR": str(Path(tmp) / "data"),
                "RAG_EMBEDDING__BACKEND": backend,
            }
            command = [sys.executable, "-m", "rag_service.cli", "eval", str(EVAL_SET)]
            command += ["-c", "debref", "--ingest", str(pdf), "--skip-answers"]
            command += ["--modes", "dense,hybrid", "--out", str(report)]
            load_before, started = load(), time.perf_counter()
            subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            metrics = json.loads(report.read_text())["metrics"]
        out[backend] = {
            key: metrics[key]
            for key in ("dense.hit@5", "dense.ndcg@10", "hybrid.hit@5", "hybrid.ndcg@10")
            if key in metrics
        }
        out[backend]["all_metrics"] = metrics
        out[backend]["seconds"] = round(time.perf_counter() - started, 1)
        out[backend]["load_before"] = load_before
        print(f"eval {backend}: { {k: v for k, v in out[backend].items() if '@' in k} }")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    if args.rss_only:
        rss_only(args.rss_only, args.batch_size, args.pdf)
        return 0

    import numpy as np
    import onnxruntime
    import torch

    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__,
        },
        "load_at_start": load(),
    }
    texts = chunk_texts(args.pdf, args.limit)
    result["chunks"] = len(texts)
    print(f"{len(texts)} chunks of {args.pdf.name}; load {load()}", flush=True)

    torch_fp32 = make("torch", args.batch_size)
    runners = {
        f"torch threads={torch.get_num_threads()}": torch_fp32,
        "torch threads=1": TorchThreads(torch_fp32, 1),
        "onnx-int8": make("onnx-int8", args.batch_size),
        "onnx-int8 threads=2": make("onnx-int8", args.batch_size, threads=2),
    }
    base = next(iter(runners))
    scratch = tempfile.TemporaryDirectory(prefix="rag-bench-onnx-")
    if args.variants:
        runners.update(recipe_variants(args.batch_size, Path(scratch.name)))
    runs = side_by_side(runners, texts, args.repeats)
    result["throughput"] = summarise(runs, base)

    reference = embed_as_pipeline(torch_fp32, texts)
    result["cosine"] = {}
    for name in runners:
        if name.startswith("onnx"):
            cosines = np.sum(reference * embed_as_pipeline(runners[name], texts), axis=1)
            result["cosine"][name] = {
                "mean": round(float(cosines.mean()), 5),
                "min": round(float(cosines.min()), 5),
                "p01": round(float(np.percentile(cosines, 1)), 5),
            }
    scratch.cleanup()
    for embedder in runners.values():
        embedder.close()
    result["memory"] = {b: rss_of(b, args.batch_size, args.pdf) for b in ("torch", "onnx-int8")}
    if args.eval:
        result["eval"] = run_eval(args.pdf)
    result["load_at_end"] = load()

    print(f"\n{'backend':<32} {'chunks/s':>9} {'x torch':>8}   (load {result['load_at_end']})")
    for name, row in result["throughput"].items():
        print(f"{name:<32} {row['chunks_per_s_median']:>9} {row['speedup_vs_torch_median']:>8}")
    print(f"cosine to torch: {result['cosine']}")
    print(f"memory (MiB): {result['memory']}")

    out = args.out or ROOT / "bench" / "results" / (
        f"embedding_backends-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
