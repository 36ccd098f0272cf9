"""Time to first token of the local model on a real RAG prompt, per llama.cpp setting.

    python bench/local_model.py [--pdf PATH] [--tokens 1500] [--reps 3] [--only NAME,...]

The prompt is built the way the query service builds it (``build_messages``:
system prompt, numbered sources, question, instructions) from chunks of
the Debian Reference PDF, about ``--tokens`` tokens long.  Three parts, in
one process:

1. cold start, old settings vs new: load, first call's time to first token
   (streamed through ``LocalChatModel``), then a second call with another
   question and other sources; the new settings are warmed as the service
   warms them (``Runtime._warm_chat_model``), and the second call reports how
   many prompt tokens llama.cpp evaluated (the rest came from the KV cache).
2. the setting matrix: one llama.cpp context per variant (threads, batch and
   micro-batch sizes, flash attention, KV cache type, mmap, weight type),
   the KV cache cleared before each prompt, the variants measured in turn
   round after round so they share the machine's load.  Figures: median
   time to first token (prompt evaluation plus one sampled token), prompt
   tokens/s, CPU seconds per prompt (less sensitive to other load than wall
   time on a busy machine), generation tokens/s (64 tokens after the
   prompt, its KV cache kept), and the 1-minute load average.
3. accuracy of the weight types: next-token argmax agreement with the exact
   dequantised weights (F32) at every position of a 512-token prompt, and
   the greedy answers of three prompts for each type.

A table goes to stdout and every figure to
``bench/results/local_model-<UTC time>.json`` (ignored by git).  This
measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS = (
    "How do I add a new APT repository to sources.list?",
    "How do I hold a package so that it is not upgraded?",
    "How do I read the systemd journal logs?",
)
CPUS = os.cpu_count() or 1
#: Tokens generated after each timed prompt, for the generation speed.
GEN_TOKENS = 64

#: name -> (weights, Llama keyword arguments).  "old" is the code before this change.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "old: q4_1 t2 b512 no-fa": ("file", {}),
    "q4_1 t1": ("file", {"n_threads": 1, "n_threads_batch": 1}),
    "q4_1 fa": ("file", {"flash_attn": True}),
    "q8_0 fa": ("q8_0", {"flash_attn": True}),
    "f16 fa": ("f16", {"flash_attn": True}),
    "bf16 no-fa": ("bf16", {}),
    "new: bf16 fa": ("bf16", {"flash_attn": True}),
    "bf16 fa t1": ("bf16", {"flash_attn": True, "n_threads": 1, "n_threads_batch": 1}),
    "bf16 fa ub128": ("bf16", {"flash_attn": True, "n_ubatch": 128}),
    "bf16 fa b2048 ub2048": ("bf16", {"flash_attn": True, "n_batch": 2048, "n_ubatch": 2048}),
    "bf16 fa kv-q8_0": ("bf16", {"flash_attn": True, "type_k": 8, "type_v": 8}),
    "bf16 fa no-mmap": ("bf16", {"flash_attn": True, "use_mmap": False}),
    "bf16 fa ub256": ("bf16", {"flash_attn": True, "n_ubatch": 256}),
    "bf16 fa kv-bf16": ("bf16", {"flash_attn": True, "type_k": 30, "type_v": 30}),
    # requantized from the shipped Q4_1: llama.cpp repacks Q4_0 for AVX512 matrix products
    "q4_0 fa": ("q4_0", {"flash_attn": True}),
    "q4_0 fa ub256": ("q4_0", {"flash_attn": True, "n_ubatch": 256}),
}


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def chunk_texts(pdf: Path, first_page: int = 40) -> list[tuple[int, str]]:
    """(page, ~900-character chunk cut at a sentence end) from the PDF, in page order."""
    import pypdfium2

    document = pypdfium2.PdfDocument(str(pdf))
    chunks: list[tuple[int, str]] = []
    for index in range(first_page, min(first_page + 40, len(document))):
        text = " ".join(document[index].get_textpage().get_text_range().split())
        while len(text) > 300:
            head = text[:900]
            ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
            cut = ends[-1] if ends and ends[-1] > 300 else len(head)
            chunks.append((index + 1, text[:cut].strip()))
            text = text[cut:]
    return chunks


def build_prompt(
    model: Any, question: str, chunks: list[tuple[int, str]], tokens: int, start: int
) -> list[Any]:
    """``build_messages`` with as many sources from ``start`` as fit in ``tokens``."""
    from rag_service.prompting import ContextSource, build_messages
    from rag_service.storage.records import StoredChunk

    sources: list[Any] = []
    messages = build_messages(question, sources)
    for offset, (page, text) in enumerate(chunks[start:]):
        chunk = StoredChunk(offset, "doc", "debian-reference.en.pdf", offset, page, (), 0, 1, text)
        trial = [*sources, ContextSource(len(sources) + 1, chunk, 1.0, text)]
        candidate = build_messages(question, trial)
        if model.prompt_tokens(candidate) > tokens:
            break
        sources, messages = trial, candidate
    return messages


def first_token_s(model: Any, messages: Sequence[Any]) -> float:
    """Seconds from the call to the first streamed piece."""
    started = time.perf_counter()
    stream = model.stream(messages, max_tokens=8)
    next(stream)
    elapsed = time.perf_counter() - started
    for _ in stream:
        pass
    return elapsed


def cold_start(source: str, chunks: list[tuple[int, str]], tokens: int) -> dict[str, Any]:
    """Old settings vs new, each from a fresh load: load, first and second call."""
    from rag_service.config import LLMSettings
    from rag_service.llm.local import LocalChatModel, warm_local_models
    from rag_service.prompting import ContextSource, build_messages
    from rag_service.storage.records import StoredChunk

    out: dict[str, Any] = {}
    old = {"weights": "file", "flash_attn": False}
    for name, update in (("old", old), ("new", {})):
        settings = LLMSettings(model_path=source, **update)
        started = time.perf_counter()
        model = LocalChatModel(settings)
        loaded = time.perf_counter() - started
        warm_s = 0.0
        if name == "new":
            probe = StoredChunk(0, "", "probe.txt", 0, None, (), 0, 6, "Probe.")
            probes = [
                build_messages("What?", []),
                build_messages("Why?", [ContextSource(1, probe, 1.0, "Probe.")]),
            ]
            started = time.perf_counter()
            warm_local_models(model, probes)
            warm_s = time.perf_counter() - started
        first = build_prompt(model, QUESTIONS[0], chunks, tokens, 0)
        second = build_prompt(model, QUESTIONS[1], chunks, tokens, 20)
        row = {
            "load_s": round(loaded, 2),
            "warm_s": round(warm_s, 2),
            "first_ttft_s": round(first_token_s(model, first), 2),
            "first_prompt_tokens": model.prompt_tokens(first),
            "first_evaluated": model.last_prompt_evaluated,
            "second_ttft_s": round(first_token_s(model, second), 2),
            "second_prompt_tokens": model.prompt_tokens(second),
            "second_evaluated": model.last_prompt_evaluated,
            "weights": model.weights,
            "load_avg": load_avg(),
        }
        model.close()
        out[name] = row
        print(f"cold {name}: {row}", flush=True)
    return out


def weight_files(source: Path, kinds: set[str]) -> dict[str, Path]:
    from rag_service.llm.weights import FTYPES, convert_cached, default_cache_dir

    FTYPES.setdefault("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")  # benchmark only, not a setting
    files = {"file": source}
    for kind in sorted(kinds - {"file"}):
        files[kind] = convert_cached(source, kind, default_cache_dir())
    return files


def matrix(
    files: dict[str, Path], tokens_list: list[list[int]], names: list[str], reps: int
) -> dict[str, Any]:
    """Each variant's time to first token on the same prompts, interleaved round by round."""
    import llama_cpp

    models: dict[str, Any] = {}
    for name in names:
        weights, kwargs = VARIANTS[name]
        params = {"n_threads": CPUS, "n_threads_batch": CPUS, **kwargs}
        models[name] = llama_cpp.Llama(
            model_path=str(files[weights]), n_ctx=2048, verbose=False, **params
        )
    samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in names}
    for rep in range(reps):
        for name, llama in models.items():
            tokens = tokens_list[rep % len(tokens_list)]
            llama.reset()
            cpu, wall = time.process_time(), time.perf_counter()
            llama.create_completion(tokens, max_tokens=1, temperature=0.0)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            # The same prompt again: its KV cache is kept, so this times generation;
            # end-of-text is banned so every variant generates all GEN_TOKENS.
            gen_wall = time.perf_counter()
            out = llama.create_completion(
                tokens,
                max_tokens=GEN_TOKENS,
                temperature=0.0,
                logit_bias={llama.token_eos(): -100.0},
            )
            gen_wall = time.perf_counter() - gen_wall
            gen_tok_s = out["usage"]["completion_tokens"] / gen_wall
            samples[name].append((wall, cpu, load_avg(), gen_tok_s))
            print(
                f"  rep {rep} {name}: {wall:.2f}s cpu {cpu:.2f}s, generation {gen_tok_s:.1f} tok/s"
                f" load {load_avg()}",
                flush=True,
            )
    for llama in models.values():
        llama.close()
    n = len(tokens_list[0])
    rows = {}
    for name, values in samples.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        rows[name] = {
            "ttft_s": round(wall, 2),
            "prompt_tok_s": round(n / wall, 1),
            "cpu_s": round(cpu, 2),
            "prompt_tok_per_cpu_s": round(n / cpu, 1),
            "generation_tok_s": round(statistics.median(v[3] for v in values), 1),
            "load_avg": [v[2] for v in values],
            "samples_s": [round(v[0], 2) for v in values],
        }
    return {"prompt_tokens": n, "reps": reps, "rows": rows}


