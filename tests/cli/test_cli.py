"""The ``rag`` command in-process: ingest with progress, ask, config, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag_service.cli import app
from tests.helpers import make_pdf

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("RAG_DATA_DIR", str(data))
    return data


def test_ingest_files_and_folders_then_ask(env: Path, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "bees.md").write_text("# Bees\n\nBees make honey from flower nectar.\n")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not ingestible: not picked up
    pdf = tmp_path / "tides.pdf"
    pdf.write_bytes(make_pdf(["Intro page.", "High tide comes twice a day at the harbour."]))

    result = runner.invoke(app, ["ingest", str(folder), str(pdf), "--collection", "kb"])

    assert result.exit_code == 0, result.output
    assert "2 document(s) accepted" in result.output
    assert "indexed   bees.md" in result.output
    assert "indexed   tides.pdf" in result.output
    assert "chunks" in result.output

    result = runner.invoke(app, ["ask", "How often does high tide come?", "-c", "kb", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["answer"].strip()
    assert body["sources"][0]["source"] == "tides.pdf"
    assert body["sources"][0]["page"] == 2


@pytest.mark.slow
def test_ask_prints_the_answer_then_numbered_sources(env: Path, tmp_path: Path) -> None:
    doc = tmp_path / "tides.txt"
    doc.write_text("High tide comes twice a day at the harbour.")
    assert runner.invoke(app, ["ingest", str(doc), "-c", "kb"]).exit_code == 0

    result = runner.invoke(app, ["ask", "How often is high tide?", "-c", "kb"])

    assert result.exit_code == 0, result.output
    answer, _, sources = result.output.partition("\nSources:\n")
    assert answer.strip()
    assert "[1] tides.txt" in sources


def test_a_failed_document_makes_ingest_exit_1_with_its_reason(env: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(make_pdf(["text"])[:200])
    result = runner.invoke(app, ["ingest", str(bad), "-c", "kb"])
    assert result.exit_code == 1
    assert "failed    broken.pdf" in result.output


def test_errors_are_one_clean_line(env: Path) -> None:
    result = runner.invoke(app, ["ask", "anything", "-c", "missing"])
    assert result.exit_code == 1
    assert "error: collection 'missing' does not exist" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["ingest", "/no/such/file.pdf", "-c", "kb"])
    assert result.exit_code == 1
    assert "no such file or folder" in result.output


def test_config_prints_settings_with_secrets_masked(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_LLM__API_KEY", "sk-very-secret")
    monkeypatch.setenv("RAG_LLM__BACKEND", "openai")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["llm"]["backend"] == "openai"
    assert config["llm"]["api_key"] == "**********"
    assert "sk-very-secret" not in result.output
    assert config["data_dir"] == str(env)
