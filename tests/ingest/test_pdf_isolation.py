"""The extraction child: reused, capped in memory and time, and survivable when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.loaders import load_document
from ingest.loaders.isolation import ExtractionSandbox
from rag_service.config import IngestSettings
from rag_service.errors import CorruptDocument, DocumentTooLarge, EncryptedDocument

TARGETS = "tests.ingest.isolation_targets"
DEBIAN_REFERENCE = Path("/usr/share/debian-reference/debian-reference.en.pdf")


@pytest.fixture
def sandbox() -> Iterator[ExtractionSandbox]:
    box = ExtractionSandbox(max_documents=50)
    yield box
    box.close()


def run(box: ExtractionSandbox, target: str, data: bytes = b"", **settings: Any) -> dict[str, Any]:
    return box.run(f"{TARGETS}:{target}", data, "x.pdf", IngestSettings(**settings))


def test_a_child_is_reused_and_never_imports_torch(sandbox: ExtractionSandbox) -> None:
    first = run(sandbox, "echo", b"12345", max_extract_memory_mb=512)
    second = run(sandbox, "echo", b"1", max_extract_memory_mb=512)
    assert first == {
        "size": 5,
        "name": "x.pdf",
        "pid": first["pid"],
        "torch": False,
        "memory_mb": 512,
    }
    assert second["pid"] == first["pid"]
    assert sandbox.started == 1


def test_a_child_is_replaced_after_max_documents() -> None:
    box = ExtractionSandbox(max_documents=2)
    try:
        pids = [run(box, "echo")["pid"] for _ in range(3)]
    finally:
        box.close()
    assert pids[0] == pids[1] != pids[2]
    assert box.started == 2


def test_a_hung_child_is_killed_at_the_time_budget(sandbox: ExtractionSandbox) -> None:
    before = run(sandbox, "echo")["pid"]
    with pytest.raises(DocumentTooLarge, match=r"took longer than 0\.5 s and was stopped"):
        run(sandbox, "hang", max_seconds_per_document=0.5)
    after = run(sandbox, "echo")["pid"]
    assert after != before
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(before, 0)


def test_memory_over_the_cap_fails_the_document(sandbox: ExtractionSandbox) -> None:
    with pytest.raises(DocumentTooLarge, match="exceeded the 300 MiB memory limit"):
        run(sandbox, "allocate", str(1 << 30).encode(), max_extract_memory_mb=300)
    # under the cap the same target works: it was the cap, not the code
    assert run(sandbox, "allocate", str(1 << 20).encode(), max_extract_memory_mb=300) == {
        "allocated": 1 << 20
    }


def test_a_child_that_exits_fails_the_document_and_the_next_one_works(
    sandbox: ExtractionSandbox,
) -> None:
    with pytest.raises(CorruptDocument, match=r"x\.pdf stopped unexpectedly \(exit status 3\)"):
        run(sandbox, "exit_now")
    assert run(sandbox, "echo")["size"] == 0


def test_a_child_killed_by_a_signal_fails_the_document(sandbox: ExtractionSandbox) -> None:
    with pytest.raises(CorruptDocument, match=r"was killed \(SIGKILL\)"):
        run(sandbox, "kill_self")
    assert run(sandbox, "echo")["size"] == 0
    assert sandbox.started == 2


def test_a_crash_far_from_the_memory_cap_is_not_called_a_memory_problem(
    sandbox: ExtractionSandbox,
) -> None:
    with pytest.raises(CorruptDocument, match=r"x\.pdf crashed \(SIGABRT\); the file may be"):
        run(sandbox, "abort")
    assert run(sandbox, "echo")["size"] == 0


def test_document_errors_cross_with_their_type_and_bugs_do_not_pass_as_bad_input(
    sandbox: ExtractionSandbox,
) -> None:
    with pytest.raises(EncryptedDocument, match=r"^x\.pdf is password-protected$"):
        run(sandbox, "refuse")
    with pytest.raises(RuntimeError, match="ValueError: a bug in the loader"):
        run(sandbox, "bug")
    assert sandbox.started == 1  # neither needed a new child


def test_threads_get_children_of_their_own(sandbox: ExtractionSandbox) -> None:
    pids: list[int] = []
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        pids.append(run(sandbox, "nap", b"x" * 1_000_000)["pid"])

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(pids)) == 2  # side by side, not queued behind one child
    assert sandbox.started == 2


def test_the_real_pdf_reads_the_same_in_the_child_and_in_process() -> None:
    assert DEBIAN_REFERENCE.exists(), "apt-get install debian-reference-en (or run .ci/run)"
    data = DEBIAN_REFERENCE.read_bytes()
    isolated = load_document(data, "ref.pdf", IngestSettings(pdf_isolation="process"))
    in_process = load_document(data, "ref.pdf", IngestSettings(pdf_isolation="none"))
    assert isolated == in_process
    assert isolated.pages == 261 and len(isolated.sections) > 200


def test_children_of_a_killed_worker_leave_quietly(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-document leaves no child working on and no traceback in its log."""
    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "worker.log"  # a file: orphans holding a pipe open would stall the test
    with open(log, "wb") as out:
        worker = subprocess.run(
            [sys.executable, "-m", TARGETS, str(tmp_path)], cwd=root, stderr=out, timeout=120
        )
    assert worker.returncode == -signal.SIGKILL
    pids = [int((tmp_path / f"{i}.pid").read_text()) for i in range(2)]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], "an orphaned extraction child kept running"
    # the children shared the worker's stderr; the napping one finished its document after
    # the worker died and must have left without a broken-pipe traceback
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


def alive(pid: int) -> bool:
    """Running, not gone and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
