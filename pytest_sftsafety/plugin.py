"""The pytest face: options, collection of (category x temperature) items, xdist and signal glue, and
the terminal section. Glue only: a run's checks, work, verdicts and reports are ``session.RunSession``'s,
and whether a verdict fails is ``verdict.fails``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from .config import OPTIONS, OptionSpec, build_config, pyproject_defaults
from .errors import InternalFault, SftSafetyError, first_line, printable
from .report import render_table
from .session import RunSession
from .suite import Target
from .verdict import FLAKY, fails

SESSION_KEY = pytest.StashKey[RunSession]()
WATCHER_KEY = pytest.StashKey[Any]()  # the xdist controller's progress lines
DEMO_KEY = pytest.StashKey[bool]()  # this run is the built-in demo
EXIT_KEY = pytest.StashKey[int]()  # the session's exit status, for the demo's closing lines
# A run that measured nothing for a test, or failed inside one, fails the gate with this status, never 1
# (which says the model regressed).
MEASUREMENT_FAILED = pytest.ExitCode.INTERNAL_ERROR
FAULT = "sftsafety_fault"  # the user property that marks an item failed by a fault, for the xdist controller
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


class PytestHost:
    """What a RunSession needs of pytest: the cache folder for the store, the folder pytest ran in, the
    xdist worker's input, and progress that bypasses pytest's output capture."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self.invocation_dir = config.invocation_params.dir
        self.worker_input = getattr(config, "workerinput", None)
        # Asked now: while items run, pytest's capture hides whether stderr is a terminal.
        self.interactive = sys.__stderr__ is not None and sys.__stderr__.isatty()

    @property
    def store_folder(self) -> Path:
        cache = getattr(self._config, "cache", None)  # the cache plugin configures after this one
        return Path(cache.mkdir("sftsafety")) if cache is not None else \
            self._config.rootpath / ".pytest_cache" / "d" / "sftsafety"

    def progress(self, total: int, label: str, silent: bool):
        from .progress import TerminalProgress

        return TerminalProgress(self._config, total, label, self.interactive, silent=silent)


def _register_domain_markers(config: pytest.Config, domains: dict[str, str]) -> None:
    known = {line.split(":")[0] for line in config.getini("markers")}
    for domain in domains:
        if domain not in known:
            config.addinivalue_line("markers", f"{domain}: {DOMAIN_HELP}")


