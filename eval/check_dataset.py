"""Check the Debian Reference evaluation set against the PDF it was labelled on.

The PDF is read exactly as the service reads it (``ingest.loaders.load_document``
with the default ingest settings), so a page number here is the page number
a retrieved chunk will carry.  Checked:

- every line is a JSON object with the expected fields and types;
- ids are unique and kinds are ``fact``, ``howto`` or ``unanswerable``;
- an answerable question has 1-3 answers and at least one relevant page, and
  every answer occurs (case-insensitively) in the text of one of its pages;
- an unanswerable question has no answers and no relevant pages;
- there are enough questions of each sort;
- every id of the smoke slice exists in the set.

Usage::

    python eval/check_dataset.py [--pdf PATH] [--dataset FILE] [--smoke FILE]

Exit status 0 when everything holds, 1 otherwise (each problem on one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fetch_docs import DEFAULT_CACHE_DIR, PDF_NAME, FetchError, check_digest, locate_pdf

from ingest.loaders import load_document
from rag_service.config import IngestSettings

HERE = Path(__file__).resolve().parent
DEFAULT_DATASET = HERE / "debian-reference.jsonl"
DEFAULT_SMOKE = HERE / "debian-reference-smoke.txt"

KINDS = ("fact", "howto", "unanswerable")
MIN_ANSWERABLE = 60
MIN_UNANSWERABLE = 8
MAX_ANSWERS = 3
FIELDS = {"id", "question", "answers", "relevant", "kind"}


def page_texts(pdf: Path) -> dict[int, str]:
    """Text of every page that has text, keyed by the page number the loader reports."""
    document = load_document(pdf.read_bytes(), pdf.name, IngestSettings())
    texts: dict[int, str] = {}
    for section in document.sections:
        if section.page is not None:
            texts[section.page] = texts.get(section.page, "") + section.text
    return texts


def check_record(record: Any, pages: dict[int, str]) -> list[str]:
    """Problems with one record of the set (empty if none)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems: list[str] = []
    if set(record) != FIELDS:
        problems.append(f"fields are {sorted(record)}, expected {sorted(FIELDS)}")
        return problems
    kind, answers, relevant = record["kind"], record["answers"], record["relevant"]
    if not isinstance(record["question"], str) or not record["question"].strip():
        problems.append("question is empty")
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is not one of {KINDS}")
    if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
        return [*problems, "answers must be a list of non-empty strings"]
    if not isinstance(relevant, list):
        return [*problems, "relevant must be a list"]

    numbers: list[int] = []
    for ref in relevant:
        if not isinstance(ref, dict) or set(ref) != {"source", "page"}:
            problems.append(f"relevant entry {ref!r} must be {{source, page}}")
            continue
        if ref["source"] != PDF_NAME:
            problems.append(f"relevant source {ref['source']!r} is not {PDF_NAME!r}")
        page = ref["page"]
        if not isinstance(page, int) or isinstance(page, bool):
            problems.append(f"page {page!r} is not an integer")
        elif page not in pages:
            problems.append(f"page {page} has no text in the PDF")
        else:
            numbers.append(page)

    if kind == "unanswerable":
        if answers or relevant:
            problems.append("an unanswerable question must have no answers and no pages")
        return problems
    if not 1 <= len(answers) <= MAX_ANSWERS:
        problems.append(f"{len(answers)} answers, expected 1 to {MAX_ANSWERS}")
    if not relevant:
        problems.append("an answerable question needs at least one relevant page")
    for answer in answers:
        needle = answer.casefold()
        if numbers and not any(needle in pages[n].casefold() for n in numbers):
            problems.append(f"answer {answer!r} is on none of pages {numbers}")
    return problems


def check(dataset: Path, smoke: Path, pages: dict[int, str]) -> tuple[list[str], Counter[str]]:
    """All problems found in the set and its smoke slice, and the count of each kind."""
    problems: list[str] = []
    kinds: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for number, line in enumerate(dataset.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            problems.append(f"{dataset.name}:{number}: blank line")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{dataset.name}:{number}: invalid JSON ({exc})")
            continue
        label = f"{dataset.name}:{number}"
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            label = f"{label} {record['id']}"
            ids[record["id"]] += 1
            kinds[str(record.get("kind"))] += 1
        problems.extend(f"{label}: {p}" for p in check_record(record, pages))

    problems.extend(f"id {i} is used {n} times" for i, n in ids.items() if n > 1)
    answerable = kinds["fact"] + kinds["howto"]
    if answerable < MIN_ANSWERABLE:
        problems.append(f"only {answerable} answerable questions, expected >= {MIN_ANSWERABLE}")
    if kinds["unanswerable"] < MIN_UNANSWERABLE:
        problems.append(
            f"only {kinds['unanswerable']} unanswerable questions, expected >= {MIN_UNANSWERABLE}"
        )

    smoke_ids = [s.strip() for s in smoke.read_text(encoding="utf-8").splitlines() if s.strip()]
    problems.extend(f"{smoke.name}: unknown id {s}" for s in smoke_ids if s not in ids)
    problems.extend(
        f"{smoke.name}: id {s} listed {n} times" for s, n in Counter(smoke_ids).items() if n > 1
    )
    return problems, kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdf", type=Path, help="the PDF (default: what fetch_docs.py finds)")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--smoke", type=Path, default=DEFAULT_SMOKE)
    args = parser.parse_args(argv)

    try:
        pdf: Path = args.pdf or locate_pdf(DEFAULT_CACHE_DIR)
    except FetchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    check_digest(pdf)
    problems, kinds = check(args.dataset, args.smoke, page_texts(pdf))
    for problem in problems:
        sys.stdout.write(f"{problem}\n")
    summary = ", ".join(f"{kind}={kinds[kind]}" for kind in KINDS)
    verdict = "FAILED" if problems else "ok"
    sys.stdout.write(f"{args.dataset.name}: {summary}; {len(problems)} problem(s): {verdict}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
