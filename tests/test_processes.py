"""Real processes on 127.0.0.1: ``rag serve`` and ``rag worker`` sharing one data directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_pdf

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def rag(args: list[str], data: Path, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``rag ARGS`` as a child process; SIGTERM it on the way out."""
    environ = {**os.environ, "RAG_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", **env}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rag_service.cli", *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"service never became ready:\n{log.read_text()}")


def wait_job(base: str, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job: dict[str, object] = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.3)
    raise AssertionError("job never finished")


def test_serve_and_a_separate_worker_share_one_data_directory(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "processes.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pdf = make_pdf(["Nothing here.", "The ferry to the island leaves every hour on the hour."])
    serve_args = ["serve", "--host", "127.0.0.1", "--port", str(port)]

    with rag(serve_args, data, log, RAG_INGEST__WORKER_THREADS="0") as server:
        wait_ready(base, server, log)
        assert httpx.get(f"{base}/readyz").json()["workers"] == 0
        upload = httpx.post(
            f"{base}/v1/collections/travel/documents",
            files=[("files", ("ferry.pdf", pdf))],
            timeout=30,
        )
        assert upload.status_code == 202, upload.text
        job_id = upload.json()["job_id"]
        time.sleep(1.0)
        assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "queued"

        with rag(["worker"], data, log) as worker:
            job = wait_job(base, job_id)
            assert job["status"] == "succeeded", job
            assert worker.poll() is None
        assert worker.returncode == 0  # SIGTERM stops it cleanly

        # the server catches its FAISS index up with chunks another process committed
        hits = httpx.post(
            f"{base}/v1/retrieve",
            json={"collection": "travel", "query": "when does the ferry leave?", "top_k": 1},
            timeout=30,
        ).json()["results"]
        assert (hits[0]["source"], hits[0]["page"]) == ("ferry.pdf", 2)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert server.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log.read_text()
    assert (data / "travel" / "vectors.faiss").is_file()  # snapshot written on the way out

    # a restarted server still has everything
    with rag(serve_args, data, log) as server:
        wait_ready(base, server, log)
        docs = httpx.get(f"{base}/v1/collections/travel/documents").json()
        assert [d["status"] for d in docs["documents"]] == ["indexed"]
        assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "succeeded"
        again = httpx.post(
            f"{base}/v1/retrieve",
            json={"collection": "travel", "query": "when does the ferry leave?", "top_k": 1},
            timeout=30,
        ).json()["results"]
        assert again == hits
