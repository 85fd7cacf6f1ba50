"""The run job: capture activations of a model on ARC prompts, store them, train SAEs online.

    python -m arcstream.run --config=configs/default.py [--config.<key>=<value> ...]

Launched the same way on every host of a pod (launch/), where it joins the
cluster first. All the work is `arcstream.stream.loop.run(config)`.
"""

from __future__ import annotations

from arcstream import cli


def _job(config):
    from arcstream.stream.loop import run

    return run(config)


if __name__ == "__main__":
    cli.run_job("arcstream.run", _job, distributed=True)
