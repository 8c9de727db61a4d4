#!/usr/bin/env bash
# The lint checks of `tox -e lint` in the bootstrap venv (scripts/bootstrap.sh installs ruff and mypy with
# the dev extra): ruff rules and formatting over the whole tree, mypy over every directory, and actionlint
# over .github/workflows when it is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if command -v actionlint >/dev/null; then actionlint -color; else echo "lint: actionlint not on PATH, workflows not checked"; fi
