"""Known engine findings: engine bugs the kit has met, recognised by engine, version and symptom.

Two kinds, in ``fixtures/known_findings.toml``:

* ``crash`` (the default): an engine failure (crash, rejected request, a start that cannot succeed)
  whose reason or log tail contains ``match``::

      [[finding]]
      id = "vllm-cpu-seeded-split-prefill"
      engine = "vllm"
      versions = ">=0.32,<0.33"      # PEP 440 specifier of the engine version
      match = "CPU Generator does not use offset"   # substring of the reason or the call's log (or a list: any)
      summary = "..."

  ``fatal = true``: the engine configuration cannot serve *any* request once this happens (e.g. it dies at
  its first request whatever the request): it is not restarted, and the cell's later checks are reported as
  blocked by the finding at once (:meth:`conformance.engines.handle.EngineHandle.block`) instead of costing
  an engine start each.

* ``divergence``: logprobs that break the contract under a sampling-parameter condition, ``when``, a
  small boolean expression over the request's :class:`~conformance.spec.SamplingSpec` fields (a set
  field is true: ``allowed_token_ids``, ``bad_words``; ``len(...)`` counts one), ``tier`` (``cpu`` /
  ``gpu``), ``greedy``, ``rows`` (the sequences of the engine call the check's samples came from: the rows
  of its engine steps at most), ``batch`` (the names of the sampling fields any request of that engine call
  sets: ``'allowed_token_ids' in batch``) and ``env`` (the cell's environment as ``KEY=value`` strings:
  ``'VLLM_USE_V2_MODEL_RUNNER=0' in env``)::

      [[finding]]
      id = "vllm-0.26-triton-topp-masked-rows"
      kind = "divergence"
      engine = "vllm"
      versions = ">=0.26,<0.27"
      when = "tier == 'gpu' and top_p < 1 and min_p > 0"
      reproduction = "docs/findings/vllm-0.26-triton-topp-masked-rows.py"
      summary = "..."

A check a finding covers is still reported (summary table, ``--parity-results``, the failure text names
the finding and its reproduction); the test is marked ``xfail`` with the finding's id instead of failing,
and only for the checks the finding covers: any other failure in the same test fails it as usual.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from conformance.bundled import KNOWN_FINDINGS
from conformance.spec import SamplingSpec

KINDS = ("crash", "divergence")


@dataclass(frozen=True)
class KnownFinding:
    id: str
    engine: str
    versions: str
    summary: str
    match: str | list[str] = ""
    kind: str = "crash"
    when: str = ""
    reproduction: str = ""
    """Path (in the repository) of the standalone reproduction script."""
    fatal: bool = False
    """A crash after which the engine configuration serves nothing (not restarted; later checks blocked)."""

    def applies_to(self, engine: str, version: str | None) -> bool:
        if engine != self.engine or version is None:
            return False
        try:
            return Version(version.split("+")[0]) in SpecifierSet(self.versions)
        except InvalidVersion:
            return False

    def matches(self, engine: str, version: str | None, text: str) -> bool:
        """A ``crash`` finding recognising an engine failure's text."""
        needles = [self.match] if isinstance(self.match, str) else list(self.match)
        return self.kind == "crash" and any(n and n in text for n in needles) and self.applies_to(engine, version)

    def covers(
        self,
        engine: str,
        version: str | None,
        spec: SamplingSpec,
        tier: str,
        rows: int,
        *,
        batch: frozenset[str] = frozenset(),
        env: frozenset[str] = frozenset(),
    ) -> bool:
        """A ``divergence`` finding covering a check of ``spec`` from an engine call of ``rows`` sequences whose
        requests set the sampling fields ``batch``, in a ``tier`` cell with environment ``env``."""
        if self.kind != "divergence" or not self.applies_to(engine, version):
            return False
        names: dict[str, Any] = {f.name: getattr(spec, f.name) for f in fields(spec)}
        names.update(tier=tier, rows=rows, greedy=spec.greedy, batch=batch, env=env)
        return bool(evaluate(self.when, names))

    @property
    def explanation(self) -> str:
        text = f"known engine finding {self.id}: {self.summary}"
        return text + (f" (reproduction: {self.reproduction})" if self.reproduction else "")


_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.Compare,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Eq,
    ast.NotEq,
    ast.In,
    ast.NotIn,
    ast.Tuple,
    ast.List,
    ast.Call,
)


def check_expression(text: str, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``text`` is a ``when`` expression the kit can evaluate."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"{where}: when = {text!r} is not an expression ({exc.msg})") from None
    names = {f.name for f in fields(SamplingSpec)} | {"tier", "rows", "greedy", "batch", "env", "len"}
    for node in ast.walk(tree):
        if not isinstance(node, _NODES) or (
            isinstance(node, ast.Call)
            and not (isinstance(node.func, ast.Name) and node.func.id == "len" and not node.keywords)
        ):
            raise ValueError(f"{where}: when = {text!r} uses {type(node).__name__}, not allowed in a finding condition")
        if isinstance(node, ast.Name) and node.id not in names:
            raise ValueError(
                f"{where}: when = {text!r} names {node.id!r}, not a sampling field, tier, rows, greedy, batch, env or len"
            )


def evaluate(text: str, names: Mapping[str, Any]) -> Any:
    """Evaluate a checked ``when`` expression (comparisons, and/or/not, constants, the given names)."""
    check_expression(text, "finding")
    scope = {**names, "len": lambda value: 0 if value is None else len(value)}
    return eval(compile(ast.parse(text, mode="eval"), "<finding>", "eval"), {"__builtins__": {}}, scope)


def load_known_findings(path: Path = KNOWN_FINDINGS) -> list[KnownFinding]:
    """The registry; a malformed file or entry is a ``ValueError`` naming it."""
    try:
        data = tomllib.loads(path.read_text())
        findings = [KnownFinding(**entry) for entry in data.get("finding", [])]
    except (OSError, tomllib.TOMLDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read known findings: {exc}") from None
    for finding in findings:
        where = f"{path}: finding {finding.id!r}"
        if finding.kind not in KINDS:
            raise ValueError(f"{where}: kind = {finding.kind!r} is not one of {', '.join(KINDS)}")
        if finding.kind == "divergence":
            check_expression(finding.when, where)
        elif not finding.match:
            raise ValueError(f"{where}: a crash finding needs match = the text that recognises it")
        if not isinstance(finding.fatal, bool) or (finding.fatal and finding.kind != "crash"):
            raise ValueError(f"{where}: fatal must be true or false, and only a crash finding can be fatal")
    return findings


def match_finding(
    engine: str, version: str | None, text: str, findings: list[KnownFinding] | None = None
) -> KnownFinding | None:
    """The known crash finding this failure text is, or None."""
    for finding in findings if findings is not None else load_known_findings():
        if finding.matches(engine, version, text):
            return finding
    return None


def covering_finding(
    engine: str,
    version: str | None,
    spec: SamplingSpec,
    tier: str,
    rows: int,
    findings: list[KnownFinding] | None = None,
    *,
    batch: frozenset[str] = frozenset(),
    env: frozenset[str] = frozenset(),
) -> KnownFinding | None:
    """The known divergence finding covering a failed check of ``spec``, or None (see :meth:`KnownFinding.covers`)."""
    for finding in findings if findings is not None else load_known_findings():
        if finding.covers(engine, version, spec, tier, rows, batch=batch, env=env):
            return finding
    return None
