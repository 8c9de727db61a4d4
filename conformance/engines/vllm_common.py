"""What the offline and the server vLLM adapters share: the environment, the version, reading the log."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conformance.matrix import Cell

BASE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Weight-update tests send callables to the engine process; must be set before it starts.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
CPU_ENV: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
"""The CPU tier's KV cache per engine (GiB): plenty for small models, several engines fit in 24 GB."""


def vllm_version() -> str | None:
    """The installed vLLM version (the ``vllm`` or ``vllm-cpu`` distribution), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def cell_env(cell: Cell) -> dict[str, str]:
    """The environment an engine of ``cell`` runs with on top of the caller's: the kit's base, the CPU
    tier's KV-cache size, then the cell's own ``env`` (a value of '' means: unset that variable)."""
    env = dict(BASE_ENV)
    if cell.tier == "cpu":
        env.update(CPU_ENV)
    env.update(cell.env)
    return env


def root_cause(log_tail: str) -> str:
    """The last ``SomethingError: message`` line of an engine log (the worker's real error), or ''."""
    causes = re.findall(r"\b([A-Z][A-Za-z]*(?:Error|Exception)): (.+)$", log_tail, flags=re.MULTILINE)
    return f"{causes[-1][0]}: {causes[-1][1].strip()}" if causes else ""


def summary(exc: BaseException, limit: int = 300) -> str:
    """One line from an exception's text: its first lines joined (pydantic puts the reason second)."""
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and not line.strip().startswith("For further information")
    ]
    return " | ".join(lines[:2])[:limit]


def read_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ('' when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


LOG_SINCE_LIMIT = 4 << 20
"""At most this many bytes (the last ones) of what an engine printed during one call are kept for matching."""


def log_size(path: Path) -> int:
    """The log file's size now (0 when it cannot be read): a mark for :func:`read_since`."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_since(path: Path, offset: int) -> str:
    """What was appended to a log file after ``offset`` (its last :data:`LOG_SINCE_LIMIT` bytes; '' when it
    cannot be read)."""
    try:
        with open(path, "rb") as log:
            log.seek(max(offset, log_size(path) - LOG_SINCE_LIMIT))
            return log.read().decode(errors="replace")
    except OSError:
        return ""
