"""`python -m arcstream.predict --config=configs/predict.py [--config.<key>=<value> ...]`.

Only flags and `main`: the work is `arcstream.predict.job.run_predictions(config)`.
"""

from __future__ import annotations

from arcstream import cli


def main(argv: list[str]) -> None:
    from absl import app, flags

    from arcstream.predict.job import run_predictions

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
    cli.log_environment()
    result = run_predictions(flags.FLAGS.config)
    cli.print_summary("arcstream.predict", result.summary_rows())


if __name__ == "__main__":
    from absl import app

    cli.define_config_flag()
    app.run(main)
