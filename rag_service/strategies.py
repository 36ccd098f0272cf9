"""The prompting strategies of the "State of GPT" talk, over one set of numbered sources.

- ``direct``: one call, the answer with its citations.
- ``cot``: the model reasons step by step, then writes a marked final answer;
  only the final answer is the answer, the reasoning is returned apart.
- ``self_consistency``: several ``cot`` samples at a temperature; the final
  answers are normalised to their content words and grouped, the largest
  group wins, and its agreement ratio and the union of its citations are
  returned.
- ``reflect``: a direct draft, then the model checks each numbered sentence
  against the sources; sentences it finds unsupported (or that share too few
  words with every source when it gives no verdict) are removed.

Every call adds to one ``Cost``, which the caller reports even when a later
call fails.  All prompts share the one system prompt of ``prompting``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from rag_service.llm.base import ChatMessage, ChatModel, Completion, Usage
from rag_service.prompting import (
    NO_ANSWER,
    STOP_SEQUENCES,
    SYSTEM_PROMPT,
    ContextSource,
    build_messages,
    clean_answer,
    content_words,
    extract_citations,
    format_sources,
    is_no_answer,
    split_sentences,
)

StrategyName = Literal["direct", "cot", "self_consistency", "reflect"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)

#: Reasoning may start a paragraph with "[2] says ...", so the stop sequence
#: that ends a direct answer at a copied source block is left out here.
COT_STOPS = tuple(s for s in STOP_SEQUENCES if s != "\n\n[")

_FINAL = re.compile(r"final\s+answer\s*[:\-]", re.IGNORECASE)
_REASONING_LABEL = re.compile(r"^\s*(?:reasoning|step[- ]by[- ]step)\s*:\s*", re.IGNORECASE)
_VERDICT = re.compile(
    r"^\W*S?\s*(\d{1,3})\s*[:.)\-]\s*\**\s*(UNSUPPORTED|NOT\s+SUPPORTED|SUPPORTED)\b(.*)$",
    re.IGNORECASE | re.MULTILINE,
)

#: The vote of every answer that says the sources lack the answer.
_DECLINED = frozenset({"<no answer>"})
#: Two final answers count as the same vote when their content words overlap this much.
SAME_ANSWER_JACCARD = 0.5
#: With no verdict from the model, a sentence sharing less than this share of
#: its content words with every source is treated as unsupported.
MIN_LEXICAL_SUPPORT = 0.3


@dataclass
class Cost:
    """What answering took: model calls, tokens and time spent in the model."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)


@dataclass(frozen=True)
class Plan:
    """A checked strategy request."""

    name: StrategyName = "direct"
    samples: int = 1
    sample_temperature: float = 0.7


@dataclass(frozen=True)
class Draft:
    """A strategy's answer before its citations are checked against the sources."""

    text: str
    model: str = ""
    reasoning: str | None = None
    agreement: float | None = None
    #: Citations of the answers that voted with the winner (self_consistency).
    extra_citations: tuple[int, ...] = ()
    #: Sentences the check removed (reflect).
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    """What every strategy works from."""

    question: str
    sources: Sequence[ContextSource]
    system_prompt: str | None
    max_tokens: int
    temperature: float
    #: Earlier turns of the conversation, oldest first.
    history: Sequence[ChatMessage] = ()


