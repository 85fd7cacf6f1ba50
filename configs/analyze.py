"""Config for the analysis job: statistics, labels, dashboard and report of a stored run with SAE exports.

Command (after `python -m arcstream.run --config=configs/default.py --config.output_dir=runs/demo`):

    python -m arcstream.analyze --config=configs/analyze.py --config.run_dir=runs/demo

With SAEs from outside the run (SAELens folders: SAELens's own `save_model` output, a downloaded Gemma
Scope-style SAE, another run's export), each analysed on the stored site its cfg.json's hook_name names:

    python -m arcstream.analyze --config=configs/analyze.py --config.run_dir=runs/demo \
        --config.saes=PATH[,PATH] --config.output_dir=runs/demo/external

A SAELens release downloads once (network and sae_lens needed) into ~/.cache/arcstream/saes, e.g.
`--config.saes=sae_lens:gemma-scope-2b-pt-res-canonical@layer_20/width_16k/canonical`.

JumpReLU thresholds, apply_b_dec_to_input and SAELens's run-time input normalisations (layer_norm,
constant_norm_rescale; expected_average_only_in is folded into the weights when SAELens saves) are applied as
SAELens applies them.

Expected result: runs/demo/analysis/features.json, runs/demo/dashboard/index.html (open it in a browser, from
disk), runs/demo/report.md with PNG plots, and a summary box with, per SAE, the held-out L0 / FVU / explained
variance and the dead, dense and labelled latent counts. Runtime: about a minute per 10^6 rows x 1k latents
on a 2-core CPU (dominated by encoding).
"""

import ml_collections

from arcstream.analysis.config import AnalyzeOptions
from arcstream.options import section_of


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Every key with its default and its meaning: arcstream/analysis/config.py (AnalyzeOptions). The defaults
    # there are this job's (and the run job's `analyze_options`); run_dir is required.
    if arg:
        raise ValueError(f"configs/analyze.py: unknown variant {arg!r}; it has none")
    return section_of(AnalyzeOptions)
