"""Offline SAE training on a run directory's stored activations.

Command:
  python -m arcstream.train_sae --config=configs/train_sae.py \
      --config.run_dir=DIR --config.sites=blocks.11.hook_resid_post

Runtime: ~1.3 s per 4096-token step per site on a 2-core CPU for d_in 896,
expansion 16, TopK k=64 (the defaults below; BatchTopK about the same, from ~1.5 s
in its first steps); 163,840 tokens in ~56 s whole process, 4.7x SAELens's
SAETrainer (benchmarks/bench_sae.py --whole); milliseconds a step on a GPU.
Result: `DIR/saes/<site>/{cfg.json,sae_weights.safetensors}` (SAELens layout,
loadable with `sae_lens.SAE.load_from_disk`), `DIR/saes/metrics.jsonl`, and
Orbax checkpoints in `DIR/saes/train_sae_checkpoints/` (a restarted run resumes; the run
job's own `DIR/saes/checkpoints/` are left alone).
"""

from ml_collections import config_dict

from arcstream.options import section_of
from arcstream.sae.options import TrainSAEOptions


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    # Every key, its default and its meaning: arcstream/sae/options.py (TrainSAEOptions; its `sae` section is
    # SAEOptions's train_sae keys, SAELens names), e.g. --config.sae.architecture=jumprelu, --config.sae.k=32,
    # --config.sae.sweep="k=32,64,128", --config.sae.train_tokens=5_000_000. `run_dir` is required.
    del arg
    return section_of(TrainSAEOptions)
