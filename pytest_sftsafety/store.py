"""The result store: generations and judgments in one SQLite file, keyed by their content.

Core module: stdlib only. WAL mode lets several processes (xdist workers, concurrent runs) read and
write at once; every batch is committed as soon as it is done, so an interrupted run loses at most
the batch in flight and the next run continues from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import SftSafetyError
from .sanitize import outgoing

SCHEMA_VERSION = "1"
T = TypeVar("T")
BUSY_TIMEOUT_MS = 60_000


class StoreError(SftSafetyError):
    """The store file cannot be used; the message says what to do with it."""


def _writable(path: Path) -> bool:
    # SQLite writes the file and, in WAL mode, files beside it; access() also says no on a read-only disk.
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def content_key(*parts: object) -> str:
    """A stable key for a JSON-serialisable description of what was computed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Claim:
    """Who works on one shard of a distributed run (see ``distributed.py``)."""

    owner: str
    host: str
    pid: int
    heartbeat: float
    state: str  # running, done or failed
    message: str | None = None


CLAIM_RETENTION_S = 7 * 24 * 3600


class Store:
    """Generations (key -> response, new-token count) and judgments (key -> score)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_MS / 1000) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.read_only = self.path.is_file() and not _writable(self.path)
        if self.read_only:
            self._open_read_only()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._enable_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction():
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, "
                                 "response TEXT NOT NULL, new_tokens INTEGER NOT NULL, created REAL NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, "
                                 "score INTEGER NOT NULL, created REAL NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, "
                                 "value REAL NOT NULL, created REAL NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS file_hashes (path TEXT, size INTEGER, mtime_ns INTEGER, "
                                 "sha256 TEXT NOT NULL, PRIMARY KEY (path, size, mtime_ns))")
                self._db.execute("CREATE TABLE IF NOT EXISTS claims (stage TEXT, shard INTEGER, owner TEXT NOT NULL, "
                                 "host TEXT NOT NULL, pid INTEGER NOT NULL, heartbeat REAL NOT NULL, "
                                 "state TEXT NOT NULL, message TEXT, PRIMARY KEY (stage, shard))")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None
        except OSError as exc:
            raise StoreError(f"cannot create the result store {self.path}: {exc.strerror or exc}; pass "
                             f"--sftsafety-store PATH on a writable disk") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"result store {self.path} has format {version}, this version reads {SCHEMA_VERSION}; "
                             f"move the file away or pass --sftsafety-store NEW_PATH")

    def _open_read_only(self) -> None:
        """A store on a read-only disk or without write permission: read, never written. A run whose
        results are all stored needs nothing else; ``require_writable`` stops one that has work to keep
        before it does any. WAL needs a shared-memory file beside the store, which may be impossible to
        create here; then the file is read as immutable (nobody can write it either)."""
        last: sqlite3.Error | None = None
        for mode in ("mode=ro", "immutable=1"):
            try:
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{mode}", uri=True,
                                           timeout=self.busy_timeout_s, isolation_level=None)
                version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                break
            except sqlite3.Error as exc:
                last = exc
        else:
            raise self._explain(last) from None  # type: ignore[arg-type]
        if version is None or version[0] != SCHEMA_VERSION:
            raise StoreError(f"result store {self.path} (read-only) has format {version and version[0]}, this "
                             f"version reads {SCHEMA_VERSION}; pass --sftsafety-store NEW_PATH")

    def require_writable(self, count: int, what: str) -> None:
        """Refuse, before the work starts, to make ``count`` new results that a read-only store cannot keep."""
        if self.read_only and count:
            raise StoreError(f"result store {self.path} is read-only and this run has {count} {what} to make and "
                             f"keep; make it writable, or pass --sftsafety-store NEW_PATH (a copy of this one "
                             f"keeps what it holds)")

    def _enable_wal(self) -> None:
        """Switch to WAL (persistent in the file). SQLite answers a concurrent switch with "locked" at once,
        without waiting for the busy timeout, which processes opening a new store together all do."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _explain(self, exc: sqlite3.DatabaseError) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(f"result store {self.path} stayed locked by another process for "
                              f"{self.busy_timeout_s:g} s; wait for it to finish or pass --sftsafety-store NEW_PATH")
        if "database or disk is full" in text or "disk i/o error" in text.lower():
            return StoreError(f"result store {self.path}: the disk is full ({text}); free space or pass "
                              f"--sftsafety-store PATH on another disk (stored results so far are kept)")
        return StoreError(f"result store {self.path} is damaged or not a result store ({text}); move it away "
                          f"(it may still hold results) and run again, or pass --sftsafety-store NEW_PATH")

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, tb):
                db.execute("COMMIT" if kind is None else "ROLLBACK")
                return False

        return _Tx()

    def _get(self, table: str, column: str, keys: Sequence[str]) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        try:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(f"SELECT key, {column} FROM {table} WHERE key IN ({marks})", chunk):
                    found[row[0]] = tuple(row[1:])
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None
        return found

    def _put(self, sql: str, rows: Iterable[tuple]) -> None:
        rows = list(rows)
        self.require_writable(len(rows), "results")
        try:
            with self._transaction():
                self._db.executemany(sql, rows)
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None

    def get_generations(self, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        return self._get("generations", "response, new_tokens", keys)  # type: ignore[return-value]

    def put_generations(self, rows: Mapping[str, tuple[str, int]]) -> None:
        """Store answers as ``sanitize.outgoing`` makes them (the runner hands them over clean already, so that
        the judge sees what is stored; here no text can reach the file with a lone surrogate or a key)."""
        now = time.time()
        self._put("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?)",
                  [(key, outgoing(text), tokens, now) for key, (text, tokens) in rows.items()])

    def get_judgments(self, keys: Sequence[str]) -> dict[str, int]:
        return {key: value[0] for key, value in self._get("judgments", "score", keys).items()}

    def put_judgments(self, rows: Mapping[str, int]) -> None:
        now = time.time()
        self._put("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?)",
                  [(key, int(score), now) for key, score in rows.items()])

    def get_scores(self, keys: Sequence[str]) -> dict[str, float]:
        """Continuous scores of answers (toxicity), keyed like judgments."""
        return {key: value[0] for key, value in self._get("scores", "value", keys).items()}

    def put_scores(self, rows: Mapping[str, float]) -> None:
        now = time.time()
        self._put("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", [(key, float(v), now) for key, v in rows.items()])

    def file_hashes(self) -> dict[tuple[str, int, int], str]:
        """Known weight-file hashes, so a warm run does not read gigabytes of weights again."""
        try:
            return {(p, size, mtime): digest for p, size, mtime, digest in
                    self._db.execute("SELECT path, size, mtime_ns, sha256 FROM file_hashes")}
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None

    def put_file_hashes(self, hashes: Mapping[tuple[str, int, int], str]) -> None:
        self._put("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                  [(*key, digest) for key, digest in hashes.items()])

    # -- shard claims of distributed runs ------------------------------------------------------------

    def with_file_hashes(self, use: Callable[[dict[tuple[str, int, int], str]], T]) -> T:
        """``use(hashes)`` with the sha256 of weight files remembered by earlier runs (keyed by path, size and
        modification time); the hashes it adds are remembered for the next run."""
        hashes = self.file_hashes()
        known = dict(hashes)
        out = use(hashes)
        if hashes != known and not self.read_only:  # a cache: a read-only store hashes again next time
            self.put_file_hashes({k: v for k, v in hashes.items() if known.get(k) != v})
        return out

    def claims(self, stage: str) -> dict[int, Claim]:
        try:
            rows = self._db.execute("SELECT shard, owner, host, pid, heartbeat, state, message FROM claims "
                                    "WHERE stage = ?", (stage,)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None
        return {shard: Claim(*rest) for shard, *rest in rows}

    def try_claim(self, stage: str, shard: int, owner: str, host: str, pid: int, expected: Claim | None) -> bool:
        """Take the shard if its claim is still ``expected`` (None: unclaimed); atomic across processes."""
        try:
            with self._transaction():
                row = self._db.execute("SELECT owner, host, pid, heartbeat, state, message FROM claims "
                                       "WHERE stage = ? AND shard = ?", (stage, shard)).fetchone()
                if (Claim(*row) if row else None) != expected:
                    return False
                now = time.time()
                if expected is None:  # a new stage: drop claims of runs long gone
                    self._db.execute("DELETE FROM claims WHERE heartbeat < ?", (now - CLAIM_RETENTION_S,))
                self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, 'running', NULL)",
                                 (stage, shard, owner, host, pid, now))
                return True
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None

    def finish_claim(self, stage: str, shard: int, owner: str, state: str, message: str | None = None) -> None:
        self._put("UPDATE claims SET state = ?, message = ?, heartbeat = ? WHERE stage = ? AND shard = ? AND owner = ?",
                  [(state, outgoing(message), time.time(), stage, shard, owner)])

    def heartbeat(self, owner: str, pid: int) -> None:
        self._put("UPDATE claims SET heartbeat = ? WHERE owner = ? AND pid = ? AND state = 'running'",
                  [(time.time(), owner, pid)])

    def generated_since(self, moment: float) -> int:
        try:
            return self._db.execute("SELECT COUNT(*) FROM generations WHERE created >= ?", (moment,)).fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None

    def counts(self) -> dict[str, int]:
        return {table: self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("generations", "judgments")}

    def close(self) -> None:
        self._db.close()
