"""``rag ask`` with a retrieval mode and filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rag_service.cli import _filters, app
from rag_service.storage.filters import ChunkFilter

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("RAG_DATA_DIR", str(data))
    return data


def test_options_become_a_filter() -> None:
    flt = _filters(
        ["doc_1"], ["a.txt"], ["pdf"], 2, 5, ["team=ops", "tier=1", "team=dev", "flag=true", "x="]
    )
    assert flt == ChunkFilter(
        document_ids=("doc_1",),
        sources=("a.txt",),
        file_types=("pdf",),
        page_from=2,
        page_to=5,
        metadata={"team": ["ops", "dev"], "tier": 1, "flag": True, "x": ""},
    )
    assert _filters(None, None, None, None, None, None) is None
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        _filters(None, None, None, None, None, ["no-equals-sign"])


def test_ask_with_mode_and_filters(env: Path, tmp_path: Path) -> None:
    for name, text in (
        ("tides.txt", "High tide comes twice a day at the harbour."),
        ("boats.txt", "Boats leave the harbour at high tide in the morning."),
    ):
        (tmp_path / name).write_text(text)
    ingest = runner.invoke(
        app, ["ingest", str(tmp_path / "tides.txt"), str(tmp_path / "boats.txt"), "-c", "kb"]
    )
    assert ingest.exit_code == 0, ingest.output

    result = runner.invoke(
        app,
        [
            "ask",
            "When is high tide?",
            "-c",
            "kb",
            "--mode",
            "keyword",
            "--source",
            "boats.txt",
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["mode"] == "keyword"
    assert [s["source"] for s in body["sources"]] == ["boats.txt"]
    assert body["sources"][0]["keyword_score"] > 0

    bad = runner.invoke(app, ["ask", "When?", "-c", "kb", "--mode", "fuzzy"])
    assert bad.exit_code == 1
    assert "mode must be one of" in bad.output
