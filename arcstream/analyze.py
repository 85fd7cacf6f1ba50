"""The analysis job: feature statistics, candidate labels, dashboard and report of a stored run.

    python -m arcstream.analyze --config=configs/analyze.py --config.run_dir=DIR

writes DIR/analysis/features.json, DIR/dashboard/index.html, DIR/report.md (+ PNGs in DIR/analysis/) and
prints a one-screen summary. Flags only; the work is `arcstream.analysis.analyze` over the checked options
(`arcstream.analysis.config.AnalyzeOptions`, where every key is documented).
"""

from __future__ import annotations

from arcstream import cli


def _check(config):
    # Imported here, not at the top: `--help` and flag errors answer without importing JAX.
    from arcstream.analysis.config import AnalyzeOptions

    return AnalyzeOptions.from_config(config)


def _job(options):
    from arcstream.analysis import analyze

    return analyze(options)


def _lock(config) -> tuple[str, str, bool]:
    """The analysis writes into output_dir, or into the run directory (which it does not create)."""
    if config.get("output_dir"):
        return str(config.output_dir), "--config.output_dir", True
    return str(config.get("run_dir", "") or ""), "--config.run_dir", False


if __name__ == "__main__":
    cli.run_job("arcstream.analyze", _job, lock=_lock, check=_check)
