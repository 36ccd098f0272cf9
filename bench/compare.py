"""Two runs of the benchmark suite side by side: a before/after table with ratios.

    python bench/compare.py OLD.json NEW.json [--all]

Reads two JSON files written by ``bench/baseline.py`` and prints a Markdown
table: every headline figure of both runs, ``new / old``, and whether the
change goes the right way for that figure (``faster`` / ``slower`` for the
direction it should move).  ``--all`` adds every other number the two files
share.  A figure missing from one run (a part skipped, or a run from before
the figure existed) shows ``-``.  Load averages and CPU-per-wall of both runs
head the table, since figures from runs under different load do not compare.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: (JSON path, label, True when higher is better, None when neither).
HEADLINE: tuple[tuple[str, str, bool | None], ...] = (
    ("parse.pypdfium2.pages_per_s", "parse pypdfium2, pages/s", True),
    ("parse.pypdf.pages_per_s", "parse pypdf, pages/s", True),
    ("chunk.chunks", "chunks", None),
    ("chunk.chunks_per_s", "chunk, chunks/s", True),
    ("encode_alone.one_call_chunks_per_s", "encode alone one call, chunks/s", True),
    ("encode_alone.grouped_chunks_per_s", "encode alone groups (doc order), chunks/s", True),
    ("encode_alone.grouped_sorted_chunks_per_s", "encode alone sorted groups, chunks/s", True),
    ("ingest.chunks_per_s", "ingest end to end, chunks/s", True),
    ("ingest.seconds", "ingest end to end, s", False),
    ("ratios.e2e_vs_encode_one_call", "ingest / encode alone (one call)", True),
    ("ratios.e2e_vs_encode_grouped", "ingest / encode alone (groups)", True),
    ("ratios.e2e_vs_encode_one_call_cpu", "ingest / encode, per CPU second", True),
    ("ratios.encode_sorted_groups_vs_one_call", "sorted groups / one call encode", True),
    ("ingest.stage_share.parse", "ingest share: parse", False),
    ("ingest.stage_share.chunk", "ingest share: chunk", False),
    ("ingest.stage_share.embed", "ingest share: embed", True),
    ("ingest.stage_share.commit", "ingest share: commit", False),
    ("ingest.cpu_seconds", "ingest CPU s", False),
    ("overlap_ab.speedup_on_vs_off", "tail chunked during embedding, speedup", True),
    ("reupload.edited.seconds", "re-upload with one edit, s", False),
    ("reupload.edited.embedded", "re-upload with one edit, chunks embedded", False),
    ("reupload.seconds_ratio_edited_vs_first", "re-upload edit / first upload, time", False),
    ("retrieve.client_ms.p50", "/v1/retrieve p50, ms", False),
    ("retrieve.client_ms.p95", "/v1/retrieve p95, ms", False),
    ("retrieve.server_ms_median.embed_ms", "retrieve embed, ms", False),
    ("retrieve.server_ms_median.dense_ms", "retrieve dense search, ms", False),
    ("retrieve.server_ms_median.keyword_ms", "retrieve keyword search, ms", False),
    ("retrieve.server_ms_median.fuse_ms", "retrieve fuse, ms", False),
    ("retrieve.server_ms_median.search_ms", "retrieve search total, ms", False),
    ("retrieve.server_ms_median.total_ms", "retrieve server total, ms", False),
    ("server.startup_seconds", "server start, s", False),
    ("server.model_load_seconds", "llama.cpp load, s", False),
    ("answers.first_seconds", "/v1/query cold, s", False),
    ("answers.warm_seconds_median", "/v1/query warm median, s", False),
    ("answers.warm_generate_ms_median", "/v1/query warm generate, ms", False),
    ("answers.warm_tokens_per_s_median", "/v1/query completion tok/s", True),
    ("stream_split.time_to_first_piece_s", "time to first token (cache cleared), s", False),
    ("stream_split.prompt_tokens_per_s", "prompt eval, tok/s", True),
    ("stream_split.generation_tokens_per_s", "generation, tok/s", True),
    ("stream_split.total_s", "streamed answer total, s", False),
    ("memory.ingest.peak_rss_mib", "peak RSS after ingest, MiB", False),
    ("memory.end.peak_rss_mib", "peak RSS at end, MiB", False),
)

#: Parts of a report that describe the run rather than measure it.
NOT_FIGURES = ("machine.", "settings.", "answers.per_call.", "command", "started_at", "skipped")


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a report, by dotted path; lists and strings are left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int | float):
        yield prefix.rstrip("."), float(value)


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers, plus those older reports did not record but imply."""
    out = dict(flatten(report))
    server = "retrieve.server_ms_median."
    searches = (f"{server}dense_ms", f"{server}keyword_ms")
    if f"{server}fuse_ms" not in out and any(k in out for k in searches):
        # a median of differences in new runs, a difference of medians here
        out[f"{server}fuse_ms"] = round(
            out[f"{server}search_ms"]
            - out.get(f"{server}dense_ms", 0.0)
            - out.get(f"{server}keyword_ms", 0.0),
            2,
        )
    return out


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _verdict(old: float, new: float, higher_better: bool | None) -> str:
    if higher_better is None or old == new:
        return ""
    return "better" if (new > old) == higher_better else "worse"


def table(
    old: dict[str, Any], new: dict[str, Any], *, every: bool = False
) -> list[tuple[str, str, str, str, str]]:
    """Rows of (figure, old, new, new/old, verdict)."""
    a, b = figures(old), figures(new)
    rows: list[tuple[str, str, str, str, str]] = []
    listed = set()
    for path, label, higher in HEADLINE:
        listed.add(path)
        if path not in a and path not in b:
            continue
        rows.append(_row(label, a.get(path), b.get(path), higher))
    if every:
        for path in sorted(set(a) & set(b) - listed):
            if path.startswith(NOT_FIGURES):
                continue
            rows.append(_row(path, a[path], b[path], None))
    return rows


def _row(
    label: str, old: float | None, new: float | None, higher: bool | None
) -> tuple[str, str, str, str, str]:
    ratio = "-"
    verdict = ""
    if old is not None and new is not None:
        ratio = f"{new / old:.2f}x" if old else "-"
        verdict = _verdict(old, new, higher)
    return label, _fmt(old), _fmt(new), ratio, verdict


def _run_line(name: str, report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    phases = report.get("phases", {})
    busy = ", ".join(
        f"{k} {v.get('cpu_per_wall')}"
        for k, v in phases.items()
        if k in ("ingest", "encode_alone", "retrieve", "answers")
    )
    emb = report.get("settings", {}).get("embedding", {})
    return (
        f"{name}: {report.get('started_at', '?')}, git {machine.get('git')}, "
        f"embedding {emb.get('backend', 'torch')}, load average "
        f"{machine.get('load_avg_at_start', ['?'])[0]} -> "
        f"{report.get('load_avg_at_end', ['?'])[0]}; CPU s per wall s: {busy}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the earlier run's JSON")
    parser.add_argument("new", type=Path, help="the later run's JSON")
    parser.add_argument("--all", action="store_true", help="every number the runs share")
    args = parser.parse_args(argv)
    old = json.loads(args.old.read_text())
    new = json.loads(args.new.read_text())
    print(_run_line(f"old {args.old.name}", old))
    print(_run_line(f"new {args.new.name}", new))
    print()
    rows = [("figure", "old", "new", "new/old", ""), *table(old, new, every=args.all)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)]
        print("| " + " | ".join(cells) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
