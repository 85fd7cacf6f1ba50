"""The run job: capture activations of a model on ARC prompts, store them, train SAEs online.

    python -m arcstream.run --config=configs/default.py [--config.<key>=<value> ...]

Launched the same way on every host of a pod (launch/), where it joins the
cluster first. All the work is `arcstream.stream.loop.run(config)`.
"""

from __future__ import annotations

from arcstream import cli


def main(argv: list[str]) -> None:
    from absl import app, flags

    from arcstream.distributed import maybe_initialize

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
    maybe_initialize()
    cli.log_environment()
    from arcstream.stream.loop import run

    result = run(flags.FLAGS.config)
    import jax

    if jax.process_index() == 0:
        cli.print_summary("arcstream.run", result.summary_rows())


if __name__ == "__main__":
    from absl import app

    cli.define_config_flag()
    app.run(main)
