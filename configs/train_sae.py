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

    c.sae = config_dict.ConfigDict()
    # standard | topk | batchtopk | jumprelu | matryoshka_batchtopk (SAELens names), or a transcoder:
    # batchtopk_transcoder | jumprelu_transcoder (reads sae.input_site, reconstructs sae.target_site)
    c.sae.architecture = "topk"
    c.sae.expansion_factor = 16  # d_sae = expansion_factor * d_in, unless d_sae is set
    c.sae.d_sae = 0  # number of latents; 0 = use expansion_factor
    c.sae.k = 64  # active latents per token (topk; batchtopk on average)
    c.sae.l1_coefficient = 5.0  # standard: decoder-norm-weighted L1 weight
    c.sae.l0_coefficient = 1e-3  # jumprelu: L0 penalty weight
    c.sae.aux_coefficient = 1.0 / 32  # topk/batchtopk: AuxK weight
    c.sae.jumprelu_bandwidth = 0.05  # jumprelu: STE kernel width (scaled units)
    c.sae.jumprelu_init_threshold = 0.01  # jumprelu: initial threshold (scaled units)
    c.sae.dead_steps = 1000  # steps without firing after which a latent counts as dead
    c.sae.b_dec_init = "geometric_median"  # geometric_median | mean | zeros
    c.sae.lr = 3e-4  # peak Adam learning rate
    c.sae.warmup_steps = 100  # linear warm-up steps
    c.sae.decay_fraction = 0.2  # linear decay to 0 over this fraction of the run (at the end)
    c.sae.clip_norm = 1.0  # global gradient-norm clip; 0 disables
    c.sae.batch_size = 4096  # tokens per step (a multiple of chunk_rows)
    c.sae.chunk_rows = 64  # contiguous rows read at once; a batch mixes batch_size/chunk_rows chunks
    c.sae.train_tokens = 50_000_000  # tokens to train on (steps = train_tokens // batch_size)
    c.sae.sweep = ""  # e.g. "k=32,64,128" or "l1_coefficient=1,5;lr=1e-4,3e-4": members zipped, vmapped
    c.sae.matryoshka_widths = ""  # matryoshka_batchtopk: nested prefix widths, e.g. "896,3584,14336" (last = d_sae)
    c.sae.use_matryoshka_aux_loss = False  # matryoshka_batchtopk: AuxK per level on its own residual (SAELens option)
    c.sae.input_site = ""  # transcoders: the site encoded, e.g. blocks.11.hook_resid_mid
    c.sae.target_site = ""  # transcoders: the site reconstructed (same tokens), e.g. blocks.11.hook_mlp_out
    return c
