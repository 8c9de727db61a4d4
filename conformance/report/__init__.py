"""What a parity session reports: the records it collected, the per-cell table, the Markdown report, plots.

* :mod:`conformance.report.recorder`: the session's checks and engine failures, and the results file.
* :mod:`conformance.report.results`: reading results files back.
* :mod:`conformance.report.cells`: the one per-cell aggregation (terminal summary and Markdown table).
* :mod:`conformance.report.markdown`, :mod:`conformance.report.plots`: ``python -m conformance report``.
"""
