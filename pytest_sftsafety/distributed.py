"""One run over several processes (pytest-xdist workers): GPU pinning, shards of the work claimed
through the result store, and a barrier so that every worker judges the whole run.

Each worker claims the shard with its own index and generates it in one batched pass. A worker that
is done early takes shards nobody has claimed yet; the shard of a worker that died (its process is
gone, or its heartbeat stopped) or failed is taken over and continues from the batches that worker
committed. When every shard is done, each worker reads the whole run from the store, so all of them,
and the controller, reach the same verdicts. Nothing here imports torch or pytest.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, one_line, printable
from .store import Claim, Store
from .suite import Target

HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0  # a claim whose owner has not beaten for this long is taken over
POLL_S = 0.25
# A worker whose shard failed waits for someone else to work on the rest: TAKEOVER_WAIT_S for a waiting
# worker to pick a failed shard up, GIVE_UP_S while a shard is unclaimed (its worker may still be starting).
TAKEOVER_WAIT_S = 3.0
GIVE_UP_S = 30.0

Cell = tuple[int, float]


@dataclass(frozen=True)
class Worker:
    """This process's place in an xdist run."""

    id: str  # gw0, gw1, ... (a replacement for a crashed worker gets a new id)
    index: int
    count: int
    run_uid: str  # one pytest invocation: made by the controller, shared by its workers

    @property
    def owner(self) -> str:
        """This worker's name in the store's claims, unique across runs that share the store."""
        return f"{self.id}@{self.run_uid}"


def worker_from_input(workerinput: Mapping[str, object]) -> Worker:
    worker_id = str(workerinput["workerid"])
    digits = worker_id[2:] if worker_id.startswith("gw") else ""
    # The controller's own id for the run (xdist's testrunuid can be fixed across runs with --testrunuid).
    run_uid = workerinput.get("sftsafety_run") or f"{workerinput.get('testrunuid', '')}:{os.getppid()}"
    return Worker(id=worker_id, index=int(digits) if digits.isdigit() else 0,
                  count=int(workerinput.get("workercount", 1)),  # type: ignore[arg-type]
                  run_uid=str(run_uid))


# -- GPUs ------------------------------------------------------------------------------------------
def visible_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: the caller's mask when set (CUDA
    stops reading it at the first invalid entry such as -1), else one index per NVIDIA device node."""
    environ = os.environ if environ is None else environ
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        devices = []
        for entry in (part.strip() for part in mask.split(",")):
            if not entry or entry.startswith("-"):
                break
            devices.append(entry)
        return devices
    nodes = [p for p in dev.glob("nvidia[0-9]*") if p.name[6:].isdigit()]
    return [str(i) for i in range(len(nodes))]


def gpu_groups(devices: Sequence[str], per_worker: int) -> list[tuple[str, ...]]:
    """Consecutive groups of ``per_worker`` devices; devices left over at the end are not used."""
    return [tuple(devices[i:i + per_worker]) for i in range(0, len(devices) - per_worker + 1, per_worker)]


def check_gpu_workers(devices: Sequence[str], per_worker: int, workers: int) -> list[tuple[str, ...]]:
    """The GPU groups for ``workers`` processes, or a one-line error when the mask has too few devices."""
    groups = gpu_groups(devices, per_worker)
    if workers > len(groups):
        mask = ",".join(devices) if devices else "(none)"
        fits = f"-n {len(groups)} (or -n auto)" if groups else f"--gpus-per-worker {max(1, len(devices))}"
        raise ConfigError(f"{workers} worker(s) x --gpus-per-worker {per_worker} need {workers * per_worker} GPUs, "
                          f"but the visible devices are {mask}; use {fits}, or --device cpu")
    return groups


def pin_worker_specs(specs: Sequence[str], groups: Sequence[tuple[str, ...]]) -> list[str]:
    """xdist's worker specs with each plain ``popen`` worker given its GPU group through execnet's
    ``env:`` option: the variable is set when the worker process starts, before it imports anything, and
    a worker that replaces a crashed one reuses the crashed one's spec, so it gets the same GPUs."""
    pinned, groups_left = [], list(groups)
    for spec in specs:
        if spec == "popen" and groups_left:
            spec = f"popen//env:CUDA_VISIBLE_DEVICES={','.join(groups_left.pop(0))}"
        pinned.append(spec)
    return pinned


