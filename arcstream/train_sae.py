"""Offline SAE training: python -m arcstream.train_sae --config=configs/train_sae.py --config.run_dir=DIR

Flags only; the work is `arcstream.sae.train_offline`. The activation source is
the run directory's store (`arcstream.store.open_run(DIR)`).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/train_sae.py", lock_config=True)


def open_source(run_dir: str):
    """The run's activation store as an ActivationSource (`.sites`, `.activations(site)`)."""
    from arcstream.store import open_run  # noqa: PLC0415 (the store is wired in at the entry point only)

    return open_run(run_dir)


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    if not config.run_dir:
        raise app.UsageError("--config.run_dir is required (the run directory holding the activation store)")
    logging.info("jax %s, devices %s", jax.__version__, jax.devices())
    from arcstream.sae import summary_lines, train_offline  # noqa: PLC0415

    summary = train_offline(config, open_source(config.run_dir), log=logging.info)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} of {summary['total_steps']} (checkpoint saved)")
        return
    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
