"""Offline SAE training on a run directory's stored activations.

Command:
  python -m arcstream.train_sae --config=configs/train_sae.py \
      --config.run_dir=DIR --config.sites=blocks.11.hook_resid_post

Runtime: ~2 s per 4096-token step per site on a 2-core CPU for d_in 896,
expansion 16, TopK k=64 (the defaults below); milliseconds on a GPU.
Result: `DIR/saes/<site>/{cfg.json,sae_weights.safetensors}` (SAELens layout,
loadable with `sae_lens.SAE.load_from_disk`), `DIR/saes/metrics.jsonl`, and
Orbax checkpoints in `DIR/saes/checkpoints/` (a restarted run resumes).
"""

from ml_collections import config_dict

from arcstream.sae.options import sae_section


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    del arg
    c = config_dict.ConfigDict()
    c.run_dir = ""  # run directory written by `arcstream.run` (a local path or a kvstore URL: file://, gs://, ...)
    c.checkpoint_dir = ""  # Orbax checkpoints; "" = run_dir/saes/checkpoints (set it for memory:// run dirs)
    c.sites = ""  # comma-separated site names; empty = every stored site
    c.seed = 0  # seeds the init and the batch order
    c.checkpoint_every = 1000  # steps between Orbax checkpoints (and at the end)
    c.log_every = 100  # steps between metrics.jsonl records
    c.stop_after_steps = 0  # stop (after a checkpoint) at this step; 0 = run to the end (tests of resume)
    c.model_name = ""  # written into the exports' metadata.model_name when set
    # JAX's persistent compilation cache (a private directory: its entries are trusted code). A run
    # with the same shapes skips XLA compilation (~15 s of a cold 2-core CPU start); "" = off.
    c.compilation_cache_dir = "~/.cache/arcstream/jax"

    # The SAE: architecture, width, sparsity, optimiser, schedule, batch. Every key, its default and its
    # meaning is in arcstream/sae/options.py (SAELens names), e.g. --config.sae.architecture=jumprelu,
    # --config.sae.k=32, --config.sae.sweep="k=32,64,128", --config.sae.train_tokens=5_000_000.
    c.sae = sae_section("train_sae")
    return c
