"""The benchmark suite's table: the figures that matter, one line each."""

from __future__ import annotations

from typing import Any

# -- report ---------------------------------------------------------------------------


def _rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The figures that matter, one row each; phases that were skipped have none."""
    rows: list[tuple[str, str, str]] = []
    p, c = r["parse"], r["chunk"]
    pdfium, tpc = p["pypdfium2"], c["tokens_per_chunk"]
    rows.append(
        (
            "parse pypdfium2 (default)",
            f"{pdfium['seconds_median']:.3f} s",
            f"{pdfium['pages_per_s']:.0f} pages/s (median of {pdfium['runs']})",
        )
    )
    if "pypdf" in p:
        rows.append(
            (
                "parse pypdf",
                f"{p['pypdf']['seconds_median']:.3f} s",
                f"{p['pypdf']['pages_per_s']:.1f} pages/s (1 run); pypdfium2 is "
                f"{p['pypdfium2_speedup']}x faster",
            )
        )
    rows.append(
        (
            "chunk",
            f"{c['seconds_median']:.3f} s",
            f"{c['chunks_per_s']:.0f} chunks/s; tokens/chunk median {tpc['median']:.0f}, "
            f"p95 {tpc['p95']:.0f}, max {tpc['max']} (limit {c['max_tokens_setting']})",
        )
    )
    i = r["ingest"]
    e = r.get("encode_alone")
    if e is not None:
        g = e["group_size"]
        rows += [
            (
                "encode alone, one call",
                f"{e['one_call_seconds']:.2f} s",
                f"{e['one_call_chunks_per_s']:.1f} chunks/s ({e['encoder']}, "
                f"batch {e['batch_size']})",
            ),
            (
                f"encode alone, groups of {g}",
                f"{e['grouped_seconds']:.2f} s",
                f"{e['grouped_chunks_per_s']:.1f} chunks/s (document order: the old pipeline)",
            ),
            (
                f"encode alone, sorted groups of {g}",
                f"{e['grouped_sorted_seconds']:.2f} s",
                f"{e['grouped_sorted_chunks_per_s']:.1f} chunks/s (longest first over the "
                "document: the pipeline now)",
            ),
        ]
    rows.append(
        (
            "ingest end to end",
            f"{i['seconds']:.2f} s",
            f"{i['chunks_per_s']:.1f} chunks/s, {i['pages_per_s']:.1f} pages/s "
            f"(accept {i['accept_seconds']:.2f} s + job {i['job_seconds']:.2f} s)",
        )
    )
    ratios = r.get("ratios")
    if ratios:
        rows.append(
            (
                "  e2e / encode alone",
                f"{ratios['e2e_vs_encode_one_call']:.2f}",
                f"{ratios['e2e_vs_encode_grouped']:.2f} against the grouped encode; "
                f"{ratios['e2e_vs_encode_one_call_cpu']:.2f} in chunks per CPU second "
                f"(one call); sorted groups / one call "
                f"{ratios['encode_sorted_groups_vs_one_call']:.2f}",
            )
        )
    shares = sorted(i["stage_share"].items(), key=lambda kv: -kv[1])
    rows.append(("  job time by stage", "", ", ".join(f"{k} {v:.1%}" for k, v in shares)))
    ab = r.get("overlap_ab")
    if ab:
        rows.append(
            (
                "  tail chunked during embedding",
                f"{ab['speedup_on_vs_off']:.3f}x",
                f"median {ab['median_on_s']:.2f} s on vs {ab['median_off_s']:.2f} s off "
                f"({ab['pairs']} alternated pairs)",
            )
        )
    ru = r.get("reupload")
    if ru and "first" in ru:
        rows.append(
            (
                f"re-upload, {ru['pages']} pages as Markdown",
                f"{ru['edited']['seconds']:.2f} s",
                f"one sentence added on page {ru['edited_page']}: {ru['edited']['embedded']} of "
                f"{ru['edited']['chunks']} chunks embedded; first upload "
                f"{ru['first']['seconds']:.2f} s ({ru['first']['embedded']} embedded), "
                f"ratio {ru['seconds_ratio_edited_vs_first']:.2f}",
            )
        )
    s = r.get("server")
    if s is not None:
        rows.append(
            (
                "server start",
                f"{s['startup_seconds']:.2f} s",
                f"to /readyz 200; llama.cpp load {s.get('model_load_seconds')} s",
            )
        )
    rt = r.get("retrieve")
    if rt is not None:
        sm, cm = rt["server_ms_median"], rt["client_ms"]
        nan = float("nan")
        rows += [
            (
                f"/v1/retrieve x{rt['requests']}",
                f"p50 {cm['p50']:.1f} ms",
                f"p95 {cm['p95']:.1f} ms, max {cm['max']:.1f} ms "
                f"(first {rt['first_request_ms']:.1f} ms)",
            ),
            (
                "  server split, medians",
                f"embed {sm.get('embed_ms', nan):.1f} ms",
                f"search {sm.get('search_ms', nan):.2f} ms (dense {sm.get('dense_ms', nan):.2f}, "
                f"keyword {sm.get('keyword_ms', nan):.2f}, fuse {sm.get('fuse_ms', nan):.2f}), "
                f"total {sm.get('total_ms', nan):.1f} ms, "
                f"HTTP and JSON {rt['http_overhead_ms_median']:.1f} ms",
            ),
        ]
    a = r.get("answers")
    if a is not None:
        rows += [
            (
                "/v1/query first (cold)",
                f"{a['first_seconds']:.2f} s",
                f"generate {a['first_generate_ms']:.0f} ms",
            ),
            (
                f"/v1/query warm median x{a['warm_calls']}",
                f"{a['warm_seconds_median']:.2f} s",
                f"generate {a['warm_generate_ms_median']:.0f} ms; "
                f"{a['warm_prompt_tokens_median']:.0f} prompt + "
                f"{a['warm_completion_tokens_median']:.0f} completion tokens; "
                f"per generate second: {a['warm_tokens_per_s_median']:.1f} completion tok, "
                f"{a['warm_all_tokens_per_s_median']:.0f} prompt+completion tok",
            ),
            (
                "  answers at max_tokens",
                f"{a['at_max_tokens']} of {a['calls']}",
                f"max_tokens {a['max_tokens']}; degraded {a['degraded']}",
            ),
        ]
    sp = r.get("stream_split") or {}
    if "prompt_tokens" in sp:
        rows.append(
            (
                "model direct, streamed",
                f"{sp['total_s']:.2f} s",
                f"prompt {sp['prompt_tokens']} tok in {sp['time_to_first_piece_s']:.2f} s "
                f"= {sp['prompt_tokens_per_s']:.0f} tok/s; then {sp['completion_tokens']} tok "
                f"at {sp['generation_tokens_per_s']} tok/s",
            )
        )
    rows.append(
        (
            "peak RSS",
            f"{r['memory']['end']['peak_rss_mib']:.0f} MiB",
            ", ".join(f"{k} {v['peak_rss_mib']:.0f}" for k, v in r["memory"].items() if k != "end"),
        )
    )
    rows.append(
        (
            "CPU s per wall s",
            "",
            ", ".join(f"{k} {v['cpu_per_wall']}" for k, v in r["phases"].items()),
        )
    )
    return rows


def print_table(r: dict[str, Any]) -> None:
    """The figures that matter, one line each."""
    rows = _rows(r)
    m, pdfium = r["machine"], r["parse"]["pypdfium2"]
    print()
    print(
        f"{r['corpus']['name']}: {pdfium['pages']} pages, {pdfium['chars']:,} characters, "
        f"{r['chunk']['chunks']} chunks"
    )
    emb = r["settings"].get("embedding", {})
    print(
        f"{m['cpus_usable']} CPUs ({m['cpu_model']}), torch threads {m['torch_threads']}; "
        f"embedding backend {emb.get('backend', 'torch')}; load average "
        f"{m['load_avg_at_start'][0]} at start, {r['load_avg_at_end'][0]} at end"
    )
    width = max(len(row[0]) for row in rows)
    vwidth = max(len(row[1]) for row in rows)
    for label, value, detail in rows:
        print(f"{label:<{width}}  {value:>{vwidth}}  {detail}".rstrip())
