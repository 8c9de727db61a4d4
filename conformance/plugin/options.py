"""The ``--parity-*`` options (each with an ini twin) and their validation into a :class:`ParityConfig`.

Every user input is checked here, at configure time, before any engine starts, and a bad one is a single
``pytest.UsageError`` line naming the option: the matrix (keys, values, engine names, cell selection),
the prompt file (readable JSON list of strings), the trainer semantics and head dtype, the profile, the
``module:function`` options (imported now) and the booleans. Model specs are checked when an
engine-backed test is collected (:func:`check_models`), so unrelated sessions never look at them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conformance.ablation import DEFAULT_MAX_CALLS
from conformance.bundled import CPU_MATRIX, DEFAULT_PROMPTS
from conformance.diagnosis import DiagnosisSettings
from conformance.matrix import Cell, MatrixError, load_matrix, select_cells
from conformance.plugin.profiles import PROFILES
from conformance.spec import TRAINER_SEMANTICS, TrainerSemantics

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("model", {"default": "bundled", "help": "model: 'bundled', a variant name or a local HF model directory"}),
    ("matrix", {"default": str(CPU_MATRIX), "help": "config matrix TOML file"}),
    ("cells", {"default": "", "help": "comma-separated cell ids to run (default: all cells of the matrix)"}),
    (
        "trainer",
        {
            "default": "",
            "help": "what the trainer computes: "
            + ", ".join(TRAINER_SEMANTICS)
            + " (default: each cell's own logprobs mode)",
        },
    ),
    (
        "trainer-head",
        {
            "default": "",
            "help": "dtype of your trainer's lm_head (float32, bfloat16, float16): flags one-sided precision",
        },
    ),
    ("profile", {"default": "ci", "help": "hypothesis profile: " + ", ".join(PROFILES)}),
    ("examples", {"default": "", "help": "override the profile's examples per test"}),
    (
        "shrink",
        {
            "default": "true",
            "help": "shrink failing examples to minimal parameters (false: report the first failure as drawn)",
        },
    ),
    ("prompts", {"default": str(DEFAULT_PROMPTS), "help": "JSON list of prompt texts"}),
    (
        "engine",
        {
            "default": "",
            "help": "engine for every cell: a registered engine name or module:factory, factory(cell, model_path) -> Engine (default: each cell's `engine`)",
        },
    ),
    (
        "trainer-fn",
        {
            "default": "",
            "help": "module:function giving your trainer's logits, fn(sequences[, model_path]) -> [len(completion), vocab] fp32 per sequence; replaces the HF fp32 reference",
        },
    ),
    ("results", {"default": "", "help": "append one JSON record per check to this file"}),
    (
        "diagnose",
        {
            "default": "on",
            "help": "on a failing check, re-run it with each sampling parameter reset to find the minimal failing set (on/off; costs nothing on passing checks)",
        },
    ),
    (
        "diagnose-calls",
        {"default": str(DEFAULT_MAX_CALLS), "help": "engine re-runs one failing check's diagnosis may spend"},
    ),
    (
        "repro-dir",
        {
            "default": "",
            "help": "a failing check writes a self-contained upstream reproduction script (vLLM + fp32 HF, no kit import) into this directory",
        },
    ),
    ("device", {"default": "", "help": "reference device (default: cuda when available, else cpu)"}),
    (
        "repeat",
        {
            "default": "1",
            "help": "run each parity test this many times in one session (fresh hypothesis data each time, engines started once): repeated clean runs for a false-positive rate",
        },
    ),
    ("cache-dir", {"default": "", "help": "where built model variants are cached (default: pytest's cache)"}),
    ("golden-dir", {"default": "", "help": "golden tensor directory (default: <rootdir>/golden)"}),
    (
        "findings",
        {"default": "", "help": "known-findings TOML file (default: the kit's own fixtures/known_findings.toml)"},
    ),
    (
        "engines-alive",
        {
            "default": "",
            "help": "engines kept running at once per session (one per engine configuration; the one whose next use is farthest away is stopped: docs/profile-cpu.md); default 3, 2 in a pytest-xdist worker",
        },
    ),
]


def default_engines_alive(environ: Mapping[str, str]) -> str:
    """3 engines alive, 2 in a pytest-xdist worker (or a pytest it started): two workers' pools beside the
    self-tests' own engines peaked at 23.5 of 24 GB on the 2-core CI machine with 3 each."""
    return "2" if environ.get("PYTEST_XDIST_WORKER") else "3"


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


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
    device: str
    """``--parity-device`` as given ('' when not: the session picks cuda when available)."""
    cache_dir: Path | None
    """Where model variants are built (None: pytest's cache directory)."""
    golden_dir: Path = Path("golden")
    record_golden: bool = False
    diagnosis: DiagnosisSettings = field(default_factory=DiagnosisSettings)
    """``--parity-diagnose`` / ``--parity-diagnose-calls`` / ``--parity-repro-dir``: what a failing check does
    before it fails (:mod:`conformance.diagnosis`)."""
    engine: Any = None
    """``--parity-engine``: a registry name or a factory ``(cell, model_path) -> Engine``; None: each cell's."""
    trainer_fn: Any = None
    """``--parity-trainer-fn``'s function (see :mod:`conformance.trainer`); None: the HF fp32 reference."""
    trainer_fn_name: str = ""
    findings: Path | None = None
    """``--parity-findings`` (None: the kit's own known findings)."""
    engines_alive: int = 3
    explicit: bool = False
    """Whether any ``--parity-*`` option or ini key was given (the plugin stays inert otherwise)."""
    _cells: list[Cell] | None = field(default=None, repr=False)

    def selected_cells(self) -> list[Cell]:
        if self._cells is None:
            self._cells = select_cells(load_matrix(self.matrix), self.cells, str(self.matrix))
        return self._cells


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "logprob-parity conformance kit")
    for name, spec in OPTIONS:
        ini = "parity_" + name.replace("-", "_")
        group.addoption(f"--parity-{name}", dest=ini, default=None, help=spec["help"])
        parser.addini(ini, spec["help"], default="")
    group.addoption(
        "--parity-record-golden",
        dest="parity_record_golden",
        action="store_const",
        const="true",
        default=None,
        help="(re)write the golden tensors of the selected cells, then verify against them",
    )
    parser.addini("parity_record_golden", "record golden tensors (true/false; default false)", default="")


