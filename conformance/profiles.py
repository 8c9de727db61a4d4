"""The kit's hypothesis profiles (``parity-dev``, ``parity-ci``, ``parity-nightly``): hypothesis only, no torch."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from conformance.modes import PROFILES


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
