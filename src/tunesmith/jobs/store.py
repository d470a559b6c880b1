"""The job service's state: one SQLite database beside the storage root, holding files, jobs, events
and checkpoints.

Everything a client can see lives here (nothing only in the server's memory), so a restarted server
answers the same. WAL mode lets the API read while the queue thread writes; one lock serialises the
writers of this process. Rows keep their JSON-valued fields as text; `seq` (the rowid) orders lists
and serves as the pagination cursor behind the public ids.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DB_NAME = "tunesmith.db"
_ALPHABET = string.ascii_letters + string.digits

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_details TEXT,
    kind TEXT,
    examples INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    method TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    seed INTEGER NOT NULL,
    suffix TEXT,
    metadata TEXT,
    status TEXT NOT NULL,
    stop_intent TEXT,
    error TEXT,
    fine_tuned_model TEXT,
    finished_at INTEGER,
    trained_tokens INTEGER,
    run_dir TEXT NOT NULL,
    config_path TEXT NOT NULL,
    pid INTEGER,
    metrics_offset INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step_number INTEGER NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL,
    UNIQUE (job_id, step_number)
);
"""

TABLES = ("files", "jobs", "events", "checkpoints")
JSON_FIELDS = {"hyperparameters", "method", "metadata", "error", "data", "metrics"}


def new_id(prefix: str) -> str:
    """`file-…`, `ftjob-…`: 24 random letters and digits, as OpenAI's ids look (no `/`, no `:`)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def now() -> int:
    return int(time.time())


class UnknownCursor(KeyError):
    """`after` names no item of the list being paged."""


class Store:
    """The database of one storage root; safe to share between the API and the queue thread."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- generic row access -------------------------------------------------------------------------

    def insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        assert table in TABLES
        values = {key: _encode(key, value) for key, value in row.items()}
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self.transaction() as db:
            db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))
        return self.get(table, row["id"]) or row

    def insert_ignore(self, table: str, row: dict[str, Any]) -> bool:
        """Insert unless a unique key already holds it; True when the row is new."""
        assert table in TABLES
        values = {key: _encode(key, value) for key, value in row.items()}
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self.transaction() as db:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})", tuple(values.values())
            )
        return cursor.rowcount == 1

    def get(self, table: str, id: str) -> dict[str, Any] | None:
        assert table in TABLES
        with self._lock:
            row = self._db.execute(f"SELECT * FROM {table} WHERE id = ?", (id,)).fetchone()
        return _decode(row) if row is not None else None

    def update(self, table: str, id: str, **fields: Any) -> dict[str, Any] | None:
        assert table in TABLES
        sets = ", ".join(f"{key} = ?" for key in fields)
        values = tuple(_encode(key, value) for key, value in fields.items())
        with self.transaction() as db:
            db.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values, id))
        return self.get(table, id)

    def update_if(self, table: str, id: str, expected_status: tuple[str, ...], **fields: Any) -> bool:
        """Update only while the row's status is one of `expected_status` (no lost transitions)."""
        sets = ", ".join(f"{key} = ?" for key in fields)
        values = tuple(_encode(key, value) for key, value in fields.items())
        marks = ", ".join("?" for _ in expected_status)
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE {table} SET {sets} WHERE id = ? AND status IN ({marks})",
                (*values, id, *expected_status),
            )
        return cursor.rowcount == 1

    def delete(self, table: str, id: str) -> bool:
        assert table in TABLES
        with self.transaction() as db:
            return db.execute(f"DELETE FROM {table} WHERE id = ?", (id,)).rowcount == 1

    def select(self, table: str, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        assert table in TABLES
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY seq", params).fetchall()
        return [_decode(row) for row in rows]

    def page(
        self,
        table: str,
        *,
        where: str = "1",
        params: tuple[Any, ...] = (),
        after: str | None = None,
        limit: int = 20,
        newest_first: bool = True,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a list, in the list's order, starting after the item `after`; and has_more.

        An `after` that is the list's last item gives an empty page; one that names no item of this
        list raises UnknownCursor.
        """
        assert table in TABLES
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        with self._lock:
            if after is not None:
                found = self._db.execute(
                    f"SELECT seq FROM {table} WHERE id = ? AND ({where})", (after, *params)
                ).fetchone()
                if found is None:
                    raise UnknownCursor(after)
                where, params = f"({where}) AND seq {compare} ?", (*params, found["seq"])
            rows = self._db.execute(
                f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?", (*params, limit + 1)
            ).fetchall()
        items = [_decode(row) for row in rows[:limit]]
        return items, len(rows) > limit


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value) if key in JSON_FIELDS and value is not None else value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in JSON_FIELDS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
