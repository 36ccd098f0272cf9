"""``rag backup DEST`` and ``rag restore SRC``: copies of the data directory, with progress."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from rag_service.config import Settings
from rag_service.errors import RagError
from rag_service.storage.backup import Manifest, backup, restore

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Settings()


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


class _Bars:
    """The storage layer's ``progress(stage, done, total)`` as one bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(task, completed=done, total=total)


@contextmanager
def _bars() -> Iterator[_Bars]:
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # Not drawn when stdout is not a terminal (a log, a pipe): the summary line says it all.
    with Progress(*columns, console=out, transient=True, disable=not out.is_terminal) as progress:
        yield _Bars(progress)


def _summary(manifest: Manifest) -> str:
    return (
        f"{manifest.collections} collection(s), {manifest.documents} document(s), "
        f"{manifest.chunks} chunk(s), {manifest.blobs} original file(s) "
        f"({manifest.blob_bytes / 1e6:.1f} MB)"
    )


def _warn(notes: list[str]) -> None:
    for note in notes:
        err.print(f"[yellow]warning:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)


def backup_command(
    dest: Annotated[Path, typer.Argument(help="A new or empty folder to write the backup to.")],
) -> None:
    """Copy the data directory to DEST; safe while the service and workers run."""
    data_dir = _settings().data_dir
    notes: list[str] = []
    started = time.perf_counter()
    try:
        with _bars() as bars:
            manifest = backup(data_dir, dest, progress=bars, notify=notes.append)
    except RagError as exc:
        raise _fail(exc.message) from exc
    except OSError as exc:
        raise _fail(f"backup to {dest} failed: {exc}") from exc
    _warn(notes)
    out.print(
        f"backup of {data_dir} written to {dest}: {_summary(manifest)}, "
        f"in {time.perf_counter() - started:.1f} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def restore_command(
    src: Annotated[Path, typer.Argument(help="A folder written by rag backup.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace a data directory that is not empty."),
    ] = False,
    allow_missing_blobs: Annotated[
        bool,
        typer.Option(
            "--allow-missing-blobs",
            help="Go ahead when original files are missing or corrupt in the backup.",
        ),
    ] = False,
) -> None:
    """Make the data directory a copy of the backup in SRC. Stop the service first."""
    data_dir = _settings().data_dir
    notes: list[str] = []
    started = time.perf_counter()
    try:
        with _bars() as bars:
            manifest = restore(
                src,
                data_dir,
                force=force,
                allow_missing_blobs=allow_missing_blobs,
                progress=bars,
                notify=notes.append,
            )
    except RagError as exc:
        raise _fail(exc.message) from exc
    except OSError as exc:
        raise _fail(f"restore from {src} failed: {exc}") from exc
    _warn(notes)
    out.print(
        f"restored the backup of {manifest.created_at} into {data_dir}: {_summary(manifest)}, "
        f"in {time.perf_counter() - started:.1f} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
