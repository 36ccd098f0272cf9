"""Functions the extraction child runs in tests/ingest/test_pdf_isolation.py.

They stand in for a PDF engine that misbehaves: hangs, eats memory, exits
or dies by a signal.  Each takes ``(data, name, settings)`` like the real
target and returns a JSON-able dict.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from rag_service.config import IngestSettings
from rag_service.errors import EncryptedDocument

MODULE = "tests.ingest.isolation_targets"  # not __name__, which is __main__ when run with -m


def echo(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    return {
        "size": len(data),
        "name": name,
        "pid": os.getpid(),
        "torch": "torch" in sys.modules,
        "memory_mb": settings.max_extract_memory_mb,
    }


def nap(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    time.sleep(1.0)
    return {"pid": os.getpid()}


def hang(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    time.sleep(3600)
    return {}


def allocate(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    block = bytearray(int(data))
    return {"allocated": len(block)}


def exit_now(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    os._exit(3)


def kill_self(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def abort(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    os.abort()


def refuse(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    raise EncryptedDocument(f"{name} is password-protected")


def bug(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    raise ValueError("a bug in the loader")


def note_pid_then_nap(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    """Writes its pid to the path in ``data``, then works for a second."""
    with open(data.decode(), "w") as out:
        out.write(str(os.getpid()))
    time.sleep(1.0)
    return {"pid": os.getpid()}


def note_pid_then_hang(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    with open(data.decode(), "w") as out:
        out.write(str(os.getpid()))
    time.sleep(3600)
    return {}


def killed_worker(notes: str) -> None:
    """A worker that starts two extractions and dies by SIGKILL in the middle of both."""
    import threading

    from ingest.loaders.isolation import ExtractionSandbox

    box = ExtractionSandbox()
    for index, target in enumerate(("note_pid_then_nap", "note_pid_then_hang")):
        path = f"{notes}/{index}.pid"
        threading.Thread(
            target=box.run,
            args=(f"{MODULE}:{target}", path.encode(), "x.pdf", IngestSettings()),
            daemon=True,
        ).start()
    while not all(os.path.exists(f"{notes}/{i}.pid") for i in range(2)):
        time.sleep(0.05)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    killed_worker(sys.argv[1])
