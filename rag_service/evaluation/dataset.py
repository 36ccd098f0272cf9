"""Evaluation sets: one JSON object per line, checked before anything runs.

    {"id": "q1", "question": "Who keeps the lighthouse?", "answers": ["Marta Quill"],
     "relevant": [{"source": "lighthouse.md"}, {"source": "guide.pdf", "page": 2}],
     "kind": "fact"}

- ``id`` (optional, text or integer): names the question in reports and in
  ``--ids`` files; defaults to ``line-<n>``; must be unique.
- ``question``: the text sent to the service.
- ``answers``: strings a correct answer contains (any one suffices); at least
  one for ``fact`` and ``howto``, none for ``unanswerable``.
- ``relevant``: labels of the chunks that hold the answer: a file name
  (``source``, compared by base name) and, optionally, a 1-based ``page``.
  Empty for ``unanswerable``; may be empty for an answerable question, which
  then counts for answers but not for retrieval.
- ``kind``: ``fact``, ``howto`` or ``unanswerable``.
- ``meta`` (optional object): free notes, carried into the report untouched.

Blank lines are skipped.  Any other problem stops the load with the file name
and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from rag_service.errors import InvalidRequest

Kind = Literal["fact", "howto", "unanswerable"]


class DatasetError(InvalidRequest):
    """An evaluation set or ``--ids`` file cannot be read or has a bad line."""

    code = "invalid_dataset"


def basename(source: str) -> str:
    """The file name of a source, whichever separator the path used."""
    return PurePosixPath(source.replace("\\", "/")).name


@dataclass(frozen=True)
class Label:
    """Where an answer lives: a file (by base name) and optionally a page."""

    source: str
    page: int | None = None


@dataclass(frozen=True)
class Question:
    """One checked line of an evaluation set."""

    id: str
    question: str
    answers: tuple[str, ...]
    #: Distinct labels, in the order the line gave them.
    relevant: tuple[Label, ...]
    kind: Kind
    line: int = 0
    meta: tuple[tuple[str, Any], ...] = ()

    @property
    def answerable(self) -> bool:
        return self.kind != "unanswerable"


class _LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1)
    page: StrictInt | None = Field(None, ge=1)


class _LineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | StrictInt | None = None
    question: str
    answers: list[str] = Field(default_factory=list)
    relevant: list[_LabelIn] = Field(default_factory=list)
    kind: Kind
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("question")
    @classmethod
    def _question_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("answers")
    @classmethod
    def _answer_texts(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("answers must not be empty strings")
        return values


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(parts)


def _question(raw: str, line: int) -> Question:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        parsed = _LineIn.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_explain(exc)) from exc
    if parsed.kind == "unanswerable":
        if parsed.answers:
            raise ValueError('an "unanswerable" question lists no answers')
        if parsed.relevant:
            raise ValueError('an "unanswerable" question lists no relevant labels')
    elif not parsed.answers:
        raise ValueError(f'a "{parsed.kind}" question needs at least one expected answer')
    labels = dict.fromkeys(Label(basename(r.source), r.page) for r in parsed.relevant)
    return Question(
        id=f"line-{line}" if parsed.id is None else str(parsed.id),
        question=parsed.question,
        answers=tuple(parsed.answers),
        relevant=tuple(labels),
        kind=parsed.kind,
        line=line,
        meta=tuple(parsed.meta.items()),
    )


def parse_lines(lines: Iterable[str], *, name: str = "dataset") -> list[Question]:
    """Questions from JSONL text; ``name`` is what error messages call the file."""
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            question = _question(raw, number)
        except ValueError as exc:
            raise DatasetError(f"{name} line {number}: {exc}") from exc
        if question.id in seen:
            raise DatasetError(
                f"{name} line {number}: id {question.id!r} is already used on line "
                f"{seen[question.id]}"
            )
        seen[question.id] = number
        questions.append(question)
    if not questions:
        raise DatasetError(f"{name} has no questions")
    return questions


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}") from exc


def load_dataset(path: Path) -> list[Question]:
    """The questions of a JSONL file, checked line by line."""
    return parse_lines(_read(path), name=str(path))


def load_ids(path: Path) -> list[str]:
    """Question ids from a file: one per line; blank lines and ``#`` comments skipped."""
    ids = [line.strip() for line in _read(path)]
    chosen = [i for i in ids if i and not i.startswith("#")]
    if not chosen:
        raise DatasetError(f"{path} lists no question ids")
    return chosen


def select(questions: Sequence[Question], ids: Sequence[str]) -> list[Question]:
    """The questions named by ``ids``, in the dataset's order; unknown ids are an error."""
    wanted = set(ids)
    known = {q.id for q in questions}
    missing = [i for i in dict.fromkeys(ids) if i not in known]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetError(f"unknown question id(s): {shown}{more}")
    return [q for q in questions if q.id in wanted]
