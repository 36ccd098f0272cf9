"""``rag eval`` through typer's CliRunner: gates and exit codes on a fake backend,
then real runs in process and over HTTP on a small real document set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import CollectionNotFound
from rag_service.evaluation.command import eval_command, make_eval_command
from rag_service.evaluation.gates import Gate, GateError, check_gates, parse_gate
from rag_service.llm.base import ChatModel
from tests.evaluation.evalkit import QUESTIONS, FakeBackend, answer, hit, write_jsonl
from tests.helpers import ScriptedChatModel
from tests.live import LiveServer

runner = CliRunner()


def app_with(command: Callable[..., None]) -> typer.Typer:
    """A throwaway app with ``eval`` registered the way ``rag_service.cli`` does."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("eval")(command)

    @app.command()
    def other() -> None:
        """A second command, so ``eval`` is a subcommand as in ``rag``."""

    return app


def invoke(command: Callable[..., None], *args: str | Path) -> Result:
    return runner.invoke(app_with(command), ["eval", *(str(a) for a in args)])


# -- gates ---------------------------------------------------------------------

KNOWN = ["hybrid.ndcg@10", "direct.contains", "direct.latency_p50_ms"]


def test_gates_parse_and_compare() -> None:
    assert parse_gate("hybrid.ndcg@10>=0.6", KNOWN) == Gate("hybrid.ndcg@10", ">=", 0.6)
    assert parse_gate(" direct.latency_p50_ms <= 1.5e3 ", KNOWN) == Gate(
        "direct.latency_p50_ms", "<=", 1500.0
    )
    assert parse_gate("Hybrid.NDCG@10>=1", KNOWN).metric == "hybrid.ndcg@10"
    ge, le = Gate("m", ">=", 0.5), Gate("m", "<=", 0.5)
    assert ge.passes(0.5) and not ge.passes(0.49) and not ge.passes(None)
    assert le.passes(0.5) and not le.passes(0.51) and not le.passes(float("nan"))
    [result] = check_gates([ge], {"m": 0.7})
    assert (result.value, result.passed) == (0.7, True)
    assert check_gates([ge], {})[0].passed is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hybrid.ndcg@10", "expected METRIC>=VALUE or METRIC<=VALUE"),
        ("hybrid.ndcg@10>0.5", "expected METRIC>=VALUE"),
        ("hybrid.ndcg@10=>0.5", "expected METRIC>=VALUE"),
        (">=0.5", "expected METRIC>=VALUE"),
        ("hybrid.ndcg@10>=high", "'high' is not a number"),
        ("hybrid.ndcg@10>=nan", "the threshold is not a number"),
        ("hybrid.ndcg@5>=0.5", "unknown metric 'hybrid.ndcg@5'"),
    ],
)
def test_bad_gates_are_refused(text: str, message: str) -> None:
    with pytest.raises(GateError, match=message):
        parse_gate(text, KNOWN)


# -- the command on a fake backend -------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {"id": "a", "question": "QA", "answers": ["alpha"], "relevant": [{"source": "a.md"}],
     "kind": "fact"},
    {"id": "b", "question": "QB", "answers": ["beta"], "relevant": [{"source": "b.md"}],
     "kind": "fact"},
    {"id": "u", "question": "QU", "kind": "unanswerable"},
]  # fmt: skip


def fake() -> FakeBackend:
    """hybrid finds both, dense only QA; direct gets QA right and abstains on QU."""
    retrievals = {
        ("hybrid", "QA"): [hit("a.md")],
        ("hybrid", "QB"): [hit("x.md"), hit("b.md")],
        ("dense", "QA"): [hit("a.md")],
        ("keyword", "QB"): [hit("b.md")],
    }
    answers = {
        ("direct", "QA"): answer("alpha [1]", sources=[hit("a.md")], citations=[1]),
        ("direct", "QB"): answer("gamma"),
        ("direct", "QU"): answer("Not in the sources.", answerable=False),
        ("cot", "QA"): answer("alpha"),
        ("cot", "QB"): answer("beta"),
        ("cot", "QU"): answer("7"),
    }
    return FakeBackend(retrievals=retrievals, answers=answers)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "set.jsonl", ROWS)


