"""Run a loader step in a child process with a memory cap and a wall-clock timeout.

PDFium inflates whole streams in memory and aborts the process when an
allocation fails; one page can also keep it busy for as long as it likes
inside a single call that no budget check can interrupt.  So PDF extraction
runs in a child interpreter started with ``python -m ingest.loaders.isolation``
(a fresh process, never a fork of the worker, which holds torch and llama.cpp
threads), limited by ``RLIMIT_AS`` and killed when the document's time is up.
A child that dies or is killed becomes a ``DocumentError`` with a message;
the worker goes on with a new child.

Children are reused: starting one costs an interpreter and its imports, so
an idle child waits for the next document and is replaced only after a
failure or ``max_documents`` documents.  Each caller (worker thread) takes
its own child, so extractions in several threads run side by side.

The protocol is one JSON header line and the raw bytes in, one JSON line
out: nothing is unpickled from a process that has just parsed hostile input.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import rag_service.errors as rag_errors
from rag_service.config import IngestSettings
from rag_service.errors import CorruptDocument, DocumentError, DocumentTooLarge

log = logging.getLogger(__name__)

_MODULE = "ingest.loaders.isolation"
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
_READ_STEP = 1 << 20
# How long a new child may take to import its modules (slow on a loaded machine).
_START_TIMEOUT_S = 120.0
# Share of the room left under the cap a child's address space must have grown
# into for its abort to count as running out of memory (buffers grow by doubling, so the request
# that failed can be twice what was mapped when last sampled).
_MEMORY_SHARE = 0.4
# How often the parent samples a working child's address-space size.
_SAMPLE_S = 0.02
# How often a child checks that its worker is still alive.
_ORPHAN_POLL_S = 0.5
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Signals that mean the child ran out of memory in native code: an allocation
# failure aborts (SIGABRT) or traps (SIGTRAP, SIGILL), a failed mmap can fault.
_MEMORY_SIGNALS = frozenset(
    {signal.SIGABRT, signal.SIGTRAP, signal.SIGILL, signal.SIGSEGV, signal.SIGBUS}
)


@dataclass
class _Child:
    """One extraction process and how much it has done."""

    process: subprocess.Popen[bytes]
    memory_mb: int
    documents: int = 0
    ready: bool = False
    #: Largest address-space size seen while it worked (sampled by the parent).
    peak_vm: int = 0
    #: Its address-space size when ready, before any document.
    idle_vm: int = 0

    def sample(self) -> None:
        """Note the child's current address-space size (the figure RLIMIT_AS caps)."""
        try:
            pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        self.peak_vm = max(self.peak_vm, pages * _PAGE_SIZE)


class ChildException(Exception):
    """An exception raised in the child, by type name and message, kept as a ``__cause__``."""