_DEFAULTS: dict[str, str] = {name: str(spec["default"]) for name, spec in OPTIONS} | {"record-golden": "false"}


def _option(config: pytest.Config, name: str) -> tuple[str, bool]:
    """The option's value and whether the user gave it (command line or ini)."""
    ini = "parity_" + name.replace("-", "_")
    value = config.getoption(ini)
    if value is not None:
        return str(value).strip(), True
    text = str(config.getini(ini)).strip()  # "" when no ini file sets it (an empty value reads as unset)
    return (text, True) if text else (_DEFAULTS[name], False)


def _boolean(text: str, option: str) -> bool:
    if text.lower() not in _BOOLEANS:
        raise pytest.UsageError(f"{option} {text!r}: expected true or false")
    return _BOOLEANS[text.lower()]


def resolve_config(config: pytest.Config) -> ParityConfig:
    """Read and validate every ``--parity-*`` option; one ``UsageError`` line for the first bad one."""
    values: dict[str, str] = {}
    explicit = False
    for name in [n for n, _ in OPTIONS] + ["record-golden"]:
        values[name], given = _option(config, name)
        explicit = explicit or given
    trainer = values["trainer"] or None
    if trainer is not None and trainer not in TRAINER_SEMANTICS:
        raise pytest.UsageError(f"--parity-trainer {trainer!r}: expected one of {', '.join(TRAINER_SEMANTICS)}")
    trainer_head = values["trainer-head"] or None
    if trainer_head is not None and trainer_head not in ("float32", "bfloat16", "float16"):
        raise pytest.UsageError(f"--parity-trainer-head {trainer_head!r}: expected float32, bfloat16 or float16")
    profile = values["profile"]
    if profile not in PROFILES:
        raise pytest.UsageError(f"--parity-profile {profile!r}: expected one of {', '.join(PROFILES)}")
    repeat = values["repeat"]
    if not repeat.isdigit() or int(repeat) < 1:
        raise pytest.UsageError(f"--parity-repeat {repeat!r}: expected a positive integer")
    alive = values["engines-alive"] or default_engines_alive(os.environ)
    if not alive.isdigit() or int(alive) < 1:
        raise pytest.UsageError(f"--parity-engines-alive {alive!r}: expected a positive integer")
    diagnosis = _diagnosis(values["diagnose"], values["diagnose-calls"], values["repro-dir"])
    from conformance.engines.zygote import ZygoteError, mode

    try:
        mode()  # PARITY_ENGINE_START, read when a CPU engine starts
    except ZygoteError as exc:
        raise pytest.UsageError(str(exc)) from None
    examples = values["examples"]
    if examples and not (examples.isdigit() and int(examples) > 0):
        raise pytest.UsageError(f"--parity-examples {examples!r}: expected a positive integer")
    cache = values["cache-dir"]
    if cache:
        cache_dir: Path | None = Path(cache)
    elif getattr(config, "cache", None) is not None:
        cache_dir = None  # pytest's cache, made when a session first needs it (plugin: parity_session)
    else:
        cache_dir = config.rootpath / ".parity-cache"
    parity = ParityConfig(
        engine=_engine(values["engine"]),
        trainer_fn=_load(values["trainer-fn"], "--parity-trainer-fn"),
        trainer_fn_name=values["trainer-fn"],
        model=values["model"],
        matrix=Path(values["matrix"]),
        cells=[c.strip() for c in values["cells"].split(",") if c.strip()],
        trainer=trainer,
        trainer_head=trainer_head,
        profile=profile,
        examples=int(examples) if examples else None,
        repeat=int(repeat),
        shrink=_boolean(values["shrink"], "--parity-shrink"),
        prompts=Path(values["prompts"]),
        results=Path(values["results"]) if values["results"] else None,
        diagnosis=diagnosis,
        device=values["device"],
        cache_dir=cache_dir,
        golden_dir=Path(values["golden-dir"]) if values["golden-dir"] else config.rootpath / "golden",
        record_golden=_boolean(values["record-golden"], "parity_record_golden"),
        explicit=explicit,
        findings=Path(values["findings"]) if values["findings"] else None,
        engines_alive=int(alive),
    )
    try:
        parity.selected_cells()
    except MatrixError as exc:
        raise pytest.UsageError(str(exc)) from None
    from conformance.findings import load_known_findings
    from conformance.session import SessionError, read_prompt_texts

    try:
        load_known_findings(parity.findings) if parity.findings else load_known_findings()
    except ValueError as exc:
        raise pytest.UsageError(f"--parity-findings: {exc}") from None

    try:
        read_prompt_texts(parity.prompts)
    except SessionError as exc:
        raise pytest.UsageError(f"--parity-prompts: {exc}") from None
    return parity


