"""The runner over a fake backend, the HTTP backend over MockTransport, and one
run of the in-process backend over the real embedder and a real document set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import (
    CollectionNotFound,
    InvalidRequest,
    ModelBusy,
    RagError,
    ServiceUnavailable,
)
from rag_service.evaluation.backends import HttpBackend, InProcessBackend
from rag_service.evaluation.dataset import load_dataset, parse_lines
from rag_service.evaluation.report import to_json, write_json
from rag_service.evaluation.runner import EvalOptions, evaluate, ingest, planned_calls
from tests.evaluation.evalkit import FakeBackend, answer, hit, write_jsonl

ROWS: list[dict[str, Any]] = [
    {"id": "a", "question": "QA", "answers": ["alpha"], "relevant": [{"source": "a.md"}],
     "kind": "fact"},
    {"id": "b", "question": "QB", "answers": ["beta"],
     "relevant": [{"source": "b.pdf", "page": 2}, {"source": "c.md"}], "kind": "howto"},
    {"id": "c", "question": "QC", "answers": ["gamma"], "kind": "fact"},  # no labels
    {"id": "d", "question": "QD", "kind": "unanswerable"},
]  # fmt: skip
QUESTIONS = parse_lines([json.dumps(r) for r in ROWS])


def fake() -> FakeBackend:
    return FakeBackend(
        retrievals={
            ("dense", "QA"): [hit("a.md")],
            ("dense", "QB"): [hit("x.md"), hit("c.md"), hit("b.pdf", page=2)],
            ("keyword", "QA"): [hit("x.md")],
            ("keyword", "QB"): [hit("b.pdf", page=1), hit("b.pdf", page=2)],
        },
        answers={
            ("direct", "QA"): answer("It is alpha [1].", sources=[hit("a.md")], citations=[1]),
            ("direct", "QB"): ModelBusy("queue full", retry_after=1.0),
            ("direct", "QC"): answer("gamma"),
            ("direct", "QD"): answer("Not in the sources.", answerable=False, usage=(0, 0)),
            ("self_consistency", "QA"): answer(
                "alpha", cost={"calls": 3, "prompt_tokens": 900, "completion_tokens": 60}
            ),
            ("self_consistency", "QB"): answer("no idea"),
            ("self_consistency", "QC"): answer("no idea"),
            ("self_consistency", "QD"): answer("42"),
        },
    )


def test_a_run_scores_every_mode_and_strategy_from_the_backends_answers() -> None:
    backend = fake()
    options = EvalOptions(
        collection="kb",
        modes=("dense", "keyword"),
        strategies=("direct", "self_consistency"),
        k=2,
        top_k=4,
        samples=3,
    )
    steps: list[str] = []
    result = evaluate(backend, QUESTIONS, options, on_step=steps.append)

    # retrieval: only answerable questions with labels, 10 deep, in each mode
    retrieves = [c for c in backend.calls if c[0] == "retrieve"]
    assert [(c[2], c[3], c[4]) for c in retrieves] == [
        ("QA", 10, "dense"),
        ("QB", 10, "dense"),
        ("QA", 10, "keyword"),
        ("QB", 10, "keyword"),
    ]
    # dense: QA rank 1; QB labels at ranks 3 (b p2) and 2 (c): hit@2 yes, recall@2 1/2
    assert result.retrieval["dense"]["hit@2"] == 1.0
    assert result.retrieval["dense"]["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert result.retrieval["dense"]["mrr"] == pytest.approx((1 + 0.5) / 2)
    # keyword: QA missed; QB b p2 at rank 2 only
    assert result.retrieval["keyword"]["hit@2"] == 0.5
    assert result.retrieval["keyword"]["mrr"] == pytest.approx(0.25)
    assert result.retrieval["keyword"]["questions"] == 2

    # answers: samples only go with self_consistency; top_k to every question
    asks = [c for c in backend.calls if c[0] == "ask"]
    assert {(c[3], c[5], c[6]) for c in asks} == {
        (4, "direct", None),
        (4, "self_consistency", 3),
    }
    direct = result.answers["direct"]
    assert direct["errors"] == 1  # QB's ModelBusy is recorded, the run goes on
    assert direct["contains"] == pytest.approx(2 / 3)  # QA and QC of 3 answerable
    assert direct["citation_validity"] == 1.0
    assert direct["cited_share"] == pytest.approx(1 / 3)
    assert (direct["abstain_precision"], direct["abstain_recall"]) == (1.0, 1.0)
    sc = result.answers["self_consistency"]
    assert (sc["abstain_precision"], sc["abstain_recall"]) == (None, 0.0)
    assert sc["calls"] == pytest.approx((3 + 1 + 1 + 1) / 4)
    assert result.questions[1].answers["direct"].error == "model_busy: queue full"

    assert len(steps) == planned_calls(QUESTIONS, options) == 2 * 2 + 4 * 2
    metrics = result.metrics()
    assert metrics["dense.hit@2"] == 1.0
    assert metrics["direct.errors"] == 1
    assert set(options.metric_names()) <= set(metrics)


def test_skip_answers_makes_no_model_calls() -> None:
    backend = fake()
    result = evaluate(backend, QUESTIONS, EvalOptions(collection="kb", skip_answers=True))
    assert not [c for c in backend.calls if c[0] == "ask"]
    assert result.answers == {}
    assert set(result.retrieval) == {"dense", "keyword", "hybrid"}
    assert result.retrieval["hybrid"]["hit@5"] == 0.0  # the fake finds nothing in hybrid


def test_errors_other_than_model_failures_stop_the_run() -> None:
    backend = fake()
    backend.answers[("direct", "QA")] = CollectionNotFound("collection 'kb' does not exist")
    with pytest.raises(CollectionNotFound):
        evaluate(backend, QUESTIONS, EvalOptions(collection="kb", modes=("dense",)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modes": ("dense", "semantic")}, "modes must be among dense, keyword, hybrid"),
        ({"modes": ()}, "modes must be among"),
        ({"strategies": ("direct", "tree")}, "strategies must be among direct, cot"),
        ({"answer_mode": "fuzzy"}, "answer mode must be one of"),
        ({"k": 0}, "k must be at least 1"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        EvalOptions(collection="kb", **kwargs)


def test_ingest_refuses_jobs_that_did_not_fully_succeed(tmp_path: Path) -> None:
    ok = {"id": "j1", "status": "succeeded", "progress": {"documents_failed": 0}}
    assert ingest(FakeBackend(jobs=[ok]), "kb", [tmp_path]) == [ok]
    partial = {"id": "j2", "status": "succeeded", "progress": {"documents_failed": 1},
               "error": "bad.pdf: encrypted"}  # fmt: skip
    with pytest.raises(RagError, match=r"ingest job j2 succeeded \(1 document\(s\) failed\)"):
        ingest(FakeBackend(jobs=[ok, partial]), "kb", [tmp_path])
    failed = {"id": "j3", "status": "failed", "progress": {}, "error": "nothing readable"}
    with pytest.raises(RagError, match=r"j3 failed.*nothing readable"):
        ingest(FakeBackend(jobs=[failed]), "kb", [tmp_path])


def test_the_json_report_has_aggregates_and_every_questions_rows(tmp_path: Path) -> None:
    options = EvalOptions(collection="kb", modes=("dense",), k=2)
    result = evaluate(fake(), QUESTIONS, options)
    path = tmp_path / "runs" / "r.json"
    write_json(to_json(result, dataset="set.jsonl"), path)
    data = json.loads(path.read_text())

    assert data["options"]["k"] == 2 and data["options"]["retrieval_top_k"] == 10
    assert data["retrieval"]["dense"]["hit@2"] == 1.0
    assert data["metrics"]["direct.contains"] == pytest.approx(2 / 3)
    rows = {row["id"]: row for row in data["questions"]}
    assert rows["b"]["retrieval"]["dense"]["label_ranks"] == [3, 2]
    assert rows["b"]["retrieval"]["dense"]["top"] == [["x.md", None], ["c.md", None]]
    assert rows["c"]["retrieval"] == {}  # no labels: not scored for retrieval
    assert rows["a"]["answers"]["direct"]["answer"] == "It is alpha [1]."
    assert rows["b"]["answers"]["direct"]["error"] == "model_busy: queue full"
    assert rows["d"]["kind"] == "unanswerable"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


# -- the HTTP backend on a mock transport --------------------------------------


def test_http_backend_sends_the_api_bodies_with_the_bearer_key(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.raw_path.decode()
        if path == "/v1/retrieve":
            return httpx.Response(200, json={"results": [hit("a.md")], "timings": {}})
        if path == "/v1/query":
            return httpx.Response(200, json=answer("alpha"))
        if path == "/v1/collections/my%20kb/documents":
            return httpx.Response(202, json={"job_id": "job_1", "documents": []})
        if path == "/v1/jobs/job_1":
            done = sum(r.url.raw_path == request.url.raw_path for r in seen) > 1
            status = "succeeded" if done else "running"
            return httpx.Response(200, json={"id": "job_1", "status": status, "progress": {}})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    doc = tmp_path / "a.md"
    doc.write_text("# A\n\nalpha\n")
    (tmp_path / "skip.png").write_bytes(b"\x89PNG")
    backend = HttpBackend(
        "http://rag.test", api_key="s3cret", transport=httpx.MockTransport(handle), poll_s=0
    )
    with backend:
        found = backend.retrieve("kb", "alpha?", top_k=10, mode="dense")
        said = backend.ask("kb", "alpha?", top_k=None, mode=None, strategy="cot", samples=None)
        jobs = backend.ingest("my kb", [tmp_path])
    assert found["results"][0]["source"] == "a.md"
    assert said["answer"] == "alpha"
    assert [j["status"] for j in jobs] == ["succeeded"]
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in seen)
    assert json.loads(seen[0].content) == {
        "collection": "kb", "query": "alpha?", "top_k": 10, "mode": "dense"
    }  # fmt: skip
    assert json.loads(seen[1].content) == {
        "collection": "kb", "question": "alpha?", "strategy": "cot"
    }  # fmt: skip
    upload = seen[2].content
    assert b'name="files"; filename="a.md"' in upload and b"skip.png" not in upload


def test_http_backend_raises_the_services_errors() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/retrieve":
            body = {"error": {"code": "collection_not_found", "message": "no collection 'kb'"}}
            return httpx.Response(404, json=body)
        raise httpx.ConnectError("connection refused")

    with HttpBackend("http://rag.test", transport=httpx.MockTransport(handle)) as backend:
        with pytest.raises(CollectionNotFound, match="no collection 'kb'"):
            backend.retrieve("kb", "q", top_k=10, mode="dense")
        with pytest.raises(ServiceUnavailable, match="cannot reach"):
            backend.ask("kb", "q", top_k=None, mode=None, strategy="direct", samples=None)


# -- in process, for real ------------------------------------------------------


def test_in_process_backend_ingests_and_finds_every_designed_answer_first(
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
    corpus: Path,
    questions_file: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", ingest=IngestSettings(poll_interval_s=0.05))
    questions = load_dataset(questions_file)
    with InProcessBackend(settings, embedder=embedder, ingesting=True) as backend:
        jobs = ingest(backend, "island", [corpus])
        result = evaluate(backend, questions, EvalOptions(collection="island", skip_answers=True))

    assert jobs[0]["progress"]["documents_done"] == 4
    for mode in ("dense", "keyword", "hybrid"):
        assert result.retrieval[mode]["questions"] == 5  # the unanswerable one is not scored
        assert result.retrieval[mode]["hit@5"] == 1.0, mode
        assert result.retrieval[mode]["recall@5"] == 1.0, mode
    museum = next(r for r in result.questions if r.question.id == "museum")
    assert museum.retrieval["hybrid"].top[0] == ("guide.pdf", 2)


def test_write_json_reports_an_unwritable_path(tmp_path: Path) -> None:
    blocker = write_jsonl(tmp_path / "file", ["x"])
    with pytest.raises(InvalidRequest, match="cannot write"):
        write_json({}, blocker / "r.json")
