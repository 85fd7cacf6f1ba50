"""The run job: capture activations of a model on ARC prompts, store them, train SAEs online.

    python -m arcstream.run --config=configs/default.py [--config.<key>=<value> ...]

Launched the same way on every host of a pod (launch/), where it joins the
cluster first. All the work is `arcstream.stream.loop.run` over the checked options
(`arcstream.stream.options.RunOptions`, where every key is documented).
"""

from __future__ import annotations

from arcstream import cli


def _check(config):
    # Imported here, not at the top: `--help` and flag errors answer without importing JAX.
    from arcstream.stream.options import RunOptions

    return RunOptions.from_config(config)


def _job(options):
    from arcstream.stream.loop import run

    return run(options)


if __name__ == "__main__":
    cli.run_job("arcstream.run", _job, distributed=True, check=_check)
