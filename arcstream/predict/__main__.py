"""`python -m arcstream.predict --config=configs/predict.py [--config.<key>=<value> ...]`.

Only flags and `main`: the work is `arcstream.predict.job.run_predictions(config)`.
"""

from __future__ import annotations

from arcstream import cli


def _job(config):
    from arcstream.predict.job import run_predictions

    return run_predictions(config)


if __name__ == "__main__":
    cli.run_job("arcstream.predict", _job)
