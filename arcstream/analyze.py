"""The analysis job: feature statistics, candidate labels, dashboard and report of a stored run.

    python -m arcstream.analyze --config=configs/analyze.py --config.run_dir=DIR

writes DIR/analysis/features.json, DIR/dashboard/index.html, DIR/report.md (+ PNGs in DIR/analysis/) and
prints a one-screen summary. The work is `arcstream.analysis.analyze(config)`.
"""

from __future__ import annotations

from arcstream import cli


def _job(config):
    from arcstream.analysis import analyze

    return analyze(config)


if __name__ == "__main__":
    cli.run_job("arcstream.analyze", _job)