class ChildDied(Exception):
    """The child ended without an answer; ``returncode`` says how."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"extraction child ended with status {returncode}")
        self.returncode = returncode


class ExtractionSandbox:
    """A small pool of reused extraction children; safe to share between threads."""

    def __init__(self, *, max_documents: int = 200, max_idle: int = 2) -> None:
        self.max_documents = max_documents
        self.max_idle = max_idle
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False
        #: Children started so far (tests and benchmarks read it).
        self.started = 0

    def run(self, target: str, data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
        """Call ``target(data, name, settings)`` (``"module:function"``) in a child.

        The function returns a JSON-able dict, which comes back here.  A
        ``DocumentError`` it raises is raised here with the same message; a
        child over the memory cap, killed by a signal or over
        ``settings.max_seconds_per_document`` raises a ``DocumentError`` that
        says which.
        """
        timeout = settings.max_seconds_per_document
        child = self._take(settings.max_extract_memory_mb)
        self._wait_ready(child)
        deadline = time.monotonic() + timeout
        header = {
            "target": target,
            "name": name,
            "settings": settings.model_dump(mode="json"),
            "size": len(data),
        }
        try:
            stdin, stdout = _pipes(child)
            stdin.write(json.dumps(header).encode() + b"\n")
            stdin.write(data)
            stdin.flush()
            reply = json.loads(_read_line(stdout, deadline, child.sample))
        except TimeoutError:
            self._discard(child)
            log.warning("extraction timed out name=%s seconds=%g", name, timeout)
            raise DocumentTooLarge(
                f"PDF extraction of {name} took longer than {timeout:g} s and was stopped "
                "(RAG_INGEST__MAX_SECONDS_PER_DOCUMENT); split it into smaller files"
            ) from None
        except (ChildDied, BrokenPipeError) as exc:
            returncode = self._discard(child)
            log.warning(
                "extraction child died name=%s returncode=%s peak_vm_mb=%d",
                name,
                returncode,
                child.peak_vm >> 20,
            )
            raise _death_error(name, returncode, child) from exc
        except BaseException:  # interrupted, or a garbled reply: the child's state is unknown
            self._discard(child, replace=False)
            raise
        return self._answer(child, name, reply)

    def _wait_ready(self, child: _Child) -> None:
        """Wait for a new child's imports, which are not the document's time to spend."""
        if child.ready:
            return
        try:
            _read_line(_pipes(child)[1], time.monotonic() + _START_TIMEOUT_S)
        except (TimeoutError, ChildDied) as exc:
            returncode = self._discard(child, replace=False)
            raise RuntimeError(
                f"the PDF extraction process did not start (status {returncode}); "
                f"is RAG_INGEST__MAX_EXTRACT_MEMORY_MB={child.memory_mb} too low?"
            ) from exc
        child.ready = True
        child.sample()
        child.idle_vm = child.peak_vm

    def _answer(self, child: _Child, name: str, reply: dict[str, Any]) -> dict[str, Any]:
        if "memory" in reply:
            self._discard(child)
            raise _memory_error(name, child.memory_mb)
        self._give_back(child)
        if "ok" in reply:
            result: dict[str, Any] = reply["ok"]
            return result
        if "error" in reply:
            cls = getattr(rag_errors, str(reply["error"]), None)
            if not (isinstance(cls, type) and issubclass(cls, DocumentError)):
                cls = CorruptDocument
            cause = reply.get("cause")
            raise cls(str(reply["message"])) from (ChildException(cause) if cause else None)
        raise RuntimeError(f"PDF extraction of {name} failed in the child: {reply.get('bug')}")

    def close(self) -> None:
        """Stop every idle child; children in use stop when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            _stop(child)

    # -- the pool ------------------------------------------------------------

    def _take(self, memory_mb: int) -> _Child:
        stale: list[_Child] = []
        found: _Child | None = None
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.memory_mb == memory_mb and child.process.poll() is None:
                    found = child
                    break
                stale.append(child)
        for child in stale:
            _stop(child)
        return found if found is not None else self._spawn(memory_mb)

    def _spawn(self, memory_mb: int) -> _Child:
        # The child must import this package whatever its working directory.
        path = os.pathsep.join(p for p in (_SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        process = subprocess.Popen(
            [sys.executable, "-m", _MODULE, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.started += 1
        log.info("extraction child started pid=%d memory_mb=%d", process.pid, memory_mb)
        return _Child(process, memory_mb)

    def _give_back(self, child: _Child) -> None:
        child.documents += 1
        with self._lock:
            keep = (
                not self._closed
                and child.documents < self.max_documents
                and len(self._idle) < self.max_idle
            )
            if keep:
                self._idle.append(child)
        if not keep:
            _stop(child)

    def _discard(self, child: _Child, *, replace: bool = True) -> int | None:
        """Kill a child that failed and start its replacement; returns how it ended.

        The replacement imports its modules while the worker records the
        failure, so the next document does not wait for a fresh interpreter.
        """
        if child.process.poll() is None:
            child.process.kill()
        _stop(child)
        with self._lock:
            replace = replace and not self._closed and len(self._idle) < self.max_idle
        if replace:
            fresh: _Child | None = self._spawn(child.memory_mb)
            with self._lock:
                if not self._closed and fresh is not None:
                    self._idle.append(fresh)
                    fresh = None
            if fresh is not None:
                _stop(fresh)
        return child.process.returncode


def _pipes(child: _Child) -> tuple[IO[bytes], IO[bytes]]:
    stdin, stdout = child.process.stdin, child.process.stdout
    assert stdin is not None and stdout is not None
    return stdin, stdout


def _read_line(
    stdout: IO[bytes], deadline: float, sample: Callable[[], None] | None = None
) -> bytes:
    """One reply line, or ``TimeoutError`` at ``deadline``, or ``ChildDied`` on EOF.

    ``sample`` is called every ``_SAMPLE_S`` while waiting.
    """
    fd = stdout.fileno()
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if sample is not None:
            sample()
        if not select.select([fd], [], [], min(left, _SAMPLE_S))[0]:
            continue
        piece = os.read(fd, _READ_STEP)
        if not piece:
            raise ChildDied(None)
        parts.append(piece)
        if piece.endswith(b"\n"):
            return b"".join(parts)


def _stop(child: _Child) -> None:
    """Close the pipes and reap the child (closing stdin ends an idle one)."""
    process = child.process
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _memory_error(name: str, memory_mb: int) -> DocumentTooLarge:
    return DocumentTooLarge(
        f"PDF extraction of {name} exceeded the {memory_mb} MiB memory limit "
        "(RAG_INGEST__MAX_EXTRACT_MEMORY_MB); split it into smaller files"
    )


def _death_error(name: str, returncode: int | None, child: _Child) -> DocumentError:
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            sig = None
        # A native allocation failure aborts; having grown into a good part of
        # the room under the cap tells it from a crash on a damaged file.
        room = child.memory_mb * 2**20 - child.idle_vm
        grown = child.peak_vm - child.idle_vm
        if sig in _MEMORY_SIGNALS and grown >= room * _MEMORY_SHARE:
            return _memory_error(name, child.memory_mb)
        label = sig.name if sig is not None else f"signal {-returncode}"
        verb = "was killed" if sig in (signal.SIGKILL, signal.SIGTERM) else "crashed"
        return CorruptDocument(
            f"PDF extraction of {name} {verb} ({label}); the file may be damaged "
            "or too large for this server"
        )
    return CorruptDocument(
        f"PDF extraction of {name} stopped unexpectedly (exit status {returncode}); "
        "the file may be damaged"
    )


_DEFAULT: ExtractionSandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> ExtractionSandbox:
    """The process-wide sandbox, started on first use and stopped at exit."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ExtractionSandbox()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


# -- the child -------------------------------------------------------------------


def _handle(header: dict[str, Any], data: bytes) -> dict[str, Any]:
    module, _, function = str(header["target"]).partition(":")
    try:
        target = getattr(importlib.import_module(module), function)
        settings = IngestSettings.model_validate(header["settings"])
        return {"ok": target(data, str(header["name"]), settings)}
    except DocumentError as exc:
        cause = exc.__cause__
        return {
            "error": type(exc).__name__,
            "message": exc.message,
            "cause": f"{type(cause).__name__}: {cause}" if cause is not None else None,
        }
    except MemoryError:
        return {"memory": True}
    except Exception as exc:  # reported, so the parent fails the document, not the worker
        return {"bug": f"{type(exc).__name__}: {exc}"}


def _serve(memory_mb: int) -> None:
    """Answer requests from stdin until it closes; stdout is the reply channel only.

    A worker killed mid-document leaves its child behind: the child notices
    (its parent changes, a reply meets a closed pipe, a header is torn) and
    exits quietly instead of finishing the document or logging a traceback
    into the log it shares with the dead worker.
    """
    import resource

    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _exit_when_orphaned(os.getppid())
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from native code must not corrupt the replies
    requests = sys.stdin.buffer
    # imported before the first document's clock starts
    import pypdfium2  # noqa: F401

    import ingest.loaders.pdf  # noqa: F401

    try:
        replies.write(b'{"ready": true}\n')
        replies.flush()
        while header_line := requests.readline():
            try:
                header = json.loads(header_line)
                size = int(header["size"])
            except (ValueError, KeyError, TypeError):
                os._exit(0)  # a header torn by the parent's death
            data = requests.read(size)
            if len(data) < size:
                os._exit(0)
            try:
                reply = json.dumps(_handle(header, data)).encode()
            except MemoryError:
                reply = b'{"memory": true}'
            del data
            replies.write(reply + b"\n")
            replies.flush()
    except BrokenPipeError:
        os._exit(0)


def _exit_when_orphaned(parent: int) -> None:
    """Leave as soon as the worker that started this child is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
