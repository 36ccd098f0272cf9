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
