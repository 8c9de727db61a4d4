"""The kit's pytest plugin: options, markers, fixtures and the per-cell summary.

Loaded by the root ``conftest.py`` in a checkout and by the ``pytest11`` entry point when installed.
Every option has an ini twin (``parity_model`` for ``--parity-model`` ...), so a project can pin them in
``pyproject.toml``. State lives on ``config.stash``; nothing is global.

Fixtures for conformance tests: ``cell`` (parametrised over the matrix's selected cells, session scope,
so one engine lives at a time), ``parity_runner`` (engine + reference + prompts for that cell),
``parity_settings`` (the hypothesis profile), ``parity_vocab`` and ``parity_config``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from conformance.profiles import PROFILES
from conformance.spec import TRAINER_SEMANTICS, TrainerSemantics
from conformance.matrix import Cell, MatrixError, load_matrix, select_cells

FIXTURES = Path(__file__).parent / "fixtures"
DEFAULT_MATRIX = FIXTURES / "matrices" / "cpu.toml"
DEFAULT_PROMPTS = FIXTURES / "prompts" / "default.json"

MARKERS = {
    "parity": "conformance test against a real engine (starts engines; select with -m parity)",
    "gpu": "needs a CUDA GPU; skipped with the reason elsewhere",
    "selftest": "the kit's own fault-injection self-tests (start real engines)",
    "family": "family(name): the test family; a cell's `families` key selects which families it runs",
    "golden": "golden-tensor verification of the cell's engine (select with -m golden; record with --parity-record-golden)",
}

_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("model", {"default": "bundled", "help": "model: 'bundled', a variant name or a local HF model directory"}),
    ("matrix", {"default": str(DEFAULT_MATRIX), "help": "config matrix TOML file"}),
    ("cells", {"default": "", "help": "comma-separated cell ids to run (default: all cells of the matrix)"}),
    ("trainer", {"default": "", "help": "what the trainer computes: " + ", ".join(TRAINER_SEMANTICS) + " (default: each cell's own logprobs mode)"}),
    ("trainer-head", {"default": "", "help": "dtype of your trainer's lm_head (float32, bfloat16, float16): flags one-sided precision"}),
    ("profile", {"default": "ci", "help": "hypothesis profile: " + ", ".join(PROFILES)}),
    ("examples", {"default": "", "help": "override the profile's examples per test"}),
    ("shrink", {"default": "true", "help": "shrink failing examples to minimal parameters (false: report the first failure as drawn)"}),
    ("prompts", {"default": str(DEFAULT_PROMPTS), "help": "JSON list of prompt texts"}),
    ("engine", {"default": "", "help": "module:factory building the engine under test, factory(cell, model_path) -> Engine (default: the cell's built-in adapter)"}),
    ("trainer-fn", {"default": "", "help": "module:function giving your trainer's logits, fn(sequences[, model_path]) -> [len(completion), vocab] fp32 per sequence; replaces the HF fp32 reference"}),
    ("results", {"default": "", "help": "append one JSON record per check to this file"}),
    ("device", {"default": "", "help": "reference device (default: cuda when available, else cpu)"}),
    ("repeat", {"default": "1", "help": "run each parity test this many times in one session (fresh hypothesis data each time, engines started once): repeated clean runs for a false-positive rate"}),
    ("cache-dir", {"default": "", "help": "where built model variants are cached (default: pytest's cache)"}),
    ("golden-dir", {"default": "", "help": "golden tensor directory (default: <rootdir>/golden)"}),
]


@dataclass
class ParityConfig:
    """The resolved ``--parity-*`` options of a session."""

    model: str
    matrix: Path
    cells: list[str]
    trainer: TrainerSemantics | None
    trainer_head: str | None
    profile: str
    examples: int | None
    repeat: int
    shrink: bool
    prompts: Path
    results: Path | None
    device_option: str
    """``--parity-device`` as given ('' when not: resolved by :attr:`device`)."""
    cache_dir: Path
    golden_dir: Path = Path("golden")
    record_golden: bool = False
    _cells: list[Cell] | None = field(default=None, repr=False)
    engine_factory: Any = None
    """``--parity-engine``'s factory ``(cell, model_path) -> Engine``; None: the built-in adapters."""
    trainer_fn: Any = None
    """``--parity-trainer-fn``'s function (see :mod:`conformance.trainer`); None: the HF fp32 reference."""
    trainer_fn_name: str = ""
    _device: str = field(default="", repr=False)

    @property
    def device(self) -> str:
        """The reference device: ``--parity-device``, else cuda when available, else cpu (torch is imported
        on first use only, so sessions without engine-backed tests never import it)."""
        if not self._device:
            if self.device_option:
                self._device = self.device_option
            else:
                import torch

                self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def selected_cells(self) -> list[Cell]:
        if self._cells is None:
            self._cells = select_cells(load_matrix(self.matrix), self.cells, str(self.matrix))
        return self._cells


