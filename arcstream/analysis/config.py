"""The analysis job's settings: what `configs/analyze.py` and the run job's `analyze_options` section hold.

One definition for both, so a key added here reaches the standalone job and
the analysis that ends a run.
"""

import ml_collections

from arcstream.model import default_model_options


def default_analyze_config() -> ml_collections.ConfigDict:
    """Every key of the analysis job with its default (configs/analyze.py documents the job)."""
    c = ml_collections.ConfigDict()
    c.run_dir = ""  # the run directory (local path or kvstore URL) (required)
    c.output_dir = ""  # where to write analysis/, dashboard/, report.md (local path or URL); "" = run_dir
    c.sae_dir = ""  # folder of SAELens exports, one sub-folder per site; "" = run_dir/saes
    # SAEs from outside the run, comma-separated SAELens folders (SAELens's own save_model output, a
    # Gemma Scope-style download, another run's export; local or URL) or SAELens releases,
    # sae_lens:RELEASE@SAE_ID (downloaded once, arcstream/sae/pretrained.py): each is analysed on the stored
    # site its cfg.json names (hook_name). "" = the run's own exports under sae_dir.
    c.saes = ""
    c.sites = ""  # comma-separated sites to analyse; "" = every stored site with an SAE export
    c.chunk_rows = 4096  # rows read and encoded at a time (memory ~ chunk_rows x d_sae x 4 bytes)
    c.max_rows = 0  # analyse only the first this-many committed rows; 0 = all
    c.eval_rows = ""  # held-out rows for L0/FVU, 'START:STOP'; "" = the last eval_fraction of the rows
    c.eval_fraction = 0.1  # fraction of rows (at the end) held out when eval_rows is ""
    c.top_k = 16  # top activating tokens kept per latent
    c.dense_density = 0.1  # a latent firing on more than this fraction of rows counts as dense
    c.dashboard_features = 64  # features with a dashboard page (best-labelled first); all get a list row
    c.examples_per_feature = 4  # distinct prompts drawn per feature page
    c.min_phi = 0.3  # a label needs at least this correlation (phi) with its attribute value
    c.invariance_groups = 32  # tasks stored under >= 2 augmentations used to judge invariance; 0 = off
    c.invariance_threshold = 0.5  # mean Jaccard overlap needed to call a feature invariant / equivariant
    c.ce_prompts = 8  # held-out prompts for CE loss recovered (runs the model); 0 = skip (no model needed)
    c.model = ""  # model for CE loss recovered (hub name or local dir); "" = the run's config.json model
    c.model_options = default_model_options()  # .attention of the CE forward: auto | dense | blocked | ...
    c.ce_pad_to = 256  # prompts are padded to a multiple of this many tokens (fewer compiles)
    return c
