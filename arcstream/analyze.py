"""The analysis job: feature statistics, candidate labels, dashboard and report of a stored run.

    python -m arcstream.analyze --config=configs/analyze.py --config.run_dir=DIR

writes DIR/analysis/features.json, DIR/dashboard/index.html, DIR/report.md (+ PNGs in DIR/analysis/) and
prints a one-screen summary. The work is `arcstream.analysis.analyze(config)`.
"""

from __future__ import annotations

from arcstream import cli


def main(argv: list[str]) -> None:
    from absl import app, flags

    from arcstream.analysis import analyze

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
    cli.log_environment()
    result = analyze(flags.FLAGS.config)
    cli.print_summary("arcstream.analyze", result.summary_rows())


if __name__ == "__main__":
    from absl import app

    cli.define_config_flag()
    app.run(main)
