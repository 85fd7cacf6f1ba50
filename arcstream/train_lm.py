"""Train a small ARC language model: python -m arcstream.train_lm --config=configs/train_lm.py

Flags only; the work is `arcstream.lm.train.train` over the checked options
(`arcstream.lm.options.TrainLMOptions`, every key documented there; configs/train_lm.py).
It resumes from `output_dir/checkpoints` when rerun.
"""

from __future__ import annotations

from arcstream import cli


def check(config):
    # Imported here, not at the top: `--help` and flag errors answer without importing JAX.
    from arcstream.lm.options import TrainLMOptions

    return TrainLMOptions.from_config(config)


def job(options):
    from absl import logging

    from arcstream.lm.train import train

    return train(options, log=logging.info)


if __name__ == "__main__":
    cli.run_job("arcstream train_lm", job, distributed=True, check=check)
