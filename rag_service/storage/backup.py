"""Backups of a data directory, safe while the service runs, and their restore.

A backup is a folder:

    catalog.sqlite3                         one consistent moment of the catalog
    blobs/<sha256>                          every original file that copy refers to
    snapshots/<collection>/vectors.faiss    FAISS snapshots cut down to that copy
    manifest.json                           written last: without it, the backup is incomplete

The catalog is copied with SQLite's online backup in one step, i.e. inside one
read transaction: WAL readers do not block writers, so ``rag serve``, workers
and ``rag ingest`` carry on.  Blobs are chosen by reading the copy, not the live
catalog, and are checked against their hash as they are copied.

FAISS snapshots are derived data, kept only as a head start.  Chunk ids are
never reused within a catalog and a chunk's vector never changes, so the part
of a snapshot whose ids the catalog holds is exact; ids it does not hold
(chunks deleted before the copy, or committed after it) are dropped.  Restore
checks the same against the restored catalog, catches each index up from
SQLite and writes fresh snapshots, so no vector can outlive its chunk.

Restore builds the new state in a hidden folder inside the target (so renames
stay on one file system, a Docker volume included) and moves it in with the
catalog's rename as the commit point: a crash before it leaves no catalog (the
previous contents wait in ``.replaced-*``), never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from rag_service import __version__
from rag_service.errors import BackupInvalid, ConflictError, InvalidRequest
from rag_service.storage.backup_files import (
    SHA256,
    blob_users,
    check_integrity,
    chunk_ids,
    copy_verified,
    file_sha256,
    fitted_snapshot,
    fsync,
    read_catalog,
    safe_name,
    users_of,
    within,
    write_atomic,
    write_index,
)
from rag_service.storage.catalog import Catalog
from rag_service.storage.schema import SCHEMA_VERSION
from rag_service.storage.vectors import SNAPSHOT_NAME, VectorStore

log = logging.getLogger(__name__)

CATALOG = "catalog.sqlite3"
MANIFEST = "manifest.json"
BLOBS = "blobs"
SNAPSHOTS = "snapshots"
#: Layout version of the backup folder itself.
FORMAT = 1

#: Catalog copies a backup takes at most while blobs vanish under it.
_ROUNDS = 5
_STAGING = ".restore-"
_ASIDE = ".replaced-"

#: ``progress(stage, done, total)``; ``total`` is None while unknown.
ProgressFn = Callable[[str, int, int | None], None]
#: ``notify(message)``: something the operator should read (a missing blob, requeued jobs).
NotifyFn = Callable[[str], None]


def _no_progress(stage: str, done: int, total: int | None) -> None:
    return None


def _no_notify(message: str) -> None:
    log.warning("%s", message)


@dataclass(frozen=True)
class Manifest:
    """What a complete backup holds; its file is written last."""

    #: When the catalog was copied: the moment the backup holds (ISO 8601, UTC).
    created_at: str
    schema_version: int
    service_version: str
    collections: int
    documents: int
    chunks: int
    blobs: int
    blob_bytes: int
    catalog_sha256: str
    #: Collections whose FAISS snapshot was kept.
    snapshots: tuple[str, ...] = ()
    #: Blobs the catalog refers to that were absent or corrupt in the data directory.
    missing_blobs: tuple[str, ...] = ()
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of a backup folder; refuses incomplete or too new backups."""
        path = folder / MANIFEST
        try:
            raw = json.loads(path.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise BackupInvalid(
                f"{folder} has no {MANIFEST}: it is not a backup, or the backup was "
                "interrupted before it finished"
            ) from exc
        except (OSError, ValueError) as exc:
            raise BackupInvalid(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise BackupInvalid(f"{path} is not a backup manifest")
        try:
            layout, schema = int(raw.get("format", 0)), int(raw["schema_version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupInvalid(f"{path} is not a complete backup manifest: {exc}") from exc
        if layout > FORMAT or schema > SCHEMA_VERSION:
            raise BackupInvalid(
                f"the backup in {folder} was written by a newer version (catalog schema "
                f"{schema}, this version reads up to {SCHEMA_VERSION}); "
                "restore it with that version or a later one"
            )
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["snapshots"] = tuple(values.get("snapshots", ()))
        values["missing_blobs"] = tuple(values.get("missing_blobs", ()))
        try:
            return cls(**values)
        except TypeError as exc:
            raise BackupInvalid(f"{path} is not a complete backup manifest: {exc}") from exc


# -- backup ------------------------------------------------------------------


def backup(
    data_dir: Path,
    dest: Path,
    *,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Manifest:
    """Copy a data directory to the new or empty folder ``dest``, while it is in use.

    Blobs that vanish between the catalog copy and their own copy belonged to
    documents deleted meanwhile; the catalog is then copied again (it no longer
    refers to them).  Blobs still missing or corrupt are listed in the manifest.
    """
    report = progress or _no_progress
    tell = notify or _no_notify
    source = data_dir / CATALOG
    if not source.is_file():
        raise InvalidRequest(f"nothing to back up: {source} does not exist")
    _check_dest(data_dir, dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / BLOBS).mkdir()
    catalog = dest / CATALOG
    copied: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    absent: set[str] = set()
    corrupt: set[str] = set()
    for attempt in range(1, _ROUNDS + 1):
        report("catalog", 0, None)
        taken_at = datetime.now(UTC)
        _copy_catalog(source, catalog)
        report("catalog", 1, 1)
        users = read_catalog(catalog, blob_users)
        absent, corrupt = _copy_blobs(data_dir / BLOBS, dest / BLOBS, users, copied, report)
        if not absent:
            break
        log.info("blobs vanished during backup count=%d attempt=%d", len(absent), attempt)
    for sha in set(copied) - set(users):  # copied for an earlier catalog copy only
        (dest / BLOBS / sha).unlink()
        del copied[sha]
    missing = sorted(absent | corrupt)
    for sha in missing:
        state = "corrupt" if sha in corrupt else "missing"
        used_by = users_of(users, sha)
        tell(f"blob {sha} is {state} in {data_dir}; not in the backup (used by {used_by})")
    snapshots = _copy_snapshots(data_dir, dest, catalog, report)
    manifest = _manifest(catalog, taken_at, copied, snapshots, missing)
    write_atomic(dest / MANIFEST, manifest.to_json())
    log.info(
        "backup written dest=%s chunks=%d blobs=%d snapshots=%d",
        dest,
        manifest.chunks,
        manifest.blobs,
        len(snapshots),
    )
    return manifest


def _check_dest(data_dir: Path, dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConflictError(f"backup destination {dest} is a file; give a new or empty folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ConflictError(f"backup destination {dest} is not empty; give a new or empty folder")
    if within(dest, data_dir):
        raise InvalidRequest(f"backup destination {dest} is inside the data directory {data_dir}")


def _copy_catalog(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target``, as one self-contained file."""
    target.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=30.0)
    try:
        dst = sqlite3.connect(target)
        try:
            # pages=-1: every page in one step, inside one read transaction, so the
            # copy is one moment of the catalog however busy its writers are.
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.DatabaseError as exc:
            raise BackupInvalid(f"cannot copy the catalog {source}: {exc}") from exc
        else:
            check_integrity(dst, target)
        finally:
            dst.close()
    finally:
        src.close()
    fsync(target)


def _copy_blobs(
    source: Path,
    target: Path,
    users: dict[str, list[str]],
    copied: dict[str, int],
    report: ProgressFn,
) -> tuple[set[str], set[str]]:
    """Copy the blobs in ``users`` not yet in ``copied``; returns ``(absent, corrupt)``."""
    absent: set[str] = set()
    corrupt: set[str] = set()
    for done, sha in enumerate(users, 1):
        if sha not in copied:
            try:
                size = copy_verified(source / sha, target / sha, sha) if SHA256.match(sha) else None
            except FileNotFoundError:
                absent.add(sha)
            else:
                if size is None:
                    corrupt.add(sha)
                else:
                    copied[sha] = size
        report("blobs", done, len(users))
    return absent, corrupt


def _copy_snapshots(data_dir: Path, dest: Path, catalog: Path, report: ProgressFn) -> list[str]:
    """Keep each collection's snapshot, cut down to the chunks of the catalog copy."""
    kept: list[str] = []
    conn = sqlite3.connect(catalog)
    try:
        rows = conn.execute("SELECT id, name, dim FROM collections ORDER BY name").fetchall()
        for done, (coll_id, name, dim) in enumerate(rows, 1):
            path = data_dir / name / SNAPSHOT_NAME
            if safe_name(name) and path.is_file():
                index = fitted_snapshot(path, chunk_ids(conn, coll_id), dim)
                if index is not None:
                    write_index(index, dest / SNAPSHOTS / name / SNAPSHOT_NAME)
                    kept.append(name)
            report("snapshots", done, len(rows))
    finally:
        conn.close()
    return kept


def _counts(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
    """Schema version, collections, documents and chunks of a catalog."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    collections, documents, chunks = (
        int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table in ("collections", "documents", "chunks")
    )
    return (int(row[0]) if row else 1), collections, documents, chunks


def _manifest(
    catalog: Path,
    taken_at: datetime,
    copied: dict[str, int],
    snapshots: list[str],
    missing: list[str],
) -> Manifest:
    schema_version, collections, documents, chunks = read_catalog(catalog, _counts)
    return Manifest(
        created_at=taken_at.isoformat(timespec="seconds"),
        schema_version=schema_version,
        service_version=__version__,
        collections=collections,
        documents=documents,
        chunks=chunks,
        blobs=len(copied),
        blob_bytes=sum(copied.values()),
        catalog_sha256=file_sha256(catalog),
        snapshots=tuple(snapshots),
        missing_blobs=tuple(missing),
    )


# -- restore -----------------------------------------------------------------


def restore(
    src: Path,
    data_dir: Path,
    *,
    force: bool = False,
    allow_missing_blobs: bool = False,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Manifest:
    """Make ``data_dir`` hold the backup in ``src``; returns the backup's manifest.

    Stop every process using ``data_dir`` first.  A data directory that is not
    empty is replaced only with ``force``.  Every blob is checked against its
    hash; a missing or corrupt one fails the restore (naming the documents that
    use it) unless ``allow_missing_blobs``.  Jobs that were running at backup
    time are queued again: their leases belong to workers of another time.
    """
    report = progress or _no_progress
    tell = notify or _no_notify
    manifest = Manifest.read(src)
    if within(src, data_dir):
        raise InvalidRequest(f"the backup {src} is inside the data directory {data_dir}")
    _check_target(data_dir, force)
    data_dir.mkdir(parents=True, exist_ok=True)
    for leftover in data_dir.glob(f"{_STAGING}*"):  # from a restore that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = data_dir / f"{_STAGING}{uuid.uuid4().hex}"
    (staging / BLOBS / "tmp").mkdir(parents=True)
    try:
        report("catalog", 0, None)
        catalog = staging / CATALOG
        _restore_catalog(src / CATALOG, catalog, manifest.catalog_sha256)
        users = read_catalog(catalog, blob_users)
        requeued = read_catalog(catalog, _requeue)
        report("catalog", 1, 1)
        problems = _restore_blobs(src / BLOBS, staging / BLOBS, users, report)
        if problems:
            described = [
                f"blob {sha} is {why} (used by {users_of(users, sha)})" for sha, why in problems
            ]
            if not allow_missing_blobs:
                shown = "; ".join(described[:10])
                more = f"; and {len(described) - 10} more" if len(described) > 10 else ""
                raise BackupInvalid(
                    f"the backup in {src} lacks {len(problems)} original file(s): {shown}{more}. "
                    "Restore with --allow-missing-blobs to go ahead without them"
                )
            for line in described:
                tell(line)
        if requeued:
            tell(f"{requeued} job(s) that were running at backup time are queued again")
        _rebuild_indexes(src, staging, report)
        _swap_in(staging, data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("backup restored src=%s data_dir=%s chunks=%d", src, data_dir, manifest.chunks)
    return manifest


def _check_target(data_dir: Path, force: bool) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise ConflictError(f"the data directory {data_dir} is a file")
    if force or not data_dir.is_dir():
        return
    if (data_dir / CATALOG).exists():
        raise ConflictError(
            f"{data_dir} already holds a catalog; stop the service and restore with --force "
            "to replace it"
        )
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.relative_to(data_dir).parts[0].startswith(_STAGING):
            raise ConflictError(f"{data_dir} is not empty; restore with --force to replace it")


def _restore_catalog(source: Path, target: Path, expected_sha256: str) -> None:
    try:
        size = copy_verified(source, target, expected_sha256)
    except FileNotFoundError as exc:
        raise BackupInvalid(f"the backup has no {CATALOG}: {source} is missing") from exc
    if size is None:
        raise BackupInvalid(f"{source} does not match its manifest: the backup is damaged")
    read_catalog(target, lambda conn: check_integrity(conn, source))
    schema = read_catalog(target, _counts)[0]
    if schema > SCHEMA_VERSION:
        raise BackupInvalid(
            f"{source} has catalog schema {schema}; this version reads up to {SCHEMA_VERSION}"
        )


def _requeue(conn: sqlite3.Connection) -> int:
    """Queue again the jobs that were running at backup time; returns how many."""
    with conn:
        # The claim was cut short by the backup, not by the job: it does not
        # count against the attempts a job gets before it is given up.
        cur = conn.execute(
            "UPDATE jobs SET status = 'queued', stage = 'queued', worker = NULL,"
            " lease_until = NULL, attempts = max(attempts - 1, 0) WHERE status = 'running'"
        )
        conn.execute(
            "UPDATE documents SET status = 'queued', updated_at = ? WHERE status = 'processing'",
            (time.time(),),
        )
    return cur.rowcount


def _restore_blobs(
    source: Path, target: Path, users: dict[str, list[str]], report: ProgressFn
) -> list[tuple[str, str]]:
    """Copy and verify every blob the catalog refers to; returns ``(sha, problem)`` pairs."""
    problems: list[tuple[str, str]] = []
    for done, sha in enumerate(users, 1):
        try:
            if not SHA256.match(sha):
                problems.append((sha, "not named by a SHA-256"))
            elif copy_verified(source / sha, target / sha, sha) is None:
                problems.append((sha, "corrupt (its bytes do not match its SHA-256)"))
        except FileNotFoundError:
            problems.append((sha, "missing"))
        report("blobs", done, len(users))
    fsync(target)
    return problems


def _rebuild_indexes(src: Path, staging: Path, report: ProgressFn) -> None:
    """Build every collection's FAISS snapshot from the restored catalog.

    A snapshot from the backup seeds it only after being cut down to the
    restored catalog's chunk ids; catching up from SQLite adds the rest.
    """
    catalog = Catalog(staging / CATALOG)  # also migrates an older schema
    try:
        vectors = VectorStore(catalog, staging)
        collections = catalog.list_collections()
        for done, coll in enumerate(collections, 1):
            if not safe_name(coll.name):
                raise BackupInvalid(f"the backup names a collection {coll.name!r}")
            seed = src / SNAPSHOTS / coll.name / SNAPSHOT_NAME
            if seed.is_file():
                index = fitted_snapshot(seed, catalog.chunk_ids(coll.id), coll.dim)
                if index is not None:
                    write_index(index, vectors.snapshot_path(coll.name))
            vectors.sync(coll.name)
            vectors.snapshot(coll.name)
            report("indexes", done, len(collections))
    finally:
        catalog.close()
    # One self-contained file again: no WAL to move along with it.
    conn = sqlite3.connect(staging / CATALOG)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
    fsync(staging / CATALOG)


def _swap_in(staging: Path, data_dir: Path) -> None:
    """Move the restored state into ``data_dir``; the catalog's rename commits it.

    Blobs go first (content-addressed, so harmless on their own), snapshots
    last (a crash before them only costs a rebuild from SQLite).
    """
    aside = data_dir / f"{_ASIDE}{uuid.uuid4().hex}"
    old = [p for p in data_dir.iterdir() if p != staging]
    if old:
        aside.mkdir()
        for path in sorted(old, key=lambda p: not p.name.startswith(CATALOG)):
            os.replace(path, aside / path.name)
        fsync(data_dir)
    os.replace(staging / BLOBS, data_dir / BLOBS)
    fsync(data_dir)
    os.replace(staging / CATALOG, data_dir / CATALOG)
    fsync(data_dir)
    for path in staging.iterdir():
        os.replace(path, data_dir / path.name)
    fsync(data_dir)
    staging.rmdir()
    shutil.rmtree(aside, ignore_errors=True)