def test_all_gates_passing_exits_0_and_prints_both_tables(dataset: Path, tmp_path: Path) -> None:
    backend = fake()
    out = tmp_path / "results.json"
    result = invoke(
        make_eval_command(backend=backend),
        dataset, "-c", "kb", "--out", out,
        "--gate", "hybrid.hit@5>=1", "--gate", "hybrid.mrr>=0.75",
        "--gate", "direct.contains>=0.5", "--gate", "direct.abstain_recall>=1",
        "--gate", "direct.latency_p50_ms<=60000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Retrieval" in result.output and "Answers" in result.output
    assert "pass hybrid.hit@5>=1" in result.output
    assert "FAIL" not in result.output
    assert backend.closed
    data = json.loads(out.read_text())
    assert data["retrieval"]["hybrid"]["mrr"] == 0.75
    assert data["answers"]["direct"]["contains"] == 0.5
    assert data["dataset"] == str(dataset)
    assert [g["passed"] for g in data["gates"]] == [True] * 5
    assert [q["id"] for q in data["questions"]] == ["a", "b", "u"]


def test_a_failed_gate_exits_1_and_says_which(dataset: Path) -> None:
    result = invoke(
        make_eval_command(backend=fake()),
        dataset, "-c", "kb",
        "--gate", "hybrid.hit@5>=1", "--gate", "dense.recall@5>=0.9",
        "--gate", "cot.abstain_precision>=0.5",
        "--strategies", "direct,cot",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "pass hybrid.hit@5>=1" in result.output
    assert "FAIL dense.recall@5>=0.9  (got 0.5)" in result.output
    # cot never abstained: precision has no value, which fails
    assert "FAIL cot.abstain_precision>=0.5  (got no value)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gate", "hybrid.ndcg@10 > 0.5"], "expected METRIC>=VALUE or METRIC<=VALUE"),
        (["--gate", "hybrid.precision>=0.5"], "unknown metric 'hybrid.precision'"),
        (["--gate", "cot.contains>=0.5"], "unknown metric 'cot.contains'"),
        (["--skip-answers", "--gate", "direct.contains>=0.5"], "unknown metric"),
        (["--modes", "dense", "--gate", "hybrid.mrr>=0.5"], "unknown metric 'hybrid.mrr'"),
        (["--k", "3", "--gate", "dense.hit@5>=0.5"], "unknown metric 'dense.hit@5'"),
        (["--modes", "dense,vector"], "modes must be among dense, keyword, hybrid"),
        (["--strategies", "guess"], "strategies must be among"),
    ],
)
def test_bad_options_exit_2_before_anything_runs(
    dataset: Path, args: list[str], message: str
) -> None:
    backend = fake()
    result = invoke(make_eval_command(backend=backend), dataset, "-c", "kb", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert backend.calls == []


def test_an_unknown_metric_lists_the_known_names(dataset: Path) -> None:
    result = invoke(make_eval_command(backend=fake()), dataset, "-c", "kb", "--gate", "nope>=1")
    assert result.exit_code == 2
    flat = "".join(result.output.replace("│", " ").split())
    for name in ("dense.hit@5", "keyword.ndcg@10", "hybrid.recall@5", "direct.contains",
                 "direct.citation_validity", "direct.latency_p50_ms"):  # fmt: skip
        assert name in flat


def test_a_bad_dataset_line_exits_2_naming_the_line(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [*ROWS[:2], '{"question": "QX", "kind": "fact"}'])
    result = invoke(make_eval_command(backend=fake()), bad, "-c", "kb")
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.replace("│", " ").split())
    assert 'bad.jsonl line 3: a "fact" question needs at least one expected answer' in flat


