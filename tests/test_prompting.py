"""Context packing and citation checks."""

from __future__ import annotations

from rag_service.prompting import (
    TRUNCATION_MARK,
    ContextSource,
    clean_answer,
    extract_citations,
    infer_citations,
    pack_context,
    quote_data,
    strip_invalid_citations,
)
from rag_service.storage.records import StoredChunk


def chunk(i: int, text: str, page: int | None = None) -> StoredChunk:
    return StoredChunk(i, f"doc{i}", f"file{i}.pdf", 0, page, (), 0, len(text), text)


def words(text: str) -> int:
    return len(text.split())


def test_packing_keeps_rank_order_and_drops_the_lowest_first() -> None:
    ranked = [(chunk(i, "word " * 40), 1.0 - i / 10) for i in range(5)]
    packed = pack_context(ranked, budget_tokens=130, count_tokens=words)
    assert [s.n for s in packed] == [1, 2, 3]
    assert [s.chunk.id for s in packed] == [0, 1, 2]
    assert not any(s.truncated for s in packed)


def test_an_oversized_best_chunk_is_cut_at_a_sentence_and_says_so() -> None:
    text = " ".join(f"Sentence {i} is here." for i in range(100))
    packed = pack_context([(chunk(1, text), 0.9)], budget_tokens=50, count_tokens=words)
    assert len(packed) == 1 and packed[0].truncated
    assert packed[0].text.endswith("." + TRUNCATION_MARK)
    assert words(packed[0].text) <= 50


def test_citations_valid_and_invalid_in_order_of_use() -> None:
    assert extract_citations("A [2]. B [1, 5]; C [2][7].", 3) == ([2, 1], [5, 7])
    assert strip_invalid_citations("A [2]. B [1, 5] and [7].", [5, 7]) == "A [2]. B [1] and."


def test_echoed_source_headers_become_plain_citations() -> None:
    echoed = "The answer is:\n[1] (manual.pdf, page 2)\nHold the button."
    assert clean_answer(echoed) == "The answer is:\n[1] Hold the button."


def test_inferred_citations_credit_the_source_holding_the_words() -> None:
    sources = [
        ContextSource(
            1,
            chunk(1, "Owls hunt small mammals at night."),
            0.5,
            "Owls hunt small mammals at night.",
        ),
        ContextSource(
            2, chunk(2, "Bees make honey from nectar."), 0.4, "Bees make honey from nectar."
        ),
    ]
    assert infer_citations("Bees make honey out of nectar.", sources) == [2]
    assert infer_citations("Something else entirely unrelated here.", sources) == []


def test_quote_data_neutralises_the_source_markers_only() -> None:
    text = "a >>> b <<<< c >> d <tag> e"
    quoted = quote_data(text)
    assert ">>>" not in quoted and "<<<" not in quoted
    assert quoted == "a \u203a\u203a\u203a b \u2039\u2039\u2039\u2039 c >> d <tag> e"
    assert len(quoted) == len(text)