def _diagnosis(enabled: str, calls: str, repro_dir: str) -> DiagnosisSettings:
    """``--parity-diagnose`` (on/off), ``--parity-diagnose-calls`` (a positive integer) and
    ``--parity-repro-dir`` (a directory, made on the first failure; must not be an existing file)."""
    if enabled.lower() not in _BOOLEANS:
        raise pytest.UsageError(f"--parity-diagnose {enabled!r}: expected on or off")
    if not calls.isdigit() or int(calls) < 1:
        raise pytest.UsageError(f"--parity-diagnose-calls {calls!r}: expected a positive integer")
    directory = Path(repro_dir).expanduser() if repro_dir else None
    if directory is not None and directory.exists() and not directory.is_dir():
        raise pytest.UsageError(f"--parity-repro-dir {repro_dir!r}: exists and is not a directory")
    return DiagnosisSettings(enabled=_BOOLEANS[enabled.lower()], max_calls=int(calls), repro_dir=directory)


def _load(spec: str, option: str) -> Any:
    """Import a ``module:attribute`` option (one-line usage error when it does not resolve)."""
    from conformance.trainer import SpecError, load_object

    if not spec:
        return None
    try:
        return load_object(spec, option)
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None


def _engine(spec: str) -> Any:
    """``--parity-engine``: a registered engine name, or a ``module:factory`` imported now."""
    from conformance.engines.registry import engine_names

    if not spec:
        return None
    if ":" in spec:
        return _load(spec, "--parity-engine")
    if spec not in engine_names():
        raise pytest.UsageError(
            f"--parity-engine {spec!r}: not a registered engine ({', '.join(engine_names())}) and not module:factory"
        )
    return spec


def check_model_spec(spec: str, where: str) -> None:
    """Fail fast (without building variants) on a model spec that cannot resolve."""
    from conformance.bundled import BUNDLED_MODEL
    from conformance.models import VARIANT_RECIPES

    if spec in VARIANT_RECIPES:
        return
    path = BUNDLED_MODEL if spec == "bundled" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(["bundled", *VARIANT_RECIPES])
        raise pytest.UsageError(
            f"{where}: model {spec!r} not found: {path} is not a directory with config.json "
            f"(use {known} or a local HF model directory)"
        )


def check_models(parity: ParityConfig) -> None:
    """One-line usage errors for model specs (only when an engine-backed test was collected)."""
    check_model_spec(parity.model, "--parity-model")
    for cell in parity.selected_cells():
        if cell.model != "bundled":
            check_model_spec(cell.model, f"{cell.source}: cell {cell.id!r}")
