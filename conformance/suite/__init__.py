"""The conformance tests; run them with ``pytest -m parity`` (checkout) or
``pytest --pyargs conformance.suite -m parity`` (installed)."""
