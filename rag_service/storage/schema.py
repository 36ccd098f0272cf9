"""SQLite schema of the catalog: the source of truth for everything indexed."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS collections (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    embed_model TEXT NOT NULL,
    dim         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    -- bumped in every transaction that adds or removes chunks, so a process
    -- holding a FAISS copy can tell cheaply that it must catch up
    version     INTEGER NOT NULL DEFAULT 0,
    -- FAISS index type and parameters (rag_service.storage.faiss_index.IndexSpec)
    index_spec  TEXT NOT NULL DEFAULT 'flat'
);

CREATE TABLE IF NOT EXISTS documents (
    id            TEXT PRIMARY KEY,
    collection_id INTEGER NOT NULL REFERENCES collections(id),
    source        TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    content_type  TEXT,
    status        TEXT NOT NULL,
    pages         INTEGER,
    chunk_count   INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    -- order of acceptance (bumped when a failed document is uploaded again):
    -- of two versions under one source name, the later accepted one wins
    accepted_seq  INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_collection ON documents(collection_id, created_at);
CREATE INDEX IF NOT EXISTS documents_by_sha ON documents(collection_id, sha256);
CREATE INDEX IF NOT EXISTS documents_by_source ON documents(collection_id, source);
CREATE INDEX IF NOT EXISTS documents_by_blob ON documents(sha256);

-- AUTOINCREMENT: chunk ids are FAISS ids and must never be reused.
CREATE TABLE IF NOT EXISTS chunks (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL,
    document_id   TEXT NOT NULL,
    ordinal       INTEGER NOT NULL,
    page          INTEGER,
    headings      TEXT NOT NULL DEFAULT '[]',
    start_char    INTEGER NOT NULL,
    end_char      INTEGER NOT NULL,
    token_count   INTEGER NOT NULL,
    text          TEXT NOT NULL,
    vector        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_collection ON chunks(collection_id, id);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);

-- BM25 keyword index kept in step with chunks by triggers, in the same
-- transaction as the chunk rows.
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;

-- Blobs freed by a committed delete or replace, until their files are gone.
CREATE TABLE IF NOT EXISTS freed_blobs (
    sha256 TEXT PRIMARY KEY
);

CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    collection   TEXT NOT NULL,
    status       TEXT NOT NULL,
    stage        TEXT,
    docs_total   INTEGER NOT NULL DEFAULT 0,
    docs_done    INTEGER NOT NULL DEFAULT 0,
    docs_failed  INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    chunks_done  INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    worker       TEXT,
    lease_until  REAL,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);

CREATE TABLE IF NOT EXISTS job_documents (
    job_id      TEXT NOT NULL,
    document_id TEXT NOT NULL,
    position    INTEGER NOT NULL,
    PRIMARY KEY (job_id, document_id)
);
CREATE INDEX IF NOT EXISTS job_documents_by_document ON job_documents(document_id);

-- API keys: only the SHA-256 of each secret is kept (the secrets are random
-- and long, so a fast hash is enough); collections is a JSON list, ["*"] = all.
CREATE TABLE IF NOT EXISTS api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    scope        TEXT NOT NULL,
    collections  TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a catalog written by an older version up to ``SCHEMA_VERSION``."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(documents)")}
    coll_columns = {row[1] for row in conn.execute("PRAGMA table_info(collections)")}
    conn.execute("BEGIN IMMEDIATE")
    try:
        if "index_spec" not in coll_columns:  # version 3 -> 4
            conn.execute(
                "ALTER TABLE collections ADD COLUMN index_spec TEXT NOT NULL DEFAULT 'flat'"
            )
        # Version 2 -> 3 only adds api_keys, which SCHEMA creates if missing.
        if "accepted_seq" not in columns:  # version 1 -> 2
            conn.execute("ALTER TABLE documents ADD COLUMN accepted_seq INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE documents SET accepted_seq = rowid")
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