CONFIG_KEY = pytest.StashKey[ParityConfig]()
RECORDER_KEY = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "logprob-parity conformance kit")
    for name, spec in _OPTIONS:
        ini = "parity_" + name.replace("-", "_")
        group.addoption(f"--parity-{name}", dest=ini, default=None, help=spec["help"])
        parser.addini(ini, spec["help"], default=spec["default"])
    group.addoption(
        "--parity-record-golden", dest="parity_record_golden", action="store_const", const="true", default=None,
        help="(re)write the golden tensors of the selected cells, then verify against them",
    )
    parser.addini("parity_record_golden", "record golden tensors (true/false)", default="false")


def _option(config: pytest.Config, name: str) -> str:
    ini = "parity_" + name.replace("-", "_")
    value = config.getoption(ini)
    if value is None:
        value = config.getini(ini)
    return str(value).strip()


def _resolve_config(config: pytest.Config) -> ParityConfig:
    trainer = _option(config, "trainer") or None
    if trainer is not None and trainer not in TRAINER_SEMANTICS:
        raise pytest.UsageError(f"--parity-trainer {trainer!r}: expected one of {', '.join(TRAINER_SEMANTICS)}")
    trainer_head = _option(config, "trainer-head") or None
    if trainer_head is not None and trainer_head not in ("float32", "bfloat16", "float16"):
        raise pytest.UsageError(f"--parity-trainer-head {trainer_head!r}: expected float32, bfloat16 or float16")
    profile = _option(config, "profile")
    if profile not in PROFILES:
        raise pytest.UsageError(f"--parity-profile {profile!r}: expected one of {', '.join(PROFILES)}")
    repeat_text = _option(config, "repeat")
    if not repeat_text.isdigit() or int(repeat_text) < 1:
        raise pytest.UsageError(f"--parity-repeat {repeat_text!r}: expected a positive integer")
    examples_text = _option(config, "examples")
    try:
        examples = int(examples_text) if examples_text else None
    except ValueError:
        raise pytest.UsageError(f"--parity-examples {examples_text!r}: expected an integer") from None
    shrink_text = _option(config, "shrink").lower()
    if shrink_text not in ("true", "false", "1", "0", "yes", "no"):
        raise pytest.UsageError(f"--parity-shrink {shrink_text!r}: expected true or false")
    results = _option(config, "results")
    device = _option(config, "device")
    cache = _option(config, "cache-dir")
    if cache:
        cache_dir = Path(cache)
    elif getattr(config, "cache", None) is not None:
        cache_dir = Path(config.cache.mkdir("parity-models"))
    else:
        cache_dir = config.rootpath / ".parity-cache"
    golden = _option(config, "golden-dir")
    record_golden = _option(config, "record-golden").lower()
    if record_golden not in ("true", "false", "1", "0", "yes", "no"):
        raise pytest.UsageError(f"parity_record_golden {record_golden!r}: expected true or false")
    return ParityConfig(
        engine_factory=_load_spec(config, "engine"),
        trainer_fn=_load_spec(config, "trainer-fn"),
        trainer_fn_name=_option(config, "trainer-fn"),
        model=_option(config, "model"),
        matrix=Path(_option(config, "matrix")),
        cells=[c.strip() for c in _option(config, "cells").split(",") if c.strip()],
        trainer=cast(TrainerSemantics | None, trainer),
        trainer_head=trainer_head,
        profile=profile,
        examples=examples,
        repeat=int(repeat_text),
        shrink=shrink_text in ("true", "1", "yes"),
        prompts=Path(_option(config, "prompts")),
        results=Path(results) if results else None,
        device_option=device,
        cache_dir=cache_dir,
        golden_dir=Path(golden) if golden else config.rootpath / "golden",
        record_golden=record_golden in ("true", "1", "yes"),
    )