def accuracy(files: dict[str, Path], tokens: list[int], prompts: list[list[int]]) -> dict[str, Any]:
    """Argmax agreement with exact F32 weights per position, and greedy answers."""
    import llama_cpp
    import numpy as np

    from rag_service.llm.weights import convert_cached, default_cache_dir

    exact = convert_cached(files["file"], "f32", default_cache_dir())
    argmax: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    for kind, path in [("f32", exact), *files.items()]:
        llama: Any = llama_cpp.Llama(
            model_path=str(path), n_ctx=2048, logits_all=True, verbose=False, flash_attn=True
        )
        llama.eval(tokens)
        argmax[kind] = np.asarray(llama.scores[: len(tokens)]).argmax(axis=1)
        answers[kind] = []
        for prompt in prompts:
            llama.reset()
            out = llama.create_completion(prompt, max_tokens=48, temperature=0.0)
            answers[kind].append(out["choices"][0]["text"])
        llama.close()
    agreement = {kind: round(float((argmax[kind] == argmax["f32"]).mean()), 4) for kind in files}
    return {"positions": len(tokens), "argmax_agreement_with_f32": agreement, "answers": answers}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pdf", type=Path, default=DEFAULT_PDF)
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length to aim for")
    parser.add_argument("--reps", type=int, default=3, help="rounds of the setting matrix")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--skip", default="", help="comma-separated parts: cold,matrix,accuracy")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rag_service.config import LLMSettings, default_gguf_path
    from rag_service.llm.local import LocalChatModel
    from rag_service.llm.weights import convert_cached, cpu_flags, default_cache_dir

    source = default_gguf_path()
    skip = set(filter(None, args.skip.split(",")))
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": CPUS,
        "cpu_flags": {k: v for k, v in cpu_flags().items() if v},
        "model": source,
    }
    chunks = chunk_texts(args.pdf)
    if "cold" not in skip:
        # Before anything else has paged the weights in.
        result["cold"] = cold_start(source, chunks, args.tokens)

    files = weight_files(Path(source), {VARIANTS[n][0] for n in names} | {"file"})
    tokenizer = LocalChatModel(LLMSettings(model_path=source, weights="file"))
    prompts = [build_prompt(tokenizer, QUESTIONS[i], chunks, args.tokens, 10 * i) for i in range(3)]
    token_lists = [tokenizer._prompt_token_ids(p) for p in prompts]
    short = [
        tokenizer._prompt_token_ids(build_prompt(tokenizer, QUESTIONS[i], chunks, 400, 30 + i))
        for i in range(3)
    ]
    tokenizer.close()
    if "matrix" not in skip:
        result["matrix"] = matrix(files, token_lists, names, args.reps)
    if "accuracy" not in skip:
        kinds = {k: v for k, v in files.items() if k in ("file", "q8_0", "q4_0", "f16", "bf16")}
        for kind in ("f16", "bf16"):
            kinds.setdefault(kind, convert_cached(Path(source), kind, default_cache_dir()))
        result["accuracy"] = accuracy(kinds, token_lists[0][:512], short)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print_table(result)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS_DIR / f"local_model-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    if "cold" in result:
        print("\ncold start (load, first call, second call with other question and sources)")
        for name, row in result["cold"].items():
            print(
                f"  {name:4} weights={row['weights']:5} load {row['load_s']:6.2f}s "
                f"warm {row['warm_s']:5.2f}s  1st TTFT {row['first_ttft_s']:6.2f}s "
                f"({row['first_evaluated']}/{row['first_prompt_tokens']} evaluated)  "
                f"2nd TTFT {row['second_ttft_s']:6.2f}s "
                f"({row['second_evaluated']}/{row['second_prompt_tokens']} evaluated)  "
                f"load avg {row['load_avg']}"
            )
    if "matrix" in result:
        m = result["matrix"]
        print(f"\nsetting matrix: {m['prompt_tokens']}-token prompt, KV cache cleared, median")
        print(
            f"  {'variant':24} {'TTFT s':>7} {'tok/s':>7} {'CPU s':>6} {'tok/CPU s':>9}"
            f" {'gen tok/s':>9}  load"
        )
        for name, row in m["rows"].items():
            print(
                f"  {name:24} {row['ttft_s']:7.2f} {row['prompt_tok_s']:7.1f} "
                f"{row['cpu_s']:6.2f} {row['prompt_tok_per_cpu_s']:9.1f}"
                f" {row.get('generation_tok_s', float('nan')):9.1f}  {row['load_avg']}"
            )
    if "accuracy" in result:
        a = result["accuracy"]
        print(f"\nargmax agreement with exact f32 weights over {a['positions']} positions:")
        print("  " + ", ".join(f"{k} {v:.1%}" for k, v in a["argmax_agreement_with_f32"].items()))


if __name__ == "__main__":
    sys.exit(main())
