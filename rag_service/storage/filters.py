"""Per-request chunk filters and the SQL that applies them.

One SQL predicate serves every retrieval mode: keyword search adds it to its
FTS5 query, dense search uses it to check FAISS candidates and, when the
filter is selective, to list the chunk ids to score exactly.  Keeping a
single implementation means the modes can never disagree on what a filter
lets through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A metadata value a filter can compare with: JSON scalars only.
MetadataScalar = str | int | float | bool | None
#: Equality with one scalar, or membership in a list of them.
MetadataCondition = MetadataScalar | list[MetadataScalar] | tuple[MetadataScalar, ...]

#: File-type words and the MIME type the loaders record for them.
FILE_TYPE_ALIASES: dict[str, str] = {
    "pdf": "application/pdf",
    "txt": "text/plain",
    "text": "text/plain",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "html": "text/html",
    "htm": "text/html",
    "xhtml": "text/html",
}


@dataclass(frozen=True)
class ChunkFilter:
    """Which chunks a search may return; ``None`` fields constrain nothing.

    Within a field the values are alternatives (any of them matches); the
    fields are combined with AND.  Page bounds are inclusive and only chunks
    that have a page (PDFs) can satisfy them.  ``metadata`` compares the
    top-level keys of the JSON object attached to a document at upload: a
    scalar must be equal (type included: ``"1"`` is not ``1``), a list means
    any of its scalars.
    """

    document_ids: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    file_types: tuple[str, ...] | None = None
    page_from: int | None = None
    page_to: int | None = None
    metadata: Mapping[str, MetadataCondition] | None = field(default=None)

    @property
    def is_empty(self) -> bool:
        """True when the filter lets every chunk through."""
        return (
            self.document_ids is None
            and self.sources is None
            and self.file_types is None
            and self.page_from is None
            and self.page_to is None
            and not self.metadata
        )


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _file_type_clause(file_types: Sequence[str]) -> tuple[str, list[Any]]:
    """Match a MIME type exactly, or a short name by MIME type or file extension."""
    mimes: list[str] = []
    suffixes: list[str] = []
    for raw in file_types:
        value = raw.strip().lower()
        if "/" in value:
            mimes.append(value.split(";")[0].strip())
            continue
        ext = value.lstrip(".")
        suffixes.append("." + ext)
        if ext in FILE_TYPE_ALIASES:
            mimes.append(FILE_TYPE_ALIASES[ext])
    parts: list[str] = []
    params: list[Any] = []
    if mimes:
        parts.append(f"lower(d.content_type) IN ({_marks(len(mimes))})")
        params.extend(mimes)
    for suffix in suffixes:
        # substr instead of LIKE: file names may hold '%' or '_'.
        parts.append("lower(substr(d.source, -?)) = ?")
        params.extend([len(suffix), suffix])
    if not parts:  # no type named: nothing can match
        return "0", []
    return "(" + " OR ".join(parts) + ")", params


def _metadata_clause(key: str, condition: MetadataCondition) -> tuple[str, list[Any]]:
    """One metadata key compared through ``json_each``, so the JSON type counts."""
    values: Sequence[MetadataScalar] = (
        list(condition) if isinstance(condition, list | tuple) else [condition]
    )
    alternatives: list[str] = []
    params: list[Any] = [key]
    for value in values:
        if value is None:
            alternatives.append("m.type = 'null'")
        elif isinstance(value, bool):
            alternatives.append(f"m.type = '{'true' if value else 'false'}'")
        elif isinstance(value, int | float):
            alternatives.append("(m.type IN ('integer', 'real') AND m.value = ?)")
            params.append(value)
        else:
            alternatives.append("(m.type = 'text' AND m.value = ?)")
            params.append(str(value))
    if not alternatives:  # an empty list matches nothing
        alternatives.append("0")
    sql = (
        "EXISTS (SELECT 1 FROM json_each(d.metadata) AS m WHERE m.key = ? AND ("
        + " OR ".join(alternatives)
        + "))"
    )
    return sql, params


def filter_sql(flt: ChunkFilter | None) -> tuple[str, list[Any]]:
    """``AND ...`` conditions on ``chunks c`` joined with ``documents d``, and their parameters.

    Empty when the filter constrains nothing, so it can always be appended
    to a ``WHERE``.
    """
    if flt is None or flt.is_empty:
        return "", []
    clauses: list[str] = []
    params: list[Any] = []
    if flt.document_ids is not None:
        clauses.append(f"c.document_id IN ({_marks(len(flt.document_ids))})")
        params.extend(flt.document_ids)
    if flt.sources is not None:
        clauses.append(f"d.source IN ({_marks(len(flt.sources))})")
        params.extend(flt.sources)
    if flt.file_types is not None:
        sql, more = _file_type_clause(flt.file_types)
        clauses.append(sql)
        params.extend(more)
    if flt.page_from is not None:
        clauses.append("c.page >= ?")
        params.append(flt.page_from)
    if flt.page_to is not None:
        clauses.append("c.page <= ?")
        params.append(flt.page_to)
    for key, condition in (flt.metadata or {}).items():
        sql, more = _metadata_clause(key, condition)
        clauses.append(sql)
        params.extend(more)
    return "".join(f" AND {clause}" for clause in clauses), params
