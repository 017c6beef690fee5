"""The result store: content keys, several writing processes, damaged and locked files."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from pytest_sftsafety.store import Store, StoreError, content_key


def test_round_trip_and_stable_keys(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    key = content_key("generation", "fp", 0.7, [1, 2])
    assert key == content_key("generation", "fp", 0.7, [1, 2]) != content_key("generation", "fp", 0.7, [2, 1])
    store.put_generations({key: ("I'm sorry.", 4)})
    store.put_judgments({"j": 0})
    assert store.get_generations([key, "absent"]) == {key: ("I'm sorry.", 4)}
    assert store.get_judgments(["j"]) == {"j": 0}
    store.close()
    assert Store(tmp_path / "s.sqlite").counts() == {"generations": 1, "judgments": 1}


def _writer(path: str, worker: int, batches: int, per_batch: int) -> None:
    store = Store(path)
    for b in range(batches):
        store.put_generations({f"{worker}-{b}-{i}": (f"text {worker} {b} {i}", i) for i in range(per_batch)})
        store.get_generations([f"{worker}-{b}-0"])
    store.close()


def test_concurrent_writers_from_several_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Store(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w, 40, 25)) for w in range(4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(120)
        assert proc.exitcode == 0
    store = Store(path)
    assert store.counts()["generations"] == 4 * 40 * 25
    assert store.get_generations(["3-39-24"]) == {"3-39-24": ("text 3 39 24", 24)}


def _open_together(path: str, start: float) -> str:
    import time

    while time.time() < start:  # line the processes up on the same instant
        pass
    try:
        Store(path).close()
    except StoreError as exc:
        return str(exc)
    return "ok"


def test_processes_creating_a_new_store_together_all_open_it(tmp_path):
    """xdist workers open a store nobody created yet at the same moment; SQLite refuses a concurrent
    switch to WAL at once, without its busy timeout, which once failed one worker in a few runs."""
    import time

    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        for round_ in range(12):
            path = str(tmp_path / f"new-{round_}.sqlite")
            start = time.time() + 0.2
            assert pool.starmap(_open_together, [(path, start)] * 4) == ["ok"] * 4


def test_damaged_file_is_reported_not_replaced(tmp_path):
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"this is not a database, but it may be someone's results" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"is damaged or not a result store .*; move it away \(it may still hold "
                                         r"results\) and run again, or pass --sftsafety-store NEW_PATH"):
        Store(path)
    assert path.read_bytes() == before  # never a silent fresh start


def test_locked_store_names_the_wait(tmp_path):
    path = tmp_path / "store.sqlite"
    Store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=r"stayed locked by another process for 0.3 s; wait for it"):
            Store(path, busy_timeout_s=0.3).put_generations({"k": ("t", 1)})
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_other_format_and_unwritable_place(tmp_path):
    path = tmp_path / "store.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=r"has format 99, this version reads 1; move the file away"):
        Store(path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot create the result store .*a_file/store.sqlite"):
        Store(tmp_path / "a_file" / "store.sqlite")
