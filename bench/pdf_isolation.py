"""What reading PDFs in the capped child process costs, against reading them in process.

    python bench/pdf_isolation.py [--pdf PATH] [--runs N] [--engine pypdfium2|pypdf]

Reads the same PDF (default: the 261-page Debian Reference) with
``ingest.pdf_isolation`` = ``none`` and = ``process``, alternating the two
run by run so both see the same load, and reports the median seconds and
pages/s of each, their ratio, and the one-off cost of a new child (start,
imports, first document).  The load average is recorded before and after.
A table goes to stdout and every figure to
``bench/results/pdf_isolation-<UTC time>.json``.  It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.loaders import load_document
from ingest.loaders.isolation import ExtractionSandbox, default_sandbox
from rag_service.config import IngestSettings

DEFAULT_PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timed_load(data: bytes, settings: IngestSettings) -> tuple[float, int]:
    started = time.perf_counter()
    document = load_document(data, "bench.pdf", settings)
    return time.perf_counter() - started, document.pages or 0


def cold_start(data: bytes, settings: IngestSettings) -> dict[str, float]:
    """A fresh sandbox: the first document pays for the interpreter and its imports."""
    box = ExtractionSandbox()
    try:
        started = time.perf_counter()
        box.run("ingest.loaders.pdf:read_pdf_json", data, "bench.pdf", settings)
        first = time.perf_counter() - started
        started = time.perf_counter()
        box.run("ingest.loaders.pdf:read_pdf_json", data, "bench.pdf", settings)
        second = time.perf_counter() - started
    finally:
        box.close()
    return {"first_document_s": first, "second_document_s": second, "start_s": first - second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pdf", type=Path, default=DEFAULT_PDF)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--engine", choices=["pypdfium2", "pypdf"], default="pypdfium2")
    args = parser.parse_args()
    data = args.pdf.read_bytes()
    load_before = os.getloadavg()
    in_process = IngestSettings(pdf_isolation="none", pdf_engine=args.engine)
    isolated = IngestSettings(pdf_isolation="process", pdf_engine=args.engine)
    timed_load(data, in_process)  # warm the engine's imports
    timed_load(data, isolated)  # start the shared child
    seconds: dict[str, list[float]] = {"none": [], "process": []}
    pages = 0
    for _ in range(args.runs):
        for mode, settings in (("none", in_process), ("process", isolated)):
            spent, pages = timed_load(data, settings)
            seconds[mode].append(spent)
    cold = cold_start(data, isolated)
    load_after = os.getloadavg()
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    result: dict[str, Any] = {
        "pdf": str(args.pdf),
        "pdf_bytes": len(data),
        "pages": pages,
        "engine": args.engine,
        "runs": args.runs,
        "seconds": seconds,
        "median_s": medians,
        "pages_per_s": {mode: pages / value for mode, value in medians.items()},
        "process_over_none": medians["process"] / medians["none"],
        "overhead_ms_per_document": (medians["process"] - medians["none"]) * 1000,
        "cold_child": cold,
        "children_started_by_shared_sandbox": default_sandbox().started,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
    }
    print(f"{args.pdf.name}: {pages} pages, {args.engine}, {args.runs} alternating runs")
    for mode in ("none", "process"):
        print(f"  {mode:8} median {medians[mode]:.3f} s  {result['pages_per_s'][mode]:.0f} pages/s")
    print(
        f"  process/none {result['process_over_none']:.3f}  "
        f"overhead {result['overhead_ms_per_document']:.0f} ms/document"
    )
    print(
        f"  new child: first document {cold['first_document_s']:.2f} s, "
        f"second {cold['second_document_s']:.2f} s (start about {cold['start_s']:.2f} s)"
    )
    print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"pdf_isolation-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