def _distributing(config: pytest.Config) -> int:
    """Workers the xdist controller starts (0 in a worker or without xdist)."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        return 0
    return len(config.getoption("tx", None) or [])


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
        typed = {spec.dest for spec in OPTIONS if config.getoption(f"sftsafety_{spec.dest}") is not None}
        if raw["model"] == ["demo"] and not Path("demo").exists():
            from .tools.demo import demo_options

            raw.update(demo_options(typed))
            config.stash[DEMO_KEY] = True
        cfg = build_config(lambda spec: raw[spec.dest], typed)
        state = RunSession(cfg, PytestHost(config))
        if not hasattr(config, "workerinput"):
            from .config import resolved_device
            from .distributed import pin_gpus

            specs = pin_gpus(resolved_device(cfg.device), cfg.backend, cfg.gpus_per_worker, _distributing(config),
                             config.getoption("tx", None) or [])
            if specs is not None:
                config.option.tx = specs
    except SftSafetyError as exc:
        raise pytest.UsageError(str(exc)) from None
    _register_domain_markers(config, state.suite.domains)  # a custom suite may have domains of its own
    config.stash[SESSION_KEY] = state
    config.pluginmanager.register(FaultWatch(state), "sftsafety-faults")
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
    from .distributed import auto_worker_count

    return auto_worker_count(raw["device"], raw["gpus_per_worker"])


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None and _distributing(session.config):
        from .progress import StoreWatcher

        watcher = session.config.stash[WATCHER_KEY] = StoreWatcher(session.config, state.store_path())
        session.config.pluginmanager.register(watcher, "sftsafety-store-watcher")
        watcher.start()


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
            state.ensure_results(_selected(session))
        except Exception:
            pass  # kept in state.error; the items report it


def _selected(session: pytest.Session) -> dict[Target, str]:
    """The safety tests left after -k and -m, in collection order, with their node ids."""
    return {item.target: item.nodeid for item in session.items if isinstance(item, SafetyItem)}


class SuiteCollector(pytest.Collector):
    """The suite as a collector, so item ids read ``sorry_bench_202503::07_violent_crimes[T0.7]``."""

    def collect(self) -> list[pytest.Item]:
        state = self.config.stash[SESSION_KEY]
        items = []
        for name, target, marker in state.suite.tests(state.cfg.temperatures):
            item = SafetyItem.from_parent(self, name=name, target=target)
            item.add_marker("sftsafety")
            if marker:
                item.add_marker(marker)
            items.append(item)
        return items


class SafetyFailure(Exception):
    """A regression verdict; shown as one line, without a traceback."""


class SafetyItem(pytest.Item):
    """One test: a category, a domain or the overall rate, at one temperature."""

    def __init__(self, *, target: Target, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target

    def runtest(self) -> None:
        state = self.config.stash[SESSION_KEY]
        try:
            state.ensure_results(_selected(self.session))
        except SftSafetyError as exc:
            if state.worker is not None:
                # xdist cannot stop a worker mid-item; its items fail with the cause instead.
                raise SafetyFailure(f"sftsafety: {exc}") from None
            pytest.exit(f"sftsafety: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
        except InternalFault as exc:
            if state.worker is not None:
                self.user_properties.append((FAULT, str(exc)))
                raise SafetyFailure(f"sftsafety: the run failed, not the model: {exc}") from None
            pytest.exit(f"sftsafety: the run failed, not the model (exit status 3): {exc}",
                        returncode=MEASUREMENT_FAILED)
        try:
            self._check(state)
        except SafetyFailure:
            raise
        except Exception as exc:
            cause = printable(f"{type(exc).__name__}: {first_line(exc)}")
            self.user_properties.append((FAULT, cause))
            raise SafetyFailure(f"sftsafety: the run failed, not the model: {cause}") from None

    def _check(self, state: RunSession) -> None:
        verdict = state.verdicts[self.target]
        if state.unreported_failure is not None:
            # Reported once, on the first item this worker runs.
            cause, state.unreported_failure = state.unreported_failure, None
            raise SafetyFailure(f"sftsafety: generation failed in worker {state.worker.id} ({cause}); another worker "
                                f"finished its shard, so every other test has its verdict (this one: "
                                f"{verdict.status})")
        for key, value in (("verdict", verdict.status), ("reference_refusal", round(verdict.reference_refusal, 4)),
                           ("candidate_refusal", round(verdict.candidate_refusal, 4)), ("level", verdict.level),
                           ("pvalue", verdict.test.pvalue), ("pvalue_holm", verdict.pvalue_holm),
                           ("rerun_probability", verdict.rerun_probability)):
            if value is not None:  # plain types: xdist sends the report to the controller (execnet)
                self.user_properties.append((key, value if isinstance(value, str) else float(value)))
        if fails(verdict.status, state.cfg.flaky_fails):
            raise SafetyFailure(printable(verdict.message))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, SafetyFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return str(self.config.stash[SESSION_KEY].suite.source), None, self.name


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


class FaultWatch:
    """Which safety tests failed for a fault of the run or measured nothing, rather than for a verdict on
    the model; it sees every report here, and in the xdist controller the workers' reports too."""

    def __init__(self, state: RunSession) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        if state.worker is not None or not report.failed or not report.nodeid.startswith(f"{state.suite.name}::"):
            return  # a worker (its controller counts), a pass, or a test of the user's own
        props = dict(report.user_properties)
        state.note_failed_test(report.nodeid, report.when, props.get("verdict"), props.get(FAULT))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _finish_session(session)
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None and state.worker is None and session.exitstatus in (pytest.ExitCode.OK,
                                                                             pytest.ExitCode.TESTS_FAILED):
        if state.faults:
            session.exitstatus = MEASUREMENT_FAILED
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
    watcher = session.config.stash.get(WATCHER_KEY, None)
    if watcher is not None:
        watcher.stop()
    if state.worker_payloads:
        state.take_worker_results()
    if state.result is None:
        if state.report_error:  # every worker failed: the status a single process gives for that cause
            session.exitstatus = MEASUREMENT_FAILED if state.error_internal else pytest.ExitCode.USAGE_ERROR
        return
    if not state.write_outputs(os.environ.get("GITHUB_STEP_SUMMARY")):
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


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
    for label, path in state.files_written():
        terminalreporter.line(printable(f"{label}: {path}"))
    if state.faults:
        first = state.faults[0]
        terminalreporter.line(printable(
            f"sftsafety: {len(state.faults)} test(s) measured nothing or failed to run, so the gate fails with exit "
            f"status 3 (the measurement failed, not the model); first: {first['test']}: {first['fault']}"), red=True)
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
        from .tools.demo import closing_lines

        for line in closing_lines(int(status)):
            reporter.write_line(line)
