"""Offline SAE training: python -m arcstream.train_sae --config=configs/train_sae.py --config.run_dir=DIR

Flags only; the work is `arcstream.sae.train_offline`. The activation source is
the run directory's store (`arcstream.store.open_run(DIR)`): only committed
rows, so it also trains on a run still in progress. It holds the run directory's
`.train_sae.lock` (`arcstream.store.lock`): a second train_sae on the same
directory is refused, a capture still running there is not.
"""

from __future__ import annotations

from arcstream import cli


def open_source(run_dir: str):
    """The run's activation store as an ActivationSource (`.sites`, `.activations(site)`)."""
    from arcstream.store import open_run  # the store is wired in at the entry point only (sae knows no store)

    return open_run(run_dir)


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
    config = flags.FLAGS.config
    if not config.run_dir:
        raise app.UsageError("--config.run_dir is required (the run directory holding the activation store)")
    cli.log_environment()
    from arcstream.sae import summary_lines, train_offline
    from arcstream.sae.offline import use_compilation_cache

    cache = use_compilation_cache(str(config.get("compilation_cache_dir", "") or ""))
    if cache:
        logging.info("compilation cache  %s", cache)

    with cli.job_lock(str(config.run_dir), "train_sae", flag="--config.run_dir", create=False):
        summary = train_offline(config, open_source(config.run_dir), log=logging.info)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} of {summary['total_steps']} (checkpoint saved)")
        return
    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    from absl import app

    cli.define_config_flag()
    app.run(main)