def _load_spec(config: pytest.Config, name: str) -> Any:
    """Import a ``module:attribute`` option (one-line usage error when it does not resolve)."""
    from conformance.trainer import SpecError, load_object

    spec = _option(config, name)
    if not spec:
        return None
    try:
        return load_object(spec, f"--parity-{name}")
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None


def _check_model_spec(spec: str, where: str) -> None:
    """Fail fast (without building variants) on a model spec that cannot resolve."""
    from conformance.models import BUNDLED_MODEL, VARIANT_RECIPES

    if spec in VARIANT_RECIPES:
        return
    path = BUNDLED_MODEL if spec == "bundled" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(["bundled", *VARIANT_RECIPES])
        raise pytest.UsageError(
            f"{where}: model {spec!r} not found: {path} is not a directory with config.json "
            f"(use {known} or a local HF model directory)"
        )


def _validate(parity: ParityConfig) -> None:
    """One-line usage errors for a bad matrix, cell selection or prompt file, before any test runs."""
    try:
        parity.selected_cells()
    except MatrixError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not parity.prompts.is_file():
        raise pytest.UsageError(f"--parity-prompts: prompt file not found: {parity.prompts}")


def _validate_models(parity: ParityConfig) -> None:
    """One-line usage errors for model specs; only checked when an engine-backed test was collected."""
    _check_model_spec(parity.model, "--parity-model")
    for cell in parity.selected_cells():
        if cell.model != "bundled":
            _check_model_spec(cell.model, f"{cell.source}: cell {cell.id!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("cell" in getattr(item, "fixturenames", ()) for item in items):
        _validate_models(config.stash[CONFIG_KEY])


def pytest_configure(config: pytest.Config) -> None:
    from conformance.profiles import register_profiles
    from conformance.recorder import Recorder

    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    register_profiles()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parity = _resolve_config(config)
    _validate(parity)
    config.stash[CONFIG_KEY] = parity
    # Versions (and the device, which needs torch) are filled in when an engine-backed test asks for the
    # recorder: a session of unrelated tests in a repo that installs the kit never imports torch.
    recorder = Recorder(results_path=parity.results)
    config.stash[RECORDER_KEY] = recorder
    if parity.results is not None:
        parity.results.parent.mkdir(parents=True, exist_ok=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" not in metafunc.fixturenames:
        return
    parity = metafunc.config.stash[CONFIG_KEY]
    try:
        cells = parity.selected_cells()
    except MatrixError as exc:
        raise pytest.UsageError(str(exc)) from None
    marker = metafunc.definition.get_closest_marker("family")
    family = marker.args[0] if marker is not None and marker.args else None
    params = []
    for cell in cells:
        marks = []
        if not cell.runs(family):
            continue
        if cell.tier == "gpu":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(cell, id=cell.id, marks=marks))
    if not params:
        params = [pytest.param(None, id="no-cell", marks=pytest.mark.skip(reason="no cell of the matrix fits this test"))]
    metafunc.parametrize("cell", params, indirect=True, scope="session")
    if parity.repeat > 1:
        metafunc.parametrize("parity_repeat", range(parity.repeat), ids=[f"rep{i}" for i in range(parity.repeat)], indirect=True)


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def parity_repeat(request: pytest.FixtureRequest) -> int:
    """Which repetition of ``--parity-repeat`` this is (0 without repetition)."""
    return int(getattr(request, "param", 0))


@pytest.fixture(scope="session")
def parity_config(pytestconfig: pytest.Config) -> ParityConfig:
    """The session's resolved ``--parity-*`` options."""
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def parity_recorder(pytestconfig: pytest.Config, parity_config: ParityConfig) -> Any:
    """The session's :class:`~conformance.recorder.Recorder` (versions and device filled in on first use)."""
    from conformance.versions import environment_versions

    recorder = pytestconfig.stash[RECORDER_KEY]
    if not recorder.versions:
        recorder.versions.update(environment_versions(parity_config.device))
    return recorder


@pytest.fixture(scope="session")
def cell(request: pytest.FixtureRequest) -> Cell:
    """The matrix cell under test (session scope: tests are grouped so one engine lives at a time)."""
    value = cast(Cell, request.param)
    if value.tier == "gpu":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"cell {value.id} is a GPU cell (tier 'gpu') and torch.cuda.is_available() is False")
    return value


@pytest.fixture(scope="session")
def parity_models(parity_config: ParityConfig) -> Any:
    """Resolves model specs to directories (variants are built once and cached)."""
    from conformance.models import resolve_model

    resolved: dict[str, Path] = {}

    def resolve(spec: str) -> Path:
        if spec not in resolved:
            try:
                resolved[spec] = resolve_model(spec, parity_config.cache_dir)
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        return resolved[spec]

    return resolve


