"""The kit's hypothesis profiles (``parity-dev``, ``parity-ci``, ``parity-nightly``): hypothesis only, no torch."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

PROFILES: dict[str, int] = {"dev": 15, "ci": 100, "nightly": 500}
"""Hypothesis profiles of the suite: examples per property."""


def register_profiles() -> None:
    """Register the kit's hypothesis profiles under the names ``parity-<name>`` (idempotent)."""
    for name, examples in PROFILES.items():
        settings.register_profile(
            f"parity-{name}",
            max_examples=examples,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
