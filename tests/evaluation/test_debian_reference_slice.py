"""The CI slice of the labelled set: the real 261-page manual, the real embedder and model.

`rag eval` ingests Debian Reference (from Debian's `debian-reference-en`,
installed by `.ci/run`), runs the 14 smoke questions through every retrieval
mode and the direct strategy with the local SmolLM2 model, and holds the line
with `--gate`.  The full set is a README command, not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.evaluation.command import make_eval_command
from rag_service.llm.base import ChatModel

ROOT = Path(__file__).resolve().parents[2]
MANUAL = Path("/usr/share/debian-reference/debian-reference.en.pdf")

#: Measured on this slice (hybrid nDCG@10 0.93, hit@5 1.0; see the issue notes),
#: with room for noise-free drift only: retrieval here is deterministic.
GATES = [
    "hybrid.ndcg@10>=0.80",
    "hybrid.hit@5>=0.90",
    "dense.hit@5>=0.80",
    "keyword.hit@5>=0.70",
    "direct.abstain_precision>=0.99",
    "direct.citation_validity>=0.50",
]


@pytest.mark.slow
def test_smoke_slice_passes_its_gates(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    embedder: SentenceTransformerEmbedder,
    local_model: ChatModel,
) -> None:
    assert MANUAL.exists(), "apt-get install debian-reference-en (.ci/run does)"
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path / "data"))
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("eval")(make_eval_command(embedder=embedder, chat_model=local_model))

    @app.command()
    def other() -> None:
        """A second command, so ``eval`` is a subcommand as in ``rag``."""

    out = tmp_path / "results.json"
    args = [
        "eval",
        str(ROOT / "eval" / "debian-reference.jsonl"),
        "--collection",
        "debref",
        "--ingest",
        str(MANUAL),
        "--ids",
        str(ROOT / "eval" / "debian-reference-smoke.txt"),
        "--out",
        str(out),
    ]
    for gate in GATES:
        args += ["--gate", gate]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report, "the results file is empty"
