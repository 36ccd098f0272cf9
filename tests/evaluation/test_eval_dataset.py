"""Loading and checking evaluation sets: every bad line is named by its number."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_service.evaluation.dataset import (
    DatasetError,
    Label,
    load_dataset,
    load_ids,
    parse_lines,
    select,
)
from tests.evaluation.evalkit import QUESTIONS, write_jsonl

GOOD = '{"question": "Who?", "answers": ["Ann"], "relevant": [{"source": "a.md"}], "kind": "fact"}'


def test_a_good_file_loads_with_default_ids_and_distinct_basename_labels(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            GOOD,
            "",
            {
                "id": 7,
                "question": "Where?",
                "answers": ["north"],
                "relevant": [
                    {"source": "docs/g.pdf", "page": 3},
                    {"source": "g.pdf", "page": 3},
                    {"source": "g.pdf"},
                ],
                "kind": "howto",
                "meta": {"author": "me"},
            },
            {"question": "Runway?", "kind": "unanswerable"},
        ],
    )
    first, second, third = load_dataset(path)
    assert (first.id, first.line, first.answerable) == ("line-1", 1, True)
    assert second.id == "7"
    assert second.relevant == (Label("g.pdf", 3), Label("g.pdf"))
    assert dict(second.meta) == {"author": "me"}
    assert (third.id, third.line, third.answerable, third.relevant) == ("line-4", 4, False, ())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"question": "Who?", "answers": ["Ann"], "kind": "fact", "answer": "x"}', "answer"),
        ('{"answers": ["Ann"], "kind": "fact"}', "question: Field required"),
        ('{"question": "  ", "answers": ["Ann"], "kind": "fact"}', "question: Value error"),
        ('{"question": "Who?", "answers": ["Ann"], "kind": "guess"}', "kind: Input should be"),
        ('{"question": "Who?", "answers": "Ann", "kind": "fact"}', "answers: Input should be"),
        ('{"question": "Who?", "answers": [""], "kind": "fact"}', "must not be empty"),
        ('{"question": "Who?", "kind": "fact"}', "needs at least one expected answer"),
        (
            '{"question": "Who?", "answers": ["A"], "relevant": [{"page": 2}], "kind": "fact"}',
            "relevant.0.source: Field required",
        ),
        (
            '{"question": "W", "answers": ["A"], "relevant": [{"source": "a", "page": 0}], '
            '"kind": "fact"}',
            "relevant.0.page: Input should be greater than or equal to 1",
        ),
        (
            '{"question": "W", "answers": ["A"], "relevant": [{"source": "a", "page": "2"}], '
            '"kind": "fact"}',
            "relevant.0.page: Input should be a valid integer",
        ),
        ('{"question": "W", "answers": ["A"], "kind": "unanswerable"}', "lists no answers"),
        (
            '{"question": "W", "relevant": [{"source": "a"}], "kind": "unanswerable"}',
            "lists no relevant labels",
        ),
        ('{"id": true, "question": "W", "answers": ["A"], "kind": "fact"}', "id"),
    ],
)
def test_a_bad_line_is_named_with_its_number_and_reason(line: str, message: str) -> None:
    with pytest.raises(DatasetError) as caught:
        parse_lines([GOOD, "", line], name="set.jsonl")
    assert caught.value.message.startswith("set.jsonl line 3: ")
    assert message in caught.value.message


def test_duplicate_ids_name_both_lines() -> None:
    row = '{"id": "a", "question": "W", "answers": ["A"], "kind": "fact"}'
    with pytest.raises(DatasetError, match="line 3: id 'a' is already used on line 1"):
        parse_lines([row, GOOD, row])


def test_empty_missing_and_undecodable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="has no questions"):
        load_dataset(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(tmp_path / "latin1.jsonl")


def test_ids_files_select_a_subset_in_dataset_order(tmp_path: Path) -> None:
    questions = load_dataset(write_jsonl(tmp_path / "set.jsonl", QUESTIONS))
    ids = tmp_path / "ids.txt"
    ids.write_text("# the smoke slice\ncamping\n\nkeeper\n", encoding="utf-8")
    assert [q.id for q in select(questions, load_ids(ids))] == ["keeper", "camping"]

    ids.write_text("keeper\nnope\nalso-nope\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="unknown question id\\(s\\): 'nope', 'also-nope'"):
        select(questions, load_ids(ids))
    ids.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="lists no question ids"):
        load_ids(ids)
