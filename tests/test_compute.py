"""Thread settings applied when a runtime opens, and questions batched across threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from rag_service.compute import BatchingEmbedder
from rag_service.config import ComputeSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder, Vectors
from rag_service.openmp import WAIT_DEFAULTS, set_openmp_wait_defaults
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Put torch's and FAISS's thread counts back: they are process-wide."""
    import faiss
    import torch

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(torch_before)
    faiss.omp_set_num_threads(faiss_before)


def test_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_COMPUTE__TORCH_THREADS", "2")
    monkeypatch.setenv("RAG_COMPUTE__FAISS_THREADS", "4")
    monkeypatch.setenv("RAG_COMPUTE__QUERY_BATCH", "1")

    assert Settings().compute == ComputeSettings(torch_threads=2, faiss_threads=4, query_batch=1)


@pytest.mark.parametrize(
    "bad",
    [{"torch_threads": -1}, {"faiss_threads": -2}, {"query_batch": 0}, {"torch_threads": 999}],
)
def test_out_of_range_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        ComputeSettings.model_validate(bad)


def test_opening_a_runtime_sets_torch_and_faiss_threads(
    tmp_path: Path, restore_threads: None
) -> None:
    import faiss
    import torch

    # 3: neither library's default on any machine but a 3-core one.
    settings = Settings(
        data_dir=tmp_path, compute=ComputeSettings(torch_threads=3, faiss_threads=3)
    )
    seen: dict[str, int] = {}

    with Runtime.open(settings, embedder=HashEmbedder()) as runtime:
        worker = threading.Thread(target=lambda: seen.update(torch=torch.get_num_threads()))
        worker.start()
        worker.join()
        assert torch.get_num_threads() == 3
        assert faiss.omp_get_max_threads() == 3
        assert seen == {"torch": 3}  # a new thread (a request's) starts from it too
        assert isinstance(runtime.embedder, BatchingEmbedder)