@dataclass
class _Call:
    model: ChatModel
    cost: Cost
    names: list[str] = field(default_factory=list)

    def __call__(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str],
    ) -> Completion:
        start = time.perf_counter()
        try:
            done = self.model.complete(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
        finally:
            self.cost.ms = round(self.cost.ms + (time.perf_counter() - start) * 1000.0, 2)
        self.cost.calls += 1
        self.cost.prompt_tokens += done.usage.prompt_tokens
        self.cost.completion_tokens += done.usage.completion_tokens
        if done.model:
            self.names.append(done.model)
        return done

    @property
    def model_name(self) -> str:
        return self.names[-1] if self.names else self.model.name


def run(plan: Plan, model: ChatModel, ctx: Context, cost: Cost) -> Draft:
    """Answer with ``plan``'s strategy; ``cost`` grows with every call made."""
    call = _Call(model, cost)
    match plan.name:
        case "direct":
            return _direct(call, ctx)
        case "cot":
            return _cot(call, ctx, ctx.temperature)
        case "self_consistency":
            return _self_consistency(call, ctx, plan)
        case "reflect":
            return _reflect(call, ctx)


# -- direct and cot ---------------------------------------------------------------


def _direct(call: _Call, ctx: Context) -> Draft:
    done = call(
        build_messages(
            ctx.question, ctx.sources, system_prompt=ctx.system_prompt, history=ctx.history
        ),
        max_tokens=ctx.max_tokens,
        temperature=ctx.temperature,
        stop=STOP_SEQUENCES,
    )
    return Draft(done.text, call.model_name)


def cot_messages(ctx: Context) -> list[ChatMessage]:
    """The chat prompt asking for reasoning, then a marked final answer."""
    return build_messages(
        ctx.question,
        ctx.sources,
        system_prompt=ctx.system_prompt,
        history=ctx.history,
        instructions=(
            "Think step by step. First write 'Reasoning:' and, in a few short lines, "
            "note which sources bear on the question and what they say. Then write "
            "'Final answer:' and answer in a few sentences using only the sources, ending "
            f"each sentence with its source number, like [1]. If the sources do not "
            f"contain the answer, write 'Final answer: {NO_ANSWER}'"
        ),
    )


def split_final_answer(text: str) -> tuple[str | None, str]:
    """``(reasoning, final answer)`` of a step-by-step reply.

    The last "Final answer:" marker separates them; without one the whole
    reply is the answer and there is no reasoning.
    """
    markers = list(_FINAL.finditer(text))
    if not markers:
        return None, text.strip()
    last = markers[-1]
    reasoning = _REASONING_LABEL.sub("", text[: last.start()]).strip()
    return reasoning or None, text[last.end() :].strip()


def _cot(call: _Call, ctx: Context, temperature: float) -> Draft:
    done = call(
        cot_messages(ctx),
        # Room for the reasoning as well as the answer.
        max_tokens=ctx.max_tokens * 2,
        temperature=temperature,
        stop=COT_STOPS,
    )
    reasoning, answer = split_final_answer(done.text)
    return Draft(answer, call.model_name, reasoning=reasoning)


# -- self-consistency -----------------------------------------------------------------


def vote_key(answer: str) -> frozenset[str]:
    """An answer reduced to what it says: content words, citations and layout dropped.

    Every way of saying the sources lack the answer reduces to the same key.
    """
    if is_no_answer(answer):
        return _DECLINED
    return frozenset(_stem(w) for w in content_words(re.sub(r"\[[\d,;\s]+\]", " ", answer)))


def _stem(word: str) -> str:
    """Plural and third-person "s" dropped, so "costs" and "cost" vote together."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _similarity(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def vote(answers: Sequence[str]) -> tuple[list[int], int]:
    """Group answers that say the same thing; ``(largest group's indexes, its medoid)``.

    Groups are formed greedily in sample order (an answer joins the first
    group whose first member it resembles); ties go to the earlier group.
    The medoid is the member most like the others, the group's best spokesman.
    """
    keys = [vote_key(a) for a in answers]
    groups: list[list[int]] = []
    for i, key in enumerate(keys):
        for group in groups:
            if _similarity(keys[group[0]], key) >= SAME_ANSWER_JACCARD:
                group.append(i)
                break
        else:
            groups.append([i])
    winner = max(groups, key=len)
    medoid = max(winner, key=lambda i: (sum(_similarity(keys[i], keys[j]) for j in winner), -i))
    return winner, medoid


def _self_consistency(call: _Call, ctx: Context, plan: Plan) -> Draft:
    drafts = [_cot(call, ctx, plan.sample_temperature) for _ in range(plan.samples)]
    winner, medoid = vote([d.text for d in drafts])
    cited: list[int] = []
    for i in winner:
        for n in extract_citations(clean_answer(drafts[i].text), len(ctx.sources))[0]:
            if n not in cited:
                cited.append(n)
    best = drafts[medoid]
    return Draft(
        best.text,
        call.model_name,
        reasoning=best.reasoning,
        agreement=round(len(winner) / len(drafts), 4),
        extra_citations=tuple(cited),
    )


# -- reflection -------------------------------------------------------------------------


def check_messages(ctx: Context, sentences: Sequence[str]) -> list[ChatMessage]:
    """The chat prompt asking the model to judge each numbered draft sentence."""
    numbered = "\n".join(f"S{i}: {s}" for i, s in enumerate(sentences, start=1))
    user = (
        "Sources:\n<<<\n"
        f"{format_sources(ctx.sources)}"
        ">>>\n\n"
        f"Question: {ctx.question.strip()}\n\n"
        f"Draft answer, one sentence per line:\n{numbered}\n\n"
        "Check each draft sentence against the sources. For each one write a line "
        "'S<number>: SUPPORTED [source number]' if a source states it, or "
        "'S<number>: UNSUPPORTED' if no source does."
    )
    return [
        ChatMessage("system", ctx.system_prompt or SYSTEM_PROMPT),
        ChatMessage("user", user),
    ]


def parse_verdicts(text: str, count: int) -> dict[int, tuple[bool, int | None]]:
    """Sentence number -> (supported, cited source) for each verdict line found."""
    verdicts: dict[int, tuple[bool, int | None]] = {}
    for match in _VERDICT.finditer(text):
        i = int(match.group(1))
        if not 1 <= i <= count or i in verdicts:
            continue
        supported = match.group(2).upper() == "SUPPORTED"
        cited = re.search(r"\[(\d{1,3})\]", match.group(3))
        verdicts[i] = (supported, int(cited.group(1)) if cited else None)
    return verdicts


def lexical_support(sentence: str, sources: Sequence[ContextSource]) -> float:
    """The largest share of the sentence's content words found in one source."""
    words = content_words(re.sub(r"\[[\d,;\s]+\]", " ", sentence))
    if not words:
        return 1.0
    return max((len(words & content_words(s.text)) / len(words) for s in sources), default=0.0)


def _reflect(call: _Call, ctx: Context) -> Draft:
    draft = _direct(call, ctx)
    text = clean_answer(draft.text)
    sentences = split_sentences(text)
    if not sentences or is_no_answer(text):
        return draft
    done = call(
        check_messages(ctx, sentences),
        max_tokens=min(ctx.max_tokens, 16 + 12 * len(sentences)),
        temperature=0.0,
        stop=COT_STOPS,
    )
    verdicts = parse_verdicts(done.text, len(sentences))
    kept: list[str] = []
    removed: list[str] = []
    for i, sentence in enumerate(sentences, start=1):
        verdict = verdicts.get(i)
        if verdict is None:
            supported = lexical_support(sentence, ctx.sources) >= MIN_LEXICAL_SUPPORT
            cite = None
        else:
            supported, cite = verdict
        if not supported:
            removed.append(sentence)
            continue
        has_citation = bool(extract_citations(sentence, len(ctx.sources))[0])
        if cite is not None and 1 <= cite <= len(ctx.sources) and not has_citation:
            sentence = _cite(sentence, cite)
        kept.append(sentence)
    revised = " ".join(kept) if kept else NO_ANSWER
    return Draft(revised, call.model_name, unsupported=tuple(removed))


def _cite(sentence: str, n: int) -> str:
    """Put ``[n]`` before the sentence's closing punctuation."""
    stripped = sentence.rstrip()
    if stripped and stripped[-1] in ".!?":
        return f"{stripped[:-1]} [{n}]{stripped[-1]}"
    return f"{stripped} [{n}]"
