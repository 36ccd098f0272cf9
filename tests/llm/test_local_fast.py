"""The local model's speed settings, weight conversion, warm-up and prompt-prefix reuse.

All on the real SmolLM2-135M-Instruct GGUF except the conversion-failure
tests, which replace llama.cpp's quantizer (the seam ``resolve_weights``
takes) to fail in ways llama.cpp rarely does.  Nothing here is timed: reuse
is read from the number of prompt tokens llama.cpp was handed to evaluate.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from fastapi.testclient import TestClient

from rag_service.api.app import create_app
from rag_service.config import LLMSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelUnavailable
from rag_service.llm.base import ChatMessage
from rag_service.llm.local import LocalChatModel
from rag_service.llm.weights import cached_path, cpu_flags, resolve_weights
from rag_service.prompting import ContextSource, build_messages
from rag_service.storage.records import StoredChunk

PAGES = (
    "APT is the Advanced Package Tool. The apt command installs, upgrades and removes "
    "packages; apt update refreshes the package lists from the archive.",
    "The /etc/apt/sources.list file names the archive mirrors. Each line gives the "
    "archive type, the URL, the suite such as stable, and the components main and contrib.",
    "dpkg is the low-level tool under APT. dpkg -i installs a local .deb file and dpkg -l "
    "lists installed packages with their versions.",
)


def sources(*pages: int) -> list[ContextSource]:
    """Numbered sources as the query service builds them, from ``PAGES``."""
    made = []
    for n, page in enumerate(pages, start=1):
        text = PAGES[page]
        chunk = StoredChunk(page, "doc", "debian-reference.pdf", page, page + 1, (), 0, 1, text)
        made.append(ContextSource(n, chunk, 1.0, text))
    return made


@pytest.fixture
def fast_local(local_settings: LLMSettings, tmp_path: Path) -> Iterator[LocalChatModel]:
    """A local model on this machine's default speed settings, weights cached under tmp_path."""
    model = LocalChatModel(local_settings.model_copy(update={"weights_cache_dir": str(tmp_path)}))
    yield model
    model.close()


# -- settings reach llama.cpp ----------------------------------------------------


def test_speed_settings_reach_llama_cpp(local_settings: LLMSettings) -> None:
    settings = local_settings.model_copy(
        update={
            "threads": 1,
            "threads_batch": 2,
            "batch_size": 256,
            "ubatch_size": 128,
            "flash_attn": False,
            "weights": "file",
        }
    )
    model = LocalChatModel(settings)
    try:
        params = model._llama.context_params
        assert (params.n_threads, params.n_threads_batch) == (1, 2)
        assert (params.n_batch, params.n_ubatch) == (256, 128)
        assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        assert model._llama.model_path == local_settings.model_path
        assert model.weights == "file"
    finally:
        model.close()


def test_defaults_run_converted_16_bit_weights_with_fused_attention(
    fast_local: LocalChatModel, local_settings: LLMSettings, tmp_path: Path
) -> None:
    expected = "bf16" if cpu_flags().get("AVX512_BF16") else "f16"
    assert fast_local.weights == expected
    source = Path(local_settings.model_path)
    assert fast_local._llama.model_path == str(cached_path(source, expected, tmp_path))
    params = fast_local._llama.context_params
    assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert (params.n_batch, params.n_ubatch) == (512, 512)
    # The converted model still knows what the shipped one knows.
    answer = fast_local.complete(
        [ChatMessage("user", "What is the capital of France?")], max_tokens=16
    )
    assert "Paris" in answer.text


def test_ubatch_is_capped_at_the_batch_size(local_settings: LLMSettings) -> None:
    settings = local_settings.model_copy(
        update={"batch_size": 64, "ubatch_size": 512, "weights": "file"}
    )
    model = LocalChatModel(settings)
    try:
        assert model._llama.context_params.n_ubatch == 64
    finally:
        model.close()


# -- the prompt prefix stays in the KV cache --------------------------------------


def test_second_question_evaluates_only_what_follows_the_shared_prefix(
    fast_local: LocalChatModel,
) -> None:
    first = build_messages("What does apt update do?", sources(0, 2))
    second = build_messages("Which file names the mirrors?", sources(1))
    fast_local.complete(first, max_tokens=16)
    assert fast_local.last_prompt_evaluated == fast_local.prompt_tokens(first)

    answer = fast_local.complete(second, max_tokens=16)
    total = fast_local.prompt_tokens(second)
    # The system prompt and the sources' opening (over 100 tokens) came from the cache.
    assert 0 < fast_local.last_prompt_evaluated <= total - 100

    # Reuse does not change the answer: the same prompt from an empty cache.
    fast_local._llama.reset()
    fresh = fast_local.complete(second, max_tokens=16)
    assert fast_local.last_prompt_evaluated == total
    assert fresh.text == answer.text


def test_warm_keeps_exactly_the_shared_prefix(fast_local: LocalChatModel) -> None:
    probes = [build_messages("What?", []), build_messages("Why?", sources(2))]
    prefix = fast_local.warm(probes)
    assert prefix > 100
    assert fast_local._llama.n_tokens == prefix

    question = build_messages("How do I list installed packages?", sources(2, 0))
    fast_local.complete(question, max_tokens=8)
    assert fast_local.last_prompt_evaluated == fast_local.prompt_tokens(question) - prefix


def test_warm_with_nothing_shared_leaves_the_cache_empty(fast_local: LocalChatModel) -> None:
    prefix = fast_local.warm([[ChatMessage("user", "a")], [ChatMessage("system", "b")]])
    assert fast_local._llama.n_tokens == prefix


# -- warm-up happens before the service says ready --------------------------------


