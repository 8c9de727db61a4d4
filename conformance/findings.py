"""Known engine findings: engine bugs the kit has met, recognised by their failure text and version.

An engine failure that matches a known finding is still a finding: it is reported with its reproducing
parameters (summary table, ``--parity-results``), and the dedicated test that provokes it is marked
``xfail`` with the finding's id and summary. It only stops an *unrelated* property from failing for a bug
that is already on record. Entries live in ``fixtures/known_findings.toml``::

    [[finding]]
    id = "vllm-cpu-seeded-split-prefill"
    engine = "vllm"
    versions = ">=0.32,<0.33"      # PEP 440 specifier of the engine version
    match = "CPU Generator does not use offset"   # substring of the reason or log tail (or a list: any)
    summary = "..."
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from conformance.bundled import KNOWN_FINDINGS


@dataclass(frozen=True)
class KnownFinding:
    id: str
    engine: str
    versions: str
    match: str | list[str]
    summary: str

    def matches(self, engine: str, version: str | None, text: str) -> bool:
        needles = [self.match] if isinstance(self.match, str) else list(self.match)
        if engine != self.engine or not any(n in text for n in needles) or version is None:
            return False
        try:
            return Version(version.split("+")[0]) in SpecifierSet(self.versions)
        except InvalidVersion:
            return False


def load_known_findings(path: Path = KNOWN_FINDINGS) -> list[KnownFinding]:
    """The registry; a malformed file is a ``ValueError`` naming it."""
    try:
        data = tomllib.loads(path.read_text())
        return [KnownFinding(**entry) for entry in data.get("finding", [])]
    except (OSError, tomllib.TOMLDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read known findings: {exc}") from None


def match_finding(engine: str, version: str | None, text: str, findings: list[KnownFinding] | None = None) -> KnownFinding | None:
    """The known finding this failure text is, or None."""
    for finding in findings if findings is not None else load_known_findings():
        if finding.matches(engine, version, text):
            return finding
    return None
