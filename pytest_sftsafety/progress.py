"""Progress of long generation and judging: a bar on a terminal, a line every 30 s in CI logs,
nothing under ``-q``. Output bypasses pytest's capture, since the work runs inside a test item;
lines go to pytest's terminal writer, the bar to the real stderr."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import Any

LINE_EVERY_S = 30.0


class TerminalProgress:
    def __init__(self, config: Any, total: int, label: str, interactive: bool, silent: bool = False) -> None:
        self.total, self.label = total, label
        self.done = self.tokens = 0
        self.started = self.last_line = time.monotonic()
        capman = config.pluginmanager.getplugin("capturemanager")
        self._uncaptured = capman.global_and_fixture_disabled if capman else nullcontext
        verbosity = config.get_verbosity()
        self.mode = "off" if verbosity < 0 or silent else ("bar" if interactive else "lines")
        self._bar = None
        self._reporter = config.pluginmanager.getplugin("terminalreporter")
        self._printed = -1
        if self.mode == "lines" and self._reporter is not None and total:
            # The work ahead, at once: a long run in a CI log must not stay silent for its first 30 s.
            with self._uncaptured():
                self._reporter.write_line(f"sftsafety {label}: {total} requests to make (a line every "
                                          f"{LINE_EVERY_S:.0f} s)")
        if self.mode == "bar":
            from tqdm import tqdm

            with self._uncaptured():
                self._bar = tqdm(total=total, desc=f"sftsafety {label}", unit="req", file=sys.__stderr__,
                                 dynamic_ncols=True, leave=False)

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return f"{self.tokens / elapsed:.0f} tokens/s" if self.tokens else f"{self.done / elapsed:.1f} req/s"

    def update(self, rows: int, tokens: int = 0) -> None:
        self.done += rows
        self.tokens += tokens
        if self.mode == "bar":
            with self._uncaptured():
                self._bar.set_postfix_str(self._rate(), refresh=False)
                self._bar.update(rows)
        elif self.mode == "lines" and time.monotonic() - self.last_line >= LINE_EVERY_S:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        self._printed = self.done
        if self._reporter is None:
            return
        with self._uncaptured():
            self._reporter.write_line(f"sftsafety {self.label}: {self.done}/{self.total} requests, {self._rate()}")

    def close(self) -> None:
        if self._bar is not None:
            with self._uncaptured():
                self._bar.close()
        elif self.mode == "lines" and self.done and self._printed != self.done:
            self._line()


HEARTBEAT_EVERY_S = 10.0


class Heartbeat:
    """A line every ``every`` seconds while something is built or trained, from a thread of its own, so it
    comes even when one step takes longer than that. The loop being watched sets ``status``."""

    def __init__(self, say: Any, label: str, every: float | None = None) -> None:
        import threading

        self._say, self.label, self.every = say, label, every or HEARTBEAT_EVERY_S
        self.status = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sftsafety-heartbeat", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> Heartbeat:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._say(f"{self.label}: {self.status} ({time.monotonic() - self._started:.0f} s)")


class StoreWatcher:
    """The xdist controller's progress: its workers' items finish only once their shards are stored, so
    while they generate, a line every LINE_EVERY_S says how many answers they have stored so far."""

    def __init__(self, config: Any, store_path: Any) -> None:
        import threading

        self._path = store_path
        self._reporter = config.pluginmanager.getplugin("terminalreporter")
        capman = config.pluginmanager.getplugin("capturemanager")
        self._uncaptured = capman.global_and_fixture_disabled if capman else nullcontext
        self._quiet = config.get_verbosity() < 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sftsafety-progress", daemon=True)

    def start(self) -> None:
        if self._reporter is not None and not self._quiet:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Items finish only once everything is generated; from then on pytest's own progress shows."""
        if report.when == "call":
            self.stop()

    def _watch(self) -> None:
        from pathlib import Path

        from .store import Store, StoreError

        started, wall = time.time(), time.monotonic()
        store = None
        try:
            while not self._stop.wait(LINE_EVERY_S):
                if store is None:
                    if not Path(self._path).is_file():
                        continue
                    store = Store(self._path)
                answers = store.generated_since(started)
                elapsed = max(time.monotonic() - wall, 1e-9)
                if not self._stop.is_set():
                    with self._uncaptured():
                        self._reporter.write_line(f"sftsafety: the workers have stored {answers} new answers "
                                                  f"({answers / elapsed:.1f}/s)")
        except StoreError:
            pass  # the workers report store problems themselves
        finally:
            if store is not None:
                store.close()
