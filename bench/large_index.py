"""FAISS index types at a million chunks: build time, memory, latency, recall.

    python bench/large_index.py [--n 1000000] [--queries 1000] [--types flat,hnsw,ivf,ivfpq]

Vectors are synthetic, 384-d and normalised like all-MiniLM-L6-v2's: a
Gaussian mixture (``--clusters`` centres of uneven weight, each point its
centre plus noise), because real embeddings cluster by topic and uniform
random vectors would make the approximate indexes look worse than they are.
Queries are fresh draws from the same mixture, never copies of the data.

Each type is built through the service's own ``FaissIndex`` (the class the
``VectorStore`` keeps per collection) with the collection's default spec,
then searched one query at a time, as the service does, on ``--threads``
FAISS threads (default: all cores, as in ``rag serve``; on a loaded machine
one thread is much faster for single queries, see the README).  For ``ivfpq`` the service
rescores ``rerank * k`` candidates with the exact vectors it keeps in
SQLite; here they come from the in-memory array, so the catalog read is
not in the figure: ``--service-n N`` times ``VectorStore.search`` itself,
with that read, on N chunk rows in a real catalog.  Recall@10 is against exact
inner-product search over the same vectors.

Memory per chunk is given twice: the process's RSS growth while the index
was built, and the serialized index size (what a snapshot weighs) over N.
Search-time parameters (``ef_search``, ``nprobe``) are swept to show where
the defaults sit.  Prints a table and writes JSON to ``bench/results/``.
A measurement, not a test; figures depend on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag_service.storage.faiss_index import FaissIndex, IndexSpec  # noqa: E402

DIM = 384
SWEEP = {
    "hnsw": ("ef_search", [32, 64, 128, 256]),
    "ivf": ("nprobe", [8, 16, 32, 64]),
    "ivfpq": ("rerank", [4, 8, 16, 32]),
}


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def mixture(
    n: int, seed: int, centres: npt.NDArray[np.float32], bases: npt.NDArray[np.float32] | None
) -> npt.NDArray[np.float32]:
    """``n`` normalised draws from the mixture around ``centres``.

    With ``bases`` each cluster spreads mostly along its own few directions
    (``lowrank``: what topic embeddings do), else evenly in all 384
    (``isotropic``: the hardest case for approximate search).
    """
    rng = np.random.default_rng(seed)
    clusters = len(centres)
    weights = np.random.default_rng(0).pareto(1.5, clusters) + 1.0
    weights /= weights.sum()
    counts = rng.multinomial(n, weights)
    out = np.empty((n, DIM), dtype=np.float32)
    start = 0
    for c, m in enumerate(counts):
        noise = rng.standard_normal((m, DIM), dtype=np.float32)
        if bases is None:
            block = centres[c] + noise * 0.06
        else:
            coords = rng.standard_normal((m, bases.shape[1]), dtype=np.float32)
            block = centres[c] + (coords @ bases[c]) * 0.2 + noise * 0.015
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
        start += m
    # Chunks arrive document by document, not cluster by cluster.
    return out[rng.permutation(n)]


def exact_top(
    vecs: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> npt.NDArray[np.int64]:
    import faiss

    flat = faiss.IndexFlatIP(DIM)
    flat.add(vecs)
    _, ids = flat.search(queries, k)
    return np.asarray(ids, dtype=np.int64)


def run_queries(
    index: FaissIndex,
    vecs: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    truth: npt.NDArray[np.int64],
    k: int,
) -> dict[str, float]:
    """Single-query latency and recall@k of ``index`` (ids are row numbers)."""
    times: list[float] = []
    hits = 0
    rerank = index.spec.rerank
    for q, want in zip(queries, truth, strict=True):
        start = time.perf_counter()
        ids, _ = index.search(q, k * rerank if rerank else k)
        if rerank:
            exact = vecs[ids] @ q
            ids = ids[np.argsort(-exact, kind="stable")[:k]]
        times.append((time.perf_counter() - start) * 1000)
        hits += len(np.intersect1d(ids[:k], want))
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "recall_at_10": hits / (k * len(queries)),
    }


def service_path(n: int, kinds: list[str], queries: npt.NDArray[np.float32], k: int) -> list[dict]:
    """``VectorStore.search`` (catalog change check, lock, IVF-PQ rescoring from SQLite)
    against ``FaissIndex.search`` alone, on ``n`` synthetic chunk rows in a real catalog."""
    import tempfile

    from rag_service.storage.catalog import Catalog, IncomingFile
    from rag_service.storage.records import NewChunk
    from rag_service.storage.vectors import VectorStore

    rng = np.random.default_rng(7)
    vecs = queries[rng.integers(0, len(queries), n)] + 0.05 * rng.standard_normal((n, DIM))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "catalog.sqlite3")
        try:
            for kind in kinds:
                store = VectorStore(catalog, Path(tmp))
                store.create_collection(kind, "bench", DIM, kind)
                for part in range(0, n, 10_000):
                    _, docs = catalog.register_upload(
                        kind, "bench", DIM, [IncomingFile(f"d{part}", f"{part:064x}", 1, None, {})]
                    )
                    chunks = [
                        NewChunk(i, f"chunk {part + i}", None, (), 0, 1, 1, v)
                        for i, v in enumerate(vecs[part : part + 10_000])
                    ]
                    catalog.commit_document(docs[0].id, chunks, pages=None, content_type="t")
                store.size(kind)  # load, catch up, train
                index = store.sync(kind).faiss
                timed: dict[str, list[float]] = {"vector_store": [], "faiss_index": []}
                for q in queries[:200]:
                    start = time.perf_counter()
                    store.search(kind, q, k)
                    timed["vector_store"].append((time.perf_counter() - start) * 1000)
                    start = time.perf_counter()
                    index.search(q, k * (index.spec.rerank or 1))
                    timed["faiss_index"].append((time.perf_counter() - start) * 1000)
                row = {
                    "path": "service",
                    "spec": str(index.spec),
                    "n": n,
                    **{f"{name}_p50_ms": statistics.median(t) for name, t in timed.items()},
                    "load": load(),
                }
                rows.append(row)
                print(
                    f"service path n={n} {row['spec']:<52} VectorStore.search p50"
                    f" {row['vector_store_p50_ms']:.2f}ms  FaissIndex.search p50"
                    f" {row['faiss_index_p50_ms']:.2f}ms  load {row['load']}",
                    flush=True,
                )
        finally:
            catalog.close()
    return rows


def write(out: Path, args: argparse.Namespace, threads: int, rows: list[dict[str, Any]]) -> None:
    meta = {k: getattr(args, k) for k in ("n", "queries", "flat_queries", "shape", "clusters")}
    out.write_text(json.dumps({**meta, "search_threads": threads, "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--service-n",
        type=int,
        default=0,
        help="also time VectorStore.search on this many chunk rows in a real catalog",
    )
    parser.add_argument(
        "--shape", choices=["lowrank", "isotropic"], default="lowrank", help="cluster shape"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="FAISS threads for the timed searches (0: FAISS's default, all cores);"
        " builds always use all cores",
    )
    parser.add_argument(
        "--flat-queries", type=int, default=100, help="queries timed on flat (slow at 1M)"
    )
    args = parser.parse_args()
    import faiss

    all_cores = faiss.omp_get_max_threads()
    threads = args.threads or all_cores
    print(
        f"n={args.n} queries={args.queries} shape={args.shape} search_threads={threads}"
        f" load={load()}"
    )
    rng = np.random.default_rng(42)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = None
    if args.shape == "lowrank":
        bases = rng.standard_normal((args.clusters, 16, DIM), dtype=np.float32) / np.sqrt(DIM)
    started = time.perf_counter()
    vecs = mixture(args.n, 1, centres, bases)
    queries = mixture(args.queries, 2, centres, bases)
    ids = np.arange(args.n, dtype=np.int64)
    truth = exact_top(vecs, queries, args.k)
    print(f"data and ground truth in {time.perf_counter() - started:.1f}s load={load()}")
    rows: list[dict[str, Any]] = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "bench" / "results" / f"large_index-{args.shape}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.types.split(","):
        spec = IndexSpec.parse(kind)
        before = rss_bytes()
        started = time.perf_counter()
        index = FaissIndex.build(spec, DIM, ids, vecs)
        build_s = time.perf_counter() - started
        rss_delta = rss_bytes() - before
        size = index.memory_bytes()
        sweep_name, values = SWEEP.get(spec.kind, ("", [0]))
        faiss.omp_set_num_threads(threads)
        for value in values:
            if sweep_name:
                params = tuple((k, value if k == sweep_name else v) for k, v in spec.params)
                index.spec = replace(spec, params=params)
            few = args.flat_queries if spec.kind == "flat" else len(queries)
            figures = run_queries(index, vecs, queries[:few], truth[:few], args.k)
            row = {
                "spec": str(index.spec),
                "active": index.active_kind,
                "n": args.n,
                "build_s": round(build_s, 1),
                "rss_bytes_per_chunk": round(rss_delta / args.n, 1),
                "snapshot_bytes_per_chunk": round(size / args.n, 1),
                **{k: round(v, 4) for k, v in figures.items()},
                "load": load(),
            }
            rows.append(row)
            print(
                f"{row['spec']:<58} build {row['build_s']:>7}s"
                f"  rss/chunk {row['rss_bytes_per_chunk']:>7}  file/chunk"
                f" {row['snapshot_bytes_per_chunk']:>7}  p50 {row['p50_ms']:>7.2f}ms"
                f"  p95 {row['p95_ms']:>7.2f}ms  recall@10 {row['recall_at_10']:.3f}"
                f"  load {row['load']}",
                flush=True,
            )
        del index
        faiss.omp_set_num_threads(all_cores)  # builds use every core, as a reindex does
        # Written after every type, so a long run stopped early keeps what it measured.
        write(out, args, threads, rows)
    if args.service_n:
        faiss.omp_set_num_threads(threads)
        rows += service_path(args.service_n, args.types.split(","), queries, args.k)
        write(out, args, threads, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