def test_batching_off_embeds_questions_side_by_side(tmp_path: Path, restore_threads: None) -> None:
    class Meeting(HashEmbedder):
        """Each question waits until the other is being embedded too."""

        both = threading.Barrier(2, timeout=30)

        def embed_query(self, text: str) -> Vectors:
            self.both.wait()
            return super().embed_query(text)

    settings = Settings(data_dir=tmp_path, compute=ComputeSettings(query_batch=1))
    with Runtime.open(settings, embedder=Meeting()) as runtime:
        results: list[Vectors] = []
        threads = [
            threading.Thread(target=lambda q=q: results.append(runtime.embedder.embed_query(q)))
            for q in ("first?", "second?")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 2  # neither waited for the other to finish (no queue)


class ThreadsSeen(HashEmbedder):
    """Records torch's thread count in the thread that embeds each text."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        import torch

        for text in texts:
            self.seen[text] = torch.get_num_threads()
        return super().embed_batch(texts)


def test_questions_and_ingest_run_torch_on_their_own_thread_counts(
    tmp_path: Path, restore_threads: None
) -> None:
    import torch  # noqa: F401 - loaded, as with the real embedder

    spy = ThreadsSeen()
    settings = Settings(
        data_dir=tmp_path, compute=ComputeSettings(torch_threads=1, ingest_torch_threads=3)
    )
    note = tmp_path / "note.txt"
    note.write_text("The boiler is serviced every spring by the caretaker.")
    with Runtime.open(settings, embedder=spy, workers=1) as runtime:
        receipt = runtime.documents.add_paths("c", [note])
        assert runtime.wait_for_job(receipt.job_id).status == "succeeded"
        asked: list[object] = []
        # a thread started after the worker set its count, as a new request thread is
        thread = threading.Thread(
            target=lambda: asked.append(runtime.query.retrieve("c", "who services the boiler?"))
        )
        thread.start()
        thread.join()
    assert asked
    chunk_counts = {n for text, n in spy.seen.items() if "caretaker" in text}
    assert chunk_counts == {3}
    assert spy.seen["who services the boiler?"] == 1


def test_a_fresh_process_gives_every_thread_the_faiss_setting(tmp_path: Path) -> None:
    # OpenMP keeps its count per thread: only the environment, set before FAISS
    # loads, reaches threads that the service did not set itself.
    script = """
import sys, threading
from pathlib import Path
from rag_service.config import ComputeSettings, Settings
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder
assert "faiss" not in sys.modules
settings = Settings(data_dir=Path(sys.argv[1]), compute=ComputeSettings(faiss_threads=3))
seen = []
def search_thread():
    import faiss
    seen.append(faiss.omp_get_max_threads())
with Runtime.open(settings, embedder=HashEmbedder()):
    thread = threading.Thread(target=search_thread)
    thread.start()
    thread.join()
print(seen[0])
"""
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "3"


class GatedEmbedder(HashEmbedder):
    """Records every batch; the first call waits until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return super().embed(texts)


def ask_in_threads(
    embedder: BatchingEmbedder, texts: Sequence[str]
) -> tuple[list[threading.Thread], dict[str, Vectors | Exception]]:
    results: dict[str, Vectors | Exception] = {}

    def ask(text: str) -> None:
        try:
            results[text] = embedder.embed_query(text)
        except Exception as exc:
            results[text] = exc

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    return threads, results


def wait_for_queue(embedder: BatchingEmbedder, count: int) -> None:
    deadline = time.monotonic() + 30
    while embedder.waiting != count:
        assert time.monotonic() < deadline, f"{embedder.waiting} queued, expected {count}"
        time.sleep(0.01)


def test_questions_asked_during_a_batch_are_embedded_together() -> None:
    inner = GatedEmbedder()
    batching = BatchingEmbedder(inner, max_batch=8)
    first, first_results = ask_in_threads(batching, ["first question"])
    assert inner.entered.wait(30)
    later = [f"question {i}" for i in range(5)]
    threads, results = ask_in_threads(batching, later)
    wait_for_queue(batching, 5)

    inner.release.set()
    for thread in first + threads:
        thread.join(30)

    assert inner.calls[0] == ["first question"]
    assert sorted(inner.calls[1]) == later  # one call for all five
    assert len(inner.calls) == 2
    plain = HashEmbedder()
    for text, vector in (results | first_results).items():
        assert isinstance(vector, np.ndarray)
        np.testing.assert_allclose(vector, plain.embed_query(text), rtol=0, atol=1e-6)
    assert (batching.batches, batching.questions) == (2, 6)


def queued_behind_a_running_batch(
    batching: BatchingEmbedder, inner: GatedEmbedder, texts: Sequence[str]
) -> dict[str, Vectors | Exception]:
    """Ask ``texts`` while a first question is being embedded, then let everything finish."""
    first, _ = ask_in_threads(batching, ["first"])
    assert inner.entered.wait(30)
    threads, results = ask_in_threads(batching, texts)
    wait_for_queue(batching, len(texts))
    inner.release.set()
    for thread in first + threads:
        thread.join(30)
    return results


def test_batches_are_cut_at_max_batch() -> None:
    inner = GatedEmbedder()
    batching = BatchingEmbedder(inner, max_batch=2)
    results = queued_behind_a_running_batch(batching, inner, ["a", "b", "c"])

    assert [len(call) for call in inner.calls] == [1, 2, 1]
    assert all(isinstance(v, np.ndarray) for v in results.values())


def test_a_failing_question_fails_alone_and_the_next_still_works() -> None:
    inner = GatedEmbedder()
    batching = BatchingEmbedder(inner, max_batch=8)
    results = queued_behind_a_running_batch(batching, inner, ["good one", "BOOM here", "good two"])

    assert isinstance(results["BOOM here"], RuntimeError)
    assert isinstance(results["good one"], np.ndarray)
    assert isinstance(results["good two"], np.ndarray)
    assert batching.embed_query("afterwards").shape == (HashEmbedder.dim,)
    assert batching.waiting == 0


class ThreadNotingEmbedder(HashEmbedder):
    """Records the thread each encode call ran on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.threads.append(threading.current_thread())
        return super().embed(texts)


def test_every_batch_runs_on_one_thread_whichever_thread_asks() -> None:
    inner = ThreadNotingEmbedder()
    batching = BatchingEmbedder(inner, max_batch=8)
    for round_ in range(5):  # short-lived asking threads, as a server's pool makes them
        threads, results = ask_in_threads(batching, [f"q{round_}-{i}" for i in range(6)])
        for thread in threads:
            thread.join(30)
        assert all(isinstance(v, np.ndarray) for v in results.values())

    assert len(inner.threads) >= 5
    assert {t.name for t in inner.threads} == {"question-embedder"}
    assert len(set(inner.threads)) == 1
    batching.close()
    assert not inner.threads[0].is_alive()


def test_a_closed_batching_embedder_refuses_questions_and_finishes_queued_ones() -> None:
    inner = GatedEmbedder()
    batching = BatchingEmbedder(inner, max_batch=8)
    first, results = ask_in_threads(batching, ["first"])
    assert inner.entered.wait(30)
    later, later_results = ask_in_threads(batching, ["queued"])
    wait_for_queue(batching, 1)
    closing = threading.Thread(target=batching.close)
    closing.start()
    inner.release.set()
    for thread in [*first, *later, closing]:
        thread.join(30)

    assert isinstance(results["first"], np.ndarray)
    assert isinstance(later_results["queued"], np.ndarray)
    with pytest.raises(RuntimeError, match="closed"):
        batching.embed_query("too late")


def test_batched_vectors_match_one_by_one_with_the_real_model(
    embedder: SentenceTransformerEmbedder,
) -> None:
    texts = [
        "How do I change the default editor?",
        "Which file holds the network interface configuration on Debian?",
        "apt pinning",
        "What does the sticky bit on /tmp do and why does it matter for shared directories?",
    ] * 3
    batching = BatchingEmbedder(embedder, max_batch=32)

    threads, results = ask_in_threads(batching, texts)
    for thread in threads:
        thread.join(60)

    assert batching.questions == len(texts)
    for text in set(texts):
        got = results[text]
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, embedder.embed_query(text), rtol=0, atol=1e-5)


ARENA_SCRIPT = """
import ctypes, os, sys, threading
from pathlib import Path
from rag_service.config import ComputeSettings, Settings
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder
compute = ComputeSettings(malloc_arenas=int(sys.argv[2]))
settings = Settings(data_dir=Path(sys.argv[1]), compute=compute)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
with Runtime.open(settings, embedder=HashEmbedder()):
    together = threading.Barrier(16)
    def request_thread():  # all alive at once, as a busy server's pool is
        together.wait()
        blocks = [libc.malloc(4096) for _ in range(64)]
        together.wait()
        for block in blocks:
            libc.free(block)
    threads = [threading.Thread(target=request_thread) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stderr.flush()
    libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.parametrize(("setting", "most"), [(2, 2), (0, None)])
def test_malloc_arenas_are_capped_for_busy_request_threads(
    tmp_path: Path, setting: int, most: int | None
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", ARENA_SCRIPT, str(tmp_path), str(setting)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    arenas = done.stderr.count("Arena ")
    if most is not None:
        assert 1 <= arenas <= most, done.stderr
    else:  # glibc's default gives busy threads arenas of their own: the growth this prevents
        assert arenas > 2, done.stderr


TRIM_SCRIPT = """
import ctypes, sys, threading, time
from rag_service.compute import start_malloc_trimmer
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
blocks = [libc.malloc(1000) for _ in range(200_000)]  # 200 MB of small blocks, touched
for block in blocks:
    ctypes.memset(block, 1, 1000)
pinned = libc.malloc(1000)  # keeps the heap's top in use, as live objects do in a server
for block in blocks:
    libc.free(block)
freed = rss_mib()
started = start_malloc_trimmer(float(sys.argv[1]), threading.Event())
time.sleep(1.5)
print(started is not None, round(freed), round(rss_mib()))
"""


@pytest.mark.parametrize("interval", [0.2, 0.0])
def test_freed_heap_goes_back_to_the_system_when_trimming(interval: float) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRIM_SCRIPT, str(interval)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    started, freed, after = done.stdout.split()
    if interval:
        assert started == "True"
        assert int(after) < int(freed) - 150, done.stdout  # the 200 MB freed left the process
    else:
        assert started == "False"
        assert int(after) > int(freed) - 20, done.stdout  # glibc alone keeps it


def test_the_trimmer_runs_with_the_runtime_and_stops_with_it(tmp_path: Path) -> None:
    def trimmers() -> int:
        return sum(t.name == "malloc-trim" and t.is_alive() for t in threading.enumerate())

    before = trimmers()
    settings = Settings(data_dir=tmp_path, compute=ComputeSettings(malloc_trim_seconds=0.05))
    with Runtime.open(settings, embedder=HashEmbedder()) as runtime:
        assert trimmers() == before + 1
        assert runtime.workers_alive == 0  # not counted as an ingestion worker
    assert trimmers() == before


def _openmp_environment(code: str, **env: str) -> str:
    """libgomp's own report of its settings (``OMP_DISPLAY_ENV``) in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k not in WAIT_DEFAULTS}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **env, "OMP_DISPLAY_ENV": "verbose"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_importing_the_service_sets_how_openmp_threads_wait() -> None:
    report = _openmp_environment("import rag_service, torch, llama_cpp")
    # One OpenMP runtime for torch and llama.cpp, and it took the service's defaults.
    assert report.count("OPENMP DISPLAY ENVIRONMENT BEGIN") == 1
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in report
    assert "GOMP_SPINCOUNT = '300000'" in report


def test_openmp_wait_settings_of_the_user_are_kept() -> None:
    report = _openmp_environment("import rag_service, torch", OMP_WAIT_POLICY="passive")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in report
    assert "GOMP_SPINCOUNT = '0'" in report  # libgomp's own value for passive, not ours

    environ = {"GOMP_SPINCOUNT": "1000"}
    assert not set_openmp_wait_defaults(environ)
    assert environ == {"GOMP_SPINCOUNT": "1000"}
    environ = {}
    assert set_openmp_wait_defaults(environ)
    assert environ == WAIT_DEFAULTS
