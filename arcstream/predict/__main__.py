"""`python -m arcstream.predict --config=configs/predict.py [--config.<key>=<value> ...]`.

Only flags and `main`: the work is `arcstream.predict.job.run_predictions` over the checked options
(`PredictJobOptions`, where every key is documented).
"""

from __future__ import annotations

from arcstream import cli


def _check(config):
    # Imported here, not at the top: `--help` and flag errors answer without importing JAX.
    from arcstream.predict.job import PredictJobOptions

    return PredictJobOptions.from_config(config)


def _job(options):
    from arcstream.predict.job import run_predictions

    return run_predictions(options)


if __name__ == "__main__":
    cli.run_job("arcstream.predict", _job, check=_check)
