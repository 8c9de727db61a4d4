"""Command line: ``python -m conformance report RESULTS.jsonl [MORE.jsonl ...] --out DIR``.

Writes ``DIR/report.md`` (the Markdown summary, fit for ``$GITHUB_STEP_SUMMARY``) and PNG plots; with
several results files (oldest first) also a trend plot and table across them. Bad input is a one-line
error and exit status 2; a run with failed checks still writes the report (exit 0) unless
``--fail-on-failure`` is given (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from conformance.report.markdown import markdown_report
    from conformance.report.results import ResultsError, load_run

    try:
        runs = [load_run(Path(p)) for p in args.results]
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "error: the plots need matplotlib: pip install 'logprob-parity[report]' (or pass --no-plots)",
                file=sys.stderr,
            )
            return 2
        from conformance.report.plots import all_plots

        plots = all_plots(runs, out)
    text = markdown_report(runs, plots, out)
    (out / "report.md").write_text(text)
    print(f"wrote {out / 'report.md'}" + "".join(f", {p}" for p in plots))
    failed = any(not r.get("passed", True) for r in runs[-1].checks)
    return 1 if failed and args.fail_on_failure else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description="logprob-parity tools")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="Markdown summary and PNG plots of --parity-results files")
    report.add_argument("results", nargs="+", help="results JSONL files (several: oldest first, for the trend)")
    report.add_argument("--out", required=True, help="output directory (report.md and *.png)")
    report.add_argument("--no-plots", action="store_true", help="only the Markdown summary")
    report.add_argument("--fail-on-failure", action="store_true", help="exit 1 when the latest run has failed checks")
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