def test_readyz_says_loading_until_the_model_is_warm(
    settings: Settings,
    embedder: SentenceTransformerEmbedder,
    local_settings: LLMSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings.model_copy(
        update={
            "llm": local_settings,
            "ingest": settings.ingest.model_copy(update={"worker_threads": 0}),
        }
    )
    entered, release = threading.Event(), threading.Event()
    warmed: list[int] = []
    real_warm = LocalChatModel.warm

    def gated_warm(self: LocalChatModel, prompts: list[list[ChatMessage]]) -> int:
        entered.set()
        assert release.wait(120), "test never released the warm-up"
        warmed.append(real_warm(self, prompts))
        return warmed[-1]

    monkeypatch.setattr(LocalChatModel, "warm", gated_warm)
    with TestClient(create_app(settings, embedder=embedder)) as client:
        assert entered.wait(120), "the model was never warmed"
        during = client.get("/readyz")
        assert during.status_code == 503
        assert during.json()["model"] == "loading"

        release.set()
        client.app.state.model_loader.join()  # type: ignore[attr-defined]
        after = client.get("/readyz")
        assert after.status_code == 200, after.json()
        assert after.json()["model"] == "loaded"

        # The warmed prefix is what a real question prompt starts with.
        model = client.app.state.runtime.chat_model()  # type: ignore[attr-defined]
        assert isinstance(model, LocalChatModel)
        assert warmed and warmed[0] > 100
        question = build_messages("What does dpkg -i do?", sources(2))
        model.complete(question, max_tokens=8)
        assert model.last_prompt_evaluated == model.prompt_tokens(question) - warmed[0]


# -- converted weights: cached, atomic, clear failures -----------------------------


def fake_gguf(tmp_path: Path) -> Path:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF fake weights")
    return source


def test_conversion_is_stored_once_and_reused(tmp_path: Path) -> None:
    source = fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    settings = LLMSettings(model_path=str(source), weights="f16", weights_cache_dir=str(cache))
    calls: list[tuple[Path, str]] = []
    target = cached_path(source, "f16", cache)

    def quantize(src: Path, dst: Path, ftype: str, threads: int) -> int:
        calls.append((dst, ftype))
        final = cached_path(src, "f16", cache)
        assert not final.exists(), "the final name must appear only when complete"
        dst.write_bytes(b"converted")
        return 0

    path, weights = resolve_weights(settings, source, quantize=quantize)
    assert (path, weights) == (target, "f16")
    assert path.read_bytes() == b"converted"
    assert calls[0][1] == "LLAMA_FTYPE_MOSTLY_F16"
    # Written under a temporary name, then renamed into place.
    assert calls[0][0] != path and calls[0][0].parent == path.parent
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["source"] == str(source.resolve())
    assert record["weights"] == "f16"
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.stem + ".json"])

    again, _ = resolve_weights(settings, source, quantize=quantize)
    assert again == path
    assert len(calls) == 1

    # A changed source is a different model: converted anew, under another name.
    source.write_bytes(b"GGUF other weights, longer")
    changed, _ = resolve_weights(settings, source, quantize=quantize)
    assert changed != path
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing_and_says_what_to_do(tmp_path: Path) -> None:
    source = fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    settings = LLMSettings(model_path=str(source), weights="bf16", weights_cache_dir=str(cache))

    def half_written(src: Path, dst: Path, ftype: str, threads: int) -> int:
        dst.write_bytes(b"half")
        return 1

    with pytest.raises(ModelUnavailable, match=r"status 1.*RAG_LLM__WEIGHTS=file"):
        resolve_weights(settings, source, quantize=half_written)
    assert list(cache.iterdir()) == []

    def disk_full(src: Path, dst: Path, ftype: str, threads: int) -> int:
        dst.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ModelUnavailable, match=r"WEIGHTS_CACHE_DIR.*No space left.*WEIGHTS=file"):
        resolve_weights(settings, source, quantize=disk_full)
    assert list(cache.iterdir()) == []


def test_unwritable_cache_is_a_clear_error(tmp_path: Path) -> None:
    source = fake_gguf(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = LLMSettings(model_path=str(source), weights="f16", weights_cache_dir=str(blocker))
    with pytest.raises(ModelUnavailable, match="RAG_LLM__WEIGHTS_CACHE_DIR"):
        resolve_weights(settings, source, quantize=lambda *_: 0)


def test_auto_falls_back_to_the_file_when_conversion_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = fake_gguf(tmp_path)
    settings = LLMSettings(model_path=str(source), weights_cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="rag_service.llm.weights"):
        path, weights = resolve_weights(settings, source, quantize=lambda *_: 1)
    assert (path, weights) == (source, "file")
    assert "weights not converted" in caplog.text


def test_real_conversion_is_reused_by_the_next_start(
    local_settings: LLMSettings, tmp_path: Path
) -> None:
    settings = local_settings.model_copy(
        update={"weights": "q8_0", "weights_cache_dir": str(tmp_path)}
    )
    first = LocalChatModel(settings)
    first.close()
    converted = cached_path(Path(local_settings.model_path), "q8_0", tmp_path)
    stamp = converted.stat().st_mtime_ns
    second = LocalChatModel(settings)
    try:
        assert second._llama.model_path == str(converted)
        assert converted.stat().st_mtime_ns == stamp
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        second.close()


def test_a_gguf_that_cannot_be_converted_is_unavailable(tmp_path: Path) -> None:
    source = fake_gguf(tmp_path)
    settings = LLMSettings(model_path=str(source), weights="f16", weights_cache_dir=str(tmp_path))
    with pytest.raises(ModelUnavailable, match="could not convert"):
        LocalChatModel(settings)