def pin_gpus(device: str, backend: str, gpus_per_worker: int, workers: int, specs: Sequence[str]) -> list[str] | None:
    """Choose each process's GPUs (in the xdist controller, or the single process). Under xdist the
    controller writes every worker's group into its worker spec, so the worker process starts with it:
    the new specs are returned. A single process with --gpus-per-worker K takes the first K visible GPUs
    (before anything of this run touches CUDA). None: the specs stay as they are."""
    import sys

    if not device.startswith("cuda") or backend == "openai":
        if gpus_per_worker > 1:
            where = "the server" if backend == "openai" else f"--device {device}"
            raise ConfigError(f"--gpus-per-worker {gpus_per_worker}: this run does not place models on GPUs "
                              f"({where}); drop the option, or run with --device cuda where GPUs are visible")
        return None
    if workers and device != "cuda":
        raise ConfigError(f"--device {device} names one GPU, but with -n each worker gets its own; use --device "
                          f"cuda (or auto) and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if workers:
        return pin_worker_specs(specs, check_gpu_workers(visible_gpus(), gpus_per_worker, workers))
    if gpus_per_worker > 1:
        torch = sys.modules.get("torch")  # only asked whether someone else started CUDA already
        if torch is not None and torch.cuda.is_initialized():
            raise ConfigError("CUDA was initialised before pytest-sftsafety could pick the GPUs for "
                              "--gpus-per-worker (a conftest or plugin used the GPU at import); set "
                              "CUDA_VISIBLE_DEVICES yourself instead")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(check_gpu_workers(visible_gpus(), gpus_per_worker, 1)[0])
    return None


def auto_workers(gpu_group_count: int, cpus: int) -> int:
    """Workers for ``-n auto``: one per GPU group; on CPU one per two cores, since a worker's decode
    loop keeps about two cores busy (see ci/bench_xdist.py)."""
    if gpu_group_count:
        return gpu_group_count
    return max(1, cpus // 2)


def auto_worker_count(device: object, gpus_per_worker: object) -> int | None:
    """Workers for ``-n auto`` from the raw --device and --gpus-per-worker values; None when they are
    not valid (pytest_configure reports that)."""
    from .config import resolved_device

    try:
        per_worker = max(1, int(gpus_per_worker or 1))
    except ValueError:
        return None
    device_name = resolved_device(str(device or "auto"))
    groups = len(gpu_groups(visible_gpus(), per_worker)) if device_name.startswith("cuda") else 0
    return auto_workers(groups, available_cpus())


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


# -- shards ----------------------------------------------------------------------------------------
def shard_cells(cells: Sequence[Cell], cost: Callable[[Cell], int], shards: int) -> list[list[Cell]]:
    """Whole categories (all their temperatures) dealt to at most ``shards`` groups of about equal cost,
    largest first (LPT). Deterministic, so every worker computes the same shards."""
    by_category: dict[int, list[Cell]] = {}
    for cell in cells:
        by_category.setdefault(cell[0], []).append(cell)
    count = max(1, min(shards, len(by_category)))
    loads = [0] * count
    out: list[list[Cell]] = [[] for _ in range(count)]
    for _, group in sorted(by_category.items(), key=lambda kv: (-sum(cost(c) for c in kv[1]), kv[0])):
        target = min(range(count), key=lambda j: (loads[j], j))
        out[target].extend(group)
        loads[target] += sum(cost(c) for c in group)
    return out


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def claimable(claim: Claim | None, host: str, now: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """A shard may be taken when nobody claimed it, its owner failed, or its owner is gone."""
    if claim is None or claim.state == "failed":
        return True
    if claim.state == "done":
        return False
    if claim.host == host:
        # On this host the process table answers, whatever the wall clock does: a clock set forward would
        # age every heartbeat at once and hand a live worker's shard to another.
        return not process_alive(claim.pid)
    return now - claim.heartbeat > stale_after_s  # another host: only its heartbeats tell (clocks in step)


class _Heartbeat:
    """Keeps this worker's running claims fresh from a thread (its own connection), so a long model
    load or batch is not mistaken for a dead worker."""

    def __init__(self, path: Path, owner: str, every_s: float) -> None:
        self._path, self._owner, self._every = path, owner, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sftsafety-heartbeat", daemon=True)

    def _beat(self) -> None:
        from .store import StoreError

        store = None
        try:
            while not self._stop.wait(self._every):
                try:
                    store = store or Store(self._path)
                    store.heartbeat(self._owner, os.getpid())
                except StoreError:
                    continue  # a busy or briefly unreadable store: beat again next time
        finally:
            if store is not None:
                store.close()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ShardRun:
    """What one worker did in a stage: the results of the shards it ran, and the error of a shard it
    failed (which another worker then finished)."""

    results: list
    failure: str | None = None


def _someone_working(claims: Mapping[int, Claim], host: str, now: float, stale_after_s: float) -> bool:
    return any(c.state == "running" and not claimable(c, host, now, stale_after_s) for c in claims.values())


def run_shards(store: Store, stage: str, shards: int, worker: Worker, work: Callable[[int], object],
               poll_s: float = POLL_S, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
               give_up_s: float = GIVE_UP_S, takeover_wait_s: float = TAKEOVER_WAIT_S,
               failed_before: str | None = None) -> ShardRun:
    """Claim and run shards of ``stage`` (own index first, then any claimable one) until every shard is
    done. A shard whose work raises is marked failed for another worker to take over; this worker then
    claims nothing more (its device may be the cause) but waits for the others to finish the stage, and
    re-raises when nobody works on the rest: for ``takeover_wait_s`` when every shard was claimed (all
    workers failed alike), for ``give_up_s`` while a shard is unclaimed. ``failed_before``: this worker
    failed in an earlier stage, so it only waits in this one."""
    from .errors import SftSafetyError

    host, pid = socket.gethostname(), os.getpid()
    order = [(worker.index + k) % shards for k in range(shards)]
    run = ShardRun(results=[])
    error: Exception | None = None if failed_before is None else SftSafetyError(failed_before)
    idle_since: float | None = None
    with _Heartbeat(store.path, worker.owner, heartbeat_s):
        while True:
            claims = store.claims(stage)
            if all(s in claims and claims[s].state == "done" for s in range(shards)):
                return run
            now = time.time()
            if error is not None:
                waited = time.monotonic()  # a wait of this process: immune to clock jumps
                if _someone_working(claims, host, now, stale_after_s):
                    idle_since = None
                elif idle_since is None:
                    idle_since = waited
                elif waited - idle_since > (give_up_s if len(claims) < shards else takeover_wait_s):
                    raise error
                time.sleep(poll_s)
                continue
            shard = next((s for s in order if claimable(claims.get(s), host, now, stale_after_s)), None)
            if shard is None:
                time.sleep(poll_s)
                continue
            if not store.try_claim(stage, shard, worker.owner, host, pid, claims.get(shard)):
                continue  # another worker was quicker
            try:
                run.results.append(work(shard))
            except BaseException as exc:
                run.failure = printable(one_line(f"{type(exc).__name__}: {exc}"))[:500]
                store.finish_claim(stage, shard, worker.owner, "failed", run.failure)
                if not isinstance(exc, Exception):
                    raise  # Ctrl-C and friends stop the worker now
                error = exc
                continue
            store.finish_claim(stage, shard, worker.owner, "done")


# -- what a worker sends to the controller ---------------------------------------------------------


def encode_result(result, nodeids: Mapping[Target, str], verdicts: Mapping[Target, object]) -> dict:
    """A worker's run as plain lists (what xdist can send): outcomes of every cell, its tests in
    collection order, its verdicts (for the controller's cross-check) and its own work."""
    return {
        "cells": [[cell[0], cell[1], r.reference.astype(int).tolist(), r.candidates.astype(int).tolist(), r.toxicity,
                   r.answers, r.pairs, r.identical_pairs] for cell, r in result.cells.items()],
        "coupled": result.coupled,
        "variants": list(result.variants),
        "fingerprints": dict(result.fingerprints),
        "judge_id": result.judge_id,
        "tests": [[target.as_json(), nodeid] for target, nodeid in nodeids.items()],
        "verdicts": [[target.as_json(), getattr(v, "status", None)] for target, v in verdicts.items()],
        "stats": result.stats.to_dict(),
    }


def decode_results(payloads: Sequence[Mapping], prompts) -> tuple[object, list[Target], dict[Target, str]]:
    """The run the workers measured, with their work summed: (RunResult, tests in order, node ids).

    Every worker read the whole run from the store, so their outcomes must agree; a disagreement is a
    bug and raises rather than reporting one worker's view."""
    import numpy as np

    from .errors import SftSafetyError
    from .runner import CellResult, RunResult, RunStats

    first = payloads[0]
    for other in payloads[1:]:
        if other["cells"] != first["cells"] or other["tests"] != first["tests"]:
            raise SftSafetyError("workers measured different outcomes for the same run; re-run without -n and "
                                 "report this as a bug")
    cells = {}
    for category_id, temperature, reference, candidates, toxicity, answers, pairs, identical in first["cells"]:
        cells[(category_id, temperature)] = CellResult(
            category=prompts.suite.category(category_id), temperature=temperature,
            question_ids=[p.question_id for p in prompts.by_category[category_id]],
            reference=np.asarray(reference, dtype=np.int8), candidates=np.asarray(candidates, dtype=np.int8),
            toxicity=toxicity, answers=answers, pairs=pairs, identical_pairs=identical)
    stats = RunStats(generations=first["stats"]["generations"])
    for payload in payloads:
        stats.absorb(RunStats.from_dict(payload["stats"]))
    stats.seconds = max(p["stats"]["seconds"] for p in payloads)  # the workers ran side by side
    tests = [Target.from_json(target) for target, _ in first["tests"]]
    nodeids = {Target.from_json(target): nodeid for target, nodeid in first["tests"]}
    return (RunResult(cells=cells, variants=first["variants"], judge_id=first["judge_id"], stats=stats,
                      fingerprints=first["fingerprints"], coupled=all(p["coupled"] for p in payloads)), tests, nodeids)


def sliced_stage(result, cfg, baseline=None) -> Callable:
    """A ``run_stage`` for ``runner.run_adaptive`` that reads a finished run instead of generating: a
    stage's samples are the first ones of each cell, since a sample's seed depends only on its index."""
    from .runner import CellResult, RunResult, RunStats, samples_of

    def stage(cells: Sequence[Cell], extra_samples: Mapping[Cell, int] | None) -> object:
        out = {}
        for cell in cells:
            full = result.cells[cell]
            n = samples_of(cfg, cell, extra_samples)
            out[cell] = CellResult(category=full.category, temperature=full.temperature,
                                   question_ids=full.question_ids,
                                   reference=full.reference if baseline is not None else full.reference[..., :n],
                                   candidates=full.candidates[..., :n], toxicity=full.toxicity,
                                   answers=None if full.answers is None else
                                   {v: [samples[:n] for samples in rows] for v, rows in full.answers.items()},
                                   pairs=full.pairs, identical_pairs=full.identical_pairs)
        return RunResult(cells=out, variants=result.variants, judge_id=result.judge_id, stats=RunStats(),
                         fingerprints=result.fingerprints, coupled=result.coupled)

    return stage