def test_ids_and_limit_choose_the_questions(dataset: Path, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("u\nb\n")
    out = tmp_path / "r.json"
    result = invoke(
        make_eval_command(backend=fake()), dataset, "-c", "kb", "--ids", ids, "--limit", "1",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [q["id"] for q in json.loads(out.read_text())["questions"]] == ["b"]

    ids.write_text("zzz\n")
    result = invoke(make_eval_command(backend=fake()), dataset, "-c", "kb", "--ids", ids)
    assert result.exit_code == 2
    assert "unknown question id(s): 'zzz'" in result.output


def test_a_service_error_is_one_clean_line_and_exit_1(dataset: Path) -> None:
    backend = fake()
    backend.retrievals = {}
    backend.answers[("direct", "QA")] = CollectionNotFound("collection [kb] does not exist")
    result = invoke(make_eval_command(backend=backend), dataset, "-c", "kb", "--modes", "dense")
    assert result.exit_code == 1
    assert "error: collection [kb] does not exist" in result.output
    assert "Traceback" not in result.output


def test_ingest_goes_first_and_skip_answers_asks_nothing(dataset: Path, tmp_path: Path) -> None:
    backend = fake()
    backend.jobs = [{"id": "j", "status": "succeeded", "progress": {"documents_failed": 0}}]
    result = invoke(
        make_eval_command(backend=backend), dataset, "-c", "kb", "--ingest", tmp_path,
        "--skip-answers",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert backend.calls[0] == ("ingest", "kb", (tmp_path,))
    assert all(c[0] == "retrieve" for c in backend.calls[1:])
    assert "Answers" not in result.output


def test_the_module_level_command_registers_with_typer(dataset: Path) -> None:
    result = invoke(eval_command, "--help")
    assert result.exit_code == 0
    assert "--gate" in result.output and "--skip-answers" in result.output


# -- real runs: in process and over HTTP ------------------------------------------


ANSWERABLE_IDS = [q["id"] for q in QUESTIONS if q["kind"] != "unanswerable"]


def real(embedder: SentenceTransformerEmbedder, chat_model: ChatModel | None = None) -> Any:
    return make_eval_command(embedder=embedder, chat_model=chat_model)


def test_in_process_retrieval_then_answers_with_a_scripted_model(
    data_env: Path,
    embedder: SentenceTransformerEmbedder,
    scripted: ScriptedChatModel,
    corpus: Path,
    questions_file: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "retrieval.json"
    result = invoke(
        real(embedder), questions_file, "-c", "island", "--ingest", corpus, "--skip-answers",
        "--out", out, "--gate", "hybrid.hit@5>=1", "--gate", "dense.hit@5>=1",
        "--gate", "keyword.hit@5>=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["ingested"][0]["progress"]["documents_done"] == 4
    for mode in ("dense", "keyword", "hybrid"):
        assert data["retrieval"][mode]["hit@5"] == 1.0
        assert data["retrieval"][mode]["questions"] == 5

    # the same data directory again, now answering with a scripted model
    scripted.answer = "The lighthouse is kept by Marta Quill [1]."
    out = tmp_path / "answers.json"
    result = invoke(
        real(embedder, scripted), questions_file, "-c", "island", "--modes", "hybrid",
        "--out", out, "--gate", "direct.contains>=0.2", "--gate", "direct.contains<=0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    direct = data["answers"]["direct"]
    assert direct["contains"] == pytest.approx(1 / 5)  # only the keeper's answer is right
    assert direct["cited_share"] == 1.0
    assert direct["citation_validity"] == 1.0  # [1] is each question's own document
    assert direct["degraded"] == 0 and direct["errors"] == 0
    rows = {q["id"]: q["answers"]["direct"] for q in data["questions"]}
    assert rows["keeper"]["contains"] is True
    assert all(rows[i]["calls"] == 1 for i in ANSWERABLE_IDS)
    assert len(scripted.prompts) == sum(r["calls"] for r in rows.values())


def test_http_backend_gives_the_same_retrieval_as_in_process(
    serve: Callable[[Settings], LiveServer],
    embedder: SentenceTransformerEmbedder,
    data_env: Path,
    corpus: Path,
    questions_file: Path,
    tmp_path: Path,
) -> None:
    live = serve(
        Settings(data_dir=tmp_path / "served", ingest=IngestSettings(poll_interval_s=0.05))
    )
    over_http, in_process = tmp_path / "http.json", tmp_path / "local.json"
    result = invoke(
        real(embedder), questions_file, "-c", "island", "--url", live.url,
        "--api-key", "unused", "--ingest", corpus, "--skip-answers", "--out", over_http,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(
        real(embedder), questions_file, "-c", "island", "--ingest", corpus, "--skip-answers",
        "--out", in_process,
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    remote, local = json.loads(over_http.read_text()), json.loads(in_process.read_text())
    assert remote["backend"] == live.url and local["backend"] == "in-process"
    assert remote["retrieval"] == local["retrieval"]
    for a, b in zip(remote["questions"], local["questions"], strict=True):
        assert a["retrieval"] == b["retrieval"], a["id"]
    assert remote["retrieval"]["hybrid"]["hit@5"] == 1.0