@pytest.fixture(scope="session")
def parity_model_path(cell: Cell, parity_config: ParityConfig, parity_models: Any) -> Path:
    """The model directory of the current cell (``--parity-model`` unless the cell names its own)."""
    spec = parity_config.model if cell.model == "bundled" else cell.model
    return cast(Path, parity_models(spec))


@pytest.fixture(scope="session")
def parity_references(parity_config: ParityConfig) -> Any:
    """References per model directory, loaded once: the fp32 HF model, or with ``--parity-trainer-fn`` the
    user's trainer function (:class:`~conformance.trainer.TrainerFnReference`, probed once on first use)."""
    from conformance.reference import HFReference, ReferenceError
    from conformance.trainer import TrainerFnError, TrainerFnReference

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            try:
                if parity_config.trainer_fn is not None:
                    reference = TrainerFnReference(parity_config.trainer_fn, path, parity_config.trainer_fn_name)
                    reference.probe()
                    loaded[path] = reference
                else:
                    loaded[path] = HFReference(path, device=parity_config.device)
            except (ReferenceError, TrainerFnError) as exc:
                pytest.fail(str(exc), pytrace=False)
        return loaded[path]

    return get


@pytest.fixture(scope="session")
def parity_tokenizers() -> Any:
    """HF tokenizers per model directory, loaded once."""
    from transformers import AutoTokenizer

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = AutoTokenizer.from_pretrained(path)
        return loaded[path]

    return get


@pytest.fixture(scope="session")
def parity_engine_factory(parity_config: ParityConfig) -> Any:
    """The engine factory ``(cell, model_path) -> Engine``: ``--parity-engine``'s, else the built-in one."""
    if parity_config.engine_factory is not None:
        return parity_config.engine_factory
    from conformance.runner import default_engine_factory

    return default_engine_factory


@pytest.fixture(scope="session")
def parity_engine(cell: Cell, parity_model_path: Path, parity_engine_factory: Any) -> Any:
    """The cell's :class:`~conformance.runner.EngineHandle` (closed when the session moves to another cell)."""
    from conformance.runner import EngineHandle

    handle = EngineHandle(cell, parity_model_path, parity_engine_factory)
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def parity_runner(
    parity_engine: Any,
    parity_model_path: Path,
    parity_config: ParityConfig,
    parity_references: Any,
    parity_tokenizers: Any,
    parity_recorder: Any,
) -> Any:
    """A :class:`~conformance.runner.ParityRunner` for the current cell."""
    from conformance.runner import ParityRunner, PromptSet

    tokenizer = parity_tokenizers(parity_model_path)
    try:
        prompts = PromptSet.load(parity_config.prompts, tokenizer)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    return ParityRunner(
        parity_engine,
        parity_references(parity_model_path),
        prompts,
        trainer=parity_config.trainer,
        recorder=parity_recorder,
        decode=lambda t: tokenizer.decode([t]),
    )


@pytest.fixture(scope="session")
def parity_vocab(parity_model_path: Path, parity_tokenizers: Any, parity_references: Any) -> Any:
    """The :class:`~conformance.strategies.Vocabulary` of the current cell's model."""
    from conformance.strategies import vocabulary_from_tokenizer

    size = parity_references(parity_model_path).vocab_size
    return vocabulary_from_tokenizer(parity_tokenizers(parity_model_path), size)


@pytest.fixture(scope="session")
def parity_settings(parity_config: ParityConfig) -> Any:
    """Hypothesis settings of the selected profile (applied to the suite's tests only)."""
    from hypothesis import settings

    from hypothesis import Phase

    base = settings.get_profile(f"parity-{parity_config.profile}")
    if parity_config.examples is not None:
        base = settings(base, max_examples=parity_config.examples)
    if not parity_config.shrink:
        base = settings(base, phases=[p for p in base.phases if p is not Phase.shrink])
    return base


# -- reporting ----------------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from conformance.report import summary_table

    recorder = config.stash.get(RECORDER_KEY, None)
    if recorder is None or (not recorder.reports and not recorder.engine_failures):
        return
    terminalreporter.section("logprob parity: per-cell summary")
    for line in summary_table(recorder).splitlines():
        terminalreporter.write_line(line)
