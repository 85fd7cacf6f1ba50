"""SAE architectures (SAELens names): standard, topk, batchtopk, jumprelu; matryoshka.py adds
matryoshka_batchtopk and transcoder.py the transcoders (batchtopk_transcoder, jumprelu_transcoder).

Each architecture is a handful of pure functions over a parameter dict, bundled
in an `Architecture` record and registered by name. The training loop calls only
`arch.loss(...)`, which returns `(loss, StepOutput)`: the loss parts, the
metrics and the per-latent firing counts are the architecture's business, so a
new architecture never touches the loop (SAELens's trainer contract).

Parameter layout (internal; export transposes to SAELens's):
  w_enc_sd [d_sae, d_in]   encoder, one row per latent (rows are what TopK gathers)
  b_enc_s  [d_sae]
  w_dec_sd [d_sae, d_in]   decoder, one row per latent
  b_dec_d  [d_in]
  log_threshold_s [d_sae]  jumprelu only (Gemma Scope parameterisation)
Buffers (not trained): `scale` (inputs are multiplied by it so that
E||x|| = sqrt(d_in)), `steps_since_fired_s`, and `threshold` for batchtopk.

Everything is computed in the scaled space; `export` folds the scale back in.
Hyperparameters that a sweep may vary (k, coefficients, lr) arrive as traced
scalars in `hp`, so members differing only in them stack under `jax.vmap`;
`cfg.k` is then the largest k of the sweep (a static shape).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from arcstream.sae.sparse import segment_sum, selected_preacts, sparse_decode

Params = dict[str, jax.Array]
Buffers = dict[str, jax.Array]
HParams = dict[str, jax.Array]

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
# Fields that members of one sweep may differ in (all others must be equal).
SWEEPABLE = ("k", "l1_coefficient", "l0_coefficient", "aux_coefficient", "lr", "topk_threshold_lr")


@dataclass(frozen=True)
class SAEConfig:
    """One SAE's shape and hyperparameters. Frozen: shared by the step, export and checkpoints."""

    architecture: str  # one of ARCHITECTURES (SAELens names)
    d_in: int  # width of the activations
    d_sae: int  # number of latents
    k: int = 64  # active latents per token (topk) / on average (batchtopk)
    l1_coefficient: float = 5.0  # standard: weight of the decoder-norm-weighted L1 penalty
    l0_coefficient: float = 1e-3  # jumprelu: weight of the L0 penalty
    aux_coefficient: float = 1.0 / 32.0  # topk/batchtopk: weight of AuxK (SAELens default 1.0; TopK paper 1/32)
    jumprelu_bandwidth: float = 0.05  # jumprelu: width of the rectangle kernel of the STE (scaled units)
    jumprelu_init_threshold: float = 0.01  # jumprelu: initial threshold (scaled units)
    topk_threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold
    dead_steps: int = 1000  # a latent not fired for more steps than this is dead
    dense_threshold: float = 0.1  # a latent firing on more than this fraction of a batch is dense
    lr: float = 3e-4  # peak Adam learning rate
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (SAELens default)
    b_dec_init: str = "geometric_median"  # "geometric_median", "mean" or "zeros"
    # matryoshka_batchtopk: the nested prefix widths, strictly increasing, the last = d_sae (matryoshka.py)
    matryoshka_widths: tuple[int, ...] = ()
    use_matryoshka_aux_loss: bool = False  # matryoshka_batchtopk: AuxK per level on that level's residual
    # Transcoders (transcoder.py): the target's width (0 = d_in) and the sites the trainer reads.
    # An SAE leaves them empty (its input site is its spec's key and its target is its input).
    d_out: int = 0
    input_site: str = ""
    target_site: str = ""
    # SAELens's run-time input normalisation, for SAEs loaded from elsewhere (export.NORMALIZATIONS):
    # each token is normalised before encoding and the reconstruction mapped back. arcstream trains with "none".
    normalize_activations: str = "none"

    def __post_init__(self) -> None:
        if self.architecture not in _REGISTRY:
            raise ValueError(
                f"SAEConfig.architecture={self.architecture!r} is unknown; expected one of "
                f"{sorted(_REGISTRY)} (SAELens names)"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"SAEConfig d_in={self.d_in}, d_sae={self.d_sae}: both must be positive")
        # A list would make the config unhashable (it is a static argument of the jitted step).
        object.__setattr__(self, "matryoshka_widths", tuple(int(w) for w in self.matryoshka_widths))
        arch = _REGISTRY[self.architecture]
        if not arch.transcoder and (self.target_site or self.d_out not in (0, self.d_in)):
            raise ValueError(
                f"SAEConfig.architecture={self.architecture!r} is an autoencoder but target_site="
                f"{self.target_site!r}, d_out={self.d_out} were given; use a transcoder architecture "
                f"({sorted(n for n, a in _REGISTRY.items() if a.transcoder)}) or leave them unset"
            )
        if self.matryoshka_widths and self.architecture != "matryoshka_batchtopk":
            raise ValueError(
                f"SAEConfig.matryoshka_widths={self.matryoshka_widths} is set but architecture="
                f"{self.architecture!r}; only matryoshka_batchtopk uses it"
            )
        if arch.validate is not None:
            arch.validate(self)
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"SAEConfig.k={self.k} must be in [1, d_sae={self.d_sae}] for {self.architecture}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"SAEConfig.b_dec_init={self.b_dec_init!r}; expected 'geometric_median', 'mean' or 'zeros'"
            )

    @property
    def d_target(self) -> int:
        """Width of what the SAE reconstructs: d_out for a transcoder, d_in for an autoencoder."""
        return self.d_out or self.d_in

    @property
    def k_aux(self) -> int:
        """AuxK's number of dead latents per token: d_in/2 (TopK paper, appendix B.1)."""
        return max(1, min(self.d_in // 2, self.d_sae))

    def hparams(self) -> HParams:
        """The sweepable hyperparameters as arrays (traced inside the step)."""
        return {
            "k": jnp.asarray(self.k, jnp.int32),
            "l1_coefficient": jnp.asarray(self.l1_coefficient, jnp.float32),
            "l0_coefficient": jnp.asarray(self.l0_coefficient, jnp.float32),
            "aux_coefficient": jnp.asarray(self.aux_coefficient, jnp.float32),
            "lr": jnp.asarray(self.lr, jnp.float32),
            "topk_threshold_lr": jnp.asarray(self.topk_threshold_lr, jnp.float32),
        }


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepOutput:
    """What an architecture's loss reports; the training loop logs whatever arrives.

    loss: the scalar that is differentiated (sum of `losses`).
    losses: named loss terms (`mse_loss`, `l1_loss`, `auxiliary_reconstruction_loss`, `l0_loss`).
    metrics: scalars to log (`l0`, `fvu`, `explained_variance`, ...).
    fired_s: [d_sae] how many tokens of the batch each latent fired on (dead/dense tracking).
    buffers: the architecture's updated non-trained state (e.g. batchtopk's threshold).
    """

    loss: jax.Array
    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    fired_s: jax.Array
    buffers: dict[str, jax.Array] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """The functions that make an architecture. All are pure and jit/vmap friendly.

    init(key, cfg) -> Params (b_dec zero; the trainer sets it from data)
    init_buffers(cfg) -> Buffers (architecture-specific buffers only)
    encode(params, buffers, x_bd, cfg, hp) -> acts_bs (inference encoding of scaled x)
    loss(params, buffers, x_bd, cfg, hp, dead_s) -> (loss, StepOutput) on scaled x;
      dead_s [d_sae] bool, or None when no latent is dead (dead-latent terms may skip work)
    constrain(params) -> params (applied after every update, e.g. unit-norm decoder rows)
    export(params, buffers, cfg, hp) -> (SAELens architecture, {name: array}, extra cfg)
      in the scaled space (the caller folds the scale in).
    validate(cfg) -> None, optional: architecture-specific config checks (clear errors at construction).
    transcoder: the loss also takes `target_bd` (the scaled target site; see transcoder.py).
    """

    name: str
    init: Callable[[jax.Array, SAEConfig], Params]
    init_buffers: Callable[[SAEConfig], Buffers]
    encode: Callable[..., jax.Array]
    loss: Callable[..., tuple[jax.Array, StepOutput]]
    constrain: Callable[[Params], Params]
    export: Callable[..., tuple[str, dict[str, jax.Array], dict[str, Any]]]
    # Optional: raises a ValueError for configs this architecture cannot train (SAEConfig.__post_init__).
    validate: Callable[[SAEConfig], None] | None = None
    # A transcoder reconstructs another site: `loss(..., target_bd=y)` gets the scaled target batch,
    # w_dec_sd is [d_sae, d_out], and the trainer reads cfg.input_site and cfg.target_site.
    transcoder: bool = False


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Make `arch` available by name to configs, the trainer and export."""
    _REGISTRY[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered architecture called `name` (SAELens names)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"SAE architecture {name!r} is unknown; expected one of {sorted(_REGISTRY)}") from None


# ---------------------------------------------------------------- shared pieces


def _init_common(key: jax.Array, cfg: SAEConfig) -> Params:
    """Unit-norm random decoder rows, encoder = decoder transpose, zero biases (SAELens init)."""
    w_dec_sd = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    w_dec_sd = w_dec_sd / jnp.linalg.norm(w_dec_sd, axis=1, keepdims=True)
    return {
        "w_enc_sd": jnp.copy(w_dec_sd),  # a distinct buffer: the step donates its state
        "b_enc_s": jnp.zeros((cfg.d_sae,), jnp.float32),
        "w_dec_sd": w_dec_sd,
        "b_dec_d": jnp.zeros((cfg.d_in,), jnp.float32),
    }


def _no_buffers(cfg: SAEConfig) -> Buffers:
    del cfg
    return {}


def _identity(params: Params) -> Params:
    return params


def unit_norm_decoder(params: Params) -> Params:
    """Rescale decoder rows to unit norm (the constraint of topk and batchtopk)."""
    w = params["w_dec_sd"]
    norm_s1 = jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-8)
    return {**params, "w_dec_sd": w / norm_s1}


def preacts(params: Params, x_bd: jax.Array, cfg: SAEConfig) -> jax.Array:
    """Dense encoder pre-activations [B, d_sae] (the one dense matmul)."""
    xc_bd = x_bd - params["b_dec_d"] if cfg.apply_b_dec_to_input else x_bd
    return xc_bd @ params["w_enc_sd"].T + params["b_enc_s"]


def decode(params: Params, acts_bs: jax.Array) -> jax.Array:
    """Dense decoder: acts @ W_dec + b_dec."""
    return acts_bs @ params["w_dec_sd"] + params["b_dec_d"]


def reconstruction_metrics(x_bd: jax.Array, x_hat_bd: jax.Array, l0: jax.Array) -> dict[str, jax.Array]:
    """l0, fvu (sum of squared residuals over total variance) and explained variance.

    fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch;
    explained_variance = 1 - sum_d Var_b(x - x_hat) / sum_d Var_b(x) (ignores a constant offset).
    """
    resid_bd = x_bd - x_hat_bd
    total = jnp.sum(jnp.square(x_bd - x_bd.mean(0)))
    fvu = jnp.sum(jnp.square(resid_bd)) / jnp.maximum(total, 1e-12)
    ev = 1.0 - jnp.sum(resid_bd.var(0)) / jnp.maximum(jnp.sum(x_bd.var(0)), 1e-12)
    return {"l0": l0, "fvu": fvu, "explained_variance": ev}


def _mse(x_bd: jax.Array, x_hat_bd: jax.Array) -> jax.Array:
    """SAELens's mse_loss: squared error summed over d_in, mean over tokens."""
    return jnp.mean(jnp.sum(jnp.square(x_hat_bd - x_bd), axis=-1))


def _fold_common(params: Params, cfg: SAEConfig) -> dict[str, jax.Array]:
    return {
        "W_enc": params["w_enc_sd"].T,
        "b_enc": params["b_enc_s"],
        "W_dec": params["w_dec_sd"],
        "b_dec": params["b_dec_d"],
    }


# ---------------------------------------------------------------- standard


def _standard_encode(params, buffers, x_bd, cfg, hp):
    del buffers, hp
    return jax.nn.relu(preacts(params, x_bd, cfg))


def _standard_loss(params, buffers, x_bd, cfg, hp, dead_s):
    del dead_s
    acts_bs = _standard_encode(params, buffers, x_bd, cfg, hp)
    x_hat_bd = decode(params, acts_bs)
    mse = _mse(x_bd, x_hat_bd)
    dec_norm_s = jnp.linalg.norm(params["w_dec_sd"], axis=1)
    l1 = hp["l1_coefficient"] * jnp.mean(jnp.sum(jnp.abs(acts_bs * dec_norm_s), axis=-1))
    fired_bs = acts_bs > 0
    out = StepOutput(
        loss=mse + l1,
        losses={"mse_loss": mse, "l1_loss": l1},
        metrics=reconstruction_metrics(x_bd, x_hat_bd, fired_bs.sum(-1).mean()),
        fired_s=fired_bs.sum(0),
    )
    return out.loss, out


def _standard_export(params, buffers, cfg, hp):
    del buffers, hp
    return "standard", _fold_common(params, cfg), {}


register_architecture(
    Architecture("standard", lambda key, cfg: _init_common(key, cfg), _no_buffers, _standard_encode,
                 _standard_loss, _identity, _standard_export)
)


# ---------------------------------------------------------------- topk (+ AuxK)


_TOPK_BLOCK = 16  # entries per block in the two-stage top-k


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis; on long rows in two stages, the same values.

    The row is cut in blocks of `_TOPK_BLOCK`; the k largest entries lie in the k blocks
    with the largest maxima (each has a block max >= itself >= the k-th largest entry >=
    the k-th largest block max), so a top-k of the block maxima, then of those k blocks'
    entries, gives the top-k values exactly (among equal values the index kept may
    differ). Measured: [4096, 14336], k 64: 190 ms instead of 280 ms (XLA:CPU's top-k is
    one thread; the block maxima are a vectorised pass).

    XLA:CPU runs top-k as its fast kernel only for a sort followed by a [0:k) slice: taking
    one column of the result (e.g. `vals[:, -1]`, the k-th value alone) folds into that slice
    and the whole sort runs instead (10 s instead of 0.3 s), so callers read the k-th value
    as `vals.min(axis=-1)`. (An optimization barrier on the outputs also works but aborts
    XLA's SPMD top-k decomposer on a mesh.)
    """
    s, g = x.shape[-1], _TOPK_BLOCK
    if s % g or 4 * k * g > s:
        return jax.lax.top_k(x, k)
    xb = x.reshape(x.shape[:-1] + (s // g, g))
    blk = jax.lax.top_k(xb.max(axis=-1), k)[1]  # the k blocks with the largest maxima
    cand = jnp.take_along_axis(xb, blk[..., None], axis=-2).reshape(x.shape[:-1] + (k * g,))
    vals, j = jax.lax.top_k(cand, k)
    return vals, jnp.take_along_axis(blk, j // g, axis=-1) * g + j % g


def _topk_select(pre_bs: jax.Array, cfg: SAEConfig, hp: HParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top cfg.k values and ids per token, with ranks >= hp['k'] masked (sweeps with smaller k)."""
    vals_bk, idx_bk = top_k(pre_bs, cfg.k)
    keep_k = (jnp.arange(cfg.k) < hp["k"]).astype(pre_bs.dtype)
    return vals_bk, idx_bk, keep_k


def _topk_encode(params, buffers, x_bd, cfg, hp):
    del buffers
    pre_bs = preacts(params, x_bd, cfg)
    vals_bk, idx_bk, keep_k = _topk_select(pre_bs, cfg, hp)
    acts_bk = jax.nn.relu(vals_bk) * keep_k
    rows_b1 = jnp.arange(pre_bs.shape[0])[:, None]
    return jnp.zeros_like(pre_bs).at[rows_b1, idx_bk].set(acts_bk)


# AuxK looks at no more than this many dead latents per step (the candidates): every dead latent
# while at most this many are dead (then AuxK is exact), else those with the largest pre-activation
# in the batch. Fewer dead latents take the small bucket (1/4 of the work).
AUXK_CANDIDATES = (512, 2048)


def auxk_loss(
    params: Params, x_bd: jax.Array, x_hat_bd: jax.Array, pre_bs: jax.Array, dead_s: jax.Array | None,
    cfg: SAEConfig, hp: HParams, sparse: bool = True,
) -> jax.Array:
    """AuxK: the top k_aux *dead* latents reconstruct the residual x - x_hat (TopK paper, A.2).

    As SAELens: the residual is a constant, the aux reconstruction has no b_dec, the
    selected pre-activations are used as they are (no ReLU), k_aux = min(d_in/2, n_dead)
    and the term is scaled by min(n_dead / (d_in/2), 1) * aux_coefficient. Zero when
    nothing is dead, and skipped (`dead_s` None) when the trainer knows that.

    Work only over the dead latents: their ids are gathered (`AUXK_CANDIDATES`), their
    pre-activations recomputed densely for those columns only ([B, n_candidates], with
    their gradient), and the per-token top-k_aux taken among them (no top-k at all when
    at most k_aux are dead). Exact while n_dead <= the largest bucket; beyond it the
    candidates are the dead latents with the largest pre-activation anywhere in the
    batch. `pre_bs`: the batch's pre-activations (values only, no gradient needed).
    `sparse` is accepted for older callers and ignored.
    """
    del sparse
    if dead_s is None:  # the trainer knows that no latent of any member is dead: skip the work
        return jnp.zeros((), x_bd.dtype)
    n_dead = dead_s.sum()
    buckets = sorted({min(c, cfg.d_sae) for c in AUXK_CANDIDATES})
    branches = [lambda c=c: _auxk_over(params, x_bd, x_hat_bd, pre_bs, dead_s, n_dead, cfg, c) for c in buckets]
    if len(branches) == 1:
        recon_mse = branches[0]()
    else:  # the smallest bucket that holds every dead latent (else the largest)
        which = jnp.searchsorted(jnp.asarray(buckets[:-1]), n_dead, side="left")
        recon_mse = jax.lax.switch(which, branches)
    scale = jnp.minimum(n_dead / max(cfg.d_in // 2, 1), 1.0)
    return hp["aux_coefficient"] * scale * recon_mse


def _auxk_over(params, x_bd, x_hat_bd, pre_bs, dead_s, n_dead, cfg: SAEConfig, n_cand: int) -> jax.Array:
    """AuxK's reconstruction MSE over at most `n_cand` dead latents (see auxk_loss)."""
    d_sae = cfg.d_sae
    if n_cand >= d_sae:
        cand_c = jnp.arange(d_sae)
    else:  # dead latents first, the closest to firing first (all of them when n_dead <= n_cand)
        score_s = jnp.where(dead_s, jax.lax.stop_gradient(pre_bs).max(axis=0), -jnp.inf)
        cand_c = top_k(score_s, n_cand)[1]
    live_c = dead_s[cand_c]  # False for fill-ins when fewer are dead
    w_enc_cd = params["w_enc_sd"][cand_c]
    # (x - b_dec) @ W^T as x @ W^T - b_dec @ W^T: b_dec's gradient is then a mat-vec, not a [B, d] matmul
    pre_bc = x_bd @ w_enc_cd.T + params["b_enc_s"][cand_c]
    if cfg.apply_b_dec_to_input:
        pre_bc = pre_bc - params["b_dec_d"] @ w_enc_cd.T
    masked_bc = jnp.where(live_c[None, :], jax.lax.stop_gradient(pre_bc), -jnp.inf)
    k_aux = min(cfg.k_aux, n_cand)
    if k_aux < n_cand:
        def top(m_bc):  # the k_aux largest dead pre-activations of each token
            kth_b1 = top_k(m_bc, k_aux)[0].min(axis=1, keepdims=True)
            return m_bc >= kth_b1

        def every(m_bc):  # at most k_aux dead: all of them
            return jnp.broadcast_to(live_c[None, :], m_bc.shape)

        sel_bc = jax.lax.cond(n_dead > k_aux, top, every, masked_bc) & live_c[None, :]
    else:
        sel_bc = jnp.broadcast_to(live_c[None, :], masked_bc.shape)
    recons_bd = jnp.where(sel_bc, pre_bc, 0.0) @ params["w_dec_sd"][cand_c]
    return _mse(jax.lax.stop_gradient(x_bd - x_hat_bd), recons_bd)


def _topk_loss(params, buffers, x_bd, cfg, hp, dead_s):
    del buffers
    pre_bs = jax.lax.stop_gradient(preacts(params, x_bd, cfg))
    vals_bk, idx_bk, keep_k = _topk_select(pre_bs, cfg, hp)
    sel_bk = selected_preacts(x_bd, params["b_dec_d"], params["w_enc_sd"], params["b_enc_s"], idx_bk, vals_bk,
                              cfg.apply_b_dec_to_input)
    acts_bk = jax.nn.relu(sel_bk) * keep_k
    x_hat_bd = sparse_decode(acts_bk, idx_bk, params["w_dec_sd"]) + params["b_dec_d"]
    mse = _mse(x_bd, x_hat_bd)
    aux = auxk_loss(params, x_bd, x_hat_bd, pre_bs, dead_s, cfg, hp)
    fired_bk = (acts_bk > 0).astype(jnp.int32)
    fired_s = segment_sum(fired_bk, idx_bk, cfg.d_sae)
    out = StepOutput(
        loss=mse + aux,
        losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
        metrics=reconstruction_metrics(x_bd, x_hat_bd, fired_bk.sum(-1).mean()),
        fired_s=fired_s,
    )
    return out.loss, out


def _topk_export(params, buffers, cfg, hp):
    del buffers
    return "topk", _fold_common(params, cfg), {"k": int(hp["k"]), "rescale_acts_by_decoder_norm": False}


register_architecture(
    Architecture("topk", lambda key, cfg: _init_common(key, cfg), _no_buffers, _topk_encode, _topk_loss,
                 unit_norm_decoder, _topk_export)
)


# ---------------------------------------------------------------- batchtopk

# Sparse BatchTopK's tiers (batchtopk_select): every token offers its top 2k activations, the
# 1/8 of the batch's tokens that need it most their top 8k, the 1/64 their whole row.
# Batches of at most BATCHTOPK_DENSE_UP_TO activations (B * S) offer every row whole (small SAEs).
BATCHTOPK_TIERS = (2, 8, 8, 64)
BATCHTOPK_DENSE_UP_TO = 1 << 16


def _batchtopk_train_acts(pre_bs: jax.Array, cfg: SAEConfig, hp: HParams) -> jax.Array:
    """Keep the k*B largest ReLU'd pre-activations of the whole batch (k per token on average).

    The dense definition (one top-k over the flattened batch, SAELens's `BatchTopK`);
    the trainer uses the sparse `batchtopk_select`, which equals it (tests).
    """
    acts_bs = jax.nn.relu(pre_bs)
    b = pre_bs.shape[0]
    top_n = jax.lax.top_k(jax.lax.stop_gradient(acts_bs).reshape(-1), cfg.k * b)[0]
    kth = top_n[hp["k"] * b - 1]
    return jnp.where((acts_bs >= kth) & (acts_bs > 0), acts_bs, 0.0)


def kth_largest(parts: list[jax.Array], n: jax.Array) -> jax.Array:
    """The n-th largest value among the non-negative entries of `parts` (negative entries never count).

    Exact, without sorting: bisection on the float's bits (for x >= 0 the int32 bit
    pattern orders as the value), 31 counting passes over the parts. The parts must
    hold at least n non-negative entries.
    """
    hi0 = jax.lax.bitcast_convert_type(jnp.max(jnp.stack([jnp.max(p) for p in parts])), jnp.int32) + 1

    def count(t):
        return sum(jnp.sum(p >= t, dtype=jnp.int32) for p in parts)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = count(jax.lax.bitcast_convert_type(mid, jnp.float32)) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.zeros((), jnp.int32), jnp.maximum(hi0, 1)))
    # Below the smallest normal float the comparisons flush to zero (XLA:CPU): such a result means 0.
    return jnp.where(lo < 0x00800000, 0.0, jax.lax.bitcast_convert_type(lo, jnp.float32))


def batchtopk_select(pre_bs: jax.Array, k_max: int, k: jax.Array) -> dict[str, Any]:
    """BatchTopK's selection (the k*B largest ReLU'd pre-activations of the batch), sparsely and exactly.

    `pre_bs` [B, S]: values (no gradient). The kept set is every entry >= kth (and > 0),
    kth the (k*B)-th largest of the batch. A token's kept entries are its largest ones,
    and how many varies a lot (planted data at init: median 14, p99 ~650, max ~3,900
    for k = 64), so the tokens are split in three tiers by how far down their
    candidates reach (`BATCHTOPK_TIERS`): every token offers its top 2k; the B/8 tokens
    whose 2k-th is largest offer their top 8k instead; the B/64 largest of those offer
    their whole row. kth is found among the offers by bisection (`kth_largest`), which
    is exact unless more tokens than a tier holds need more than it offers
    (`capped_fraction`, else 0). Returns per tier the token rows, candidate ids and
    values (largest first) and how many of them are kept.
    """
    b, s = pre_bs.shape
    (f1, every2, f2, every3) = BATCHTOPK_TIERS
    c1, c2 = min(s, f1 * k_max), min(s, f2 * k_max)
    h2 = min(b, max(1, b // every2))
    h3 = min(h2, max(1, b // every3))
    if b * s <= BATCHTOPK_DENSE_UP_TO:
        h2 = h3 = b
    # ReLU is monotone: the top of relu(pre) is relu of the top of pre (no [B, S] ReLU pass).
    vals1_bc, idx1_bc = top_k(pre_bs, c1)
    vals1_bc = jax.nn.relu(vals1_bc)
    last1_b = vals1_bc.min(axis=1)  # = vals1_bc[:, -1] (see top_k above)
    rows2_h = top_k(last1_b, h2)[1]  # the tokens whose offer reaches deepest, deepest first
    rows3_h = rows2_h[:h3]
    vals2_hc, idx2_hc = top_k(pre_bs[rows2_h], c2)
    vals2_hc = jax.nn.relu(vals2_hc)
    acts3_hs = jax.nn.relu(pre_bs[rows3_h])
    in2_b = jnp.zeros((b,), bool).at[rows2_h].set(True)
    in3_h = jnp.arange(h2) < h3
    offer1 = jnp.where(in2_b[:, None], -1.0, vals1_bc)  # a token offers in one tier only
    offer2 = jnp.where(in3_h[:, None], -1.0, vals2_hc)
    kth = kth_largest([offer1, offer2, acts3_hs], k * b)
    keep = lambda v: (v >= kth) & (v > 0)  # noqa: E731
    capped = (jnp.sum(~in2_b & keep(last1_b) & (c1 < s))
              + jnp.sum(~in3_h & keep(vals2_hc.min(axis=1)) & (c2 < s)))
    return {
        "tiers": [
            {"rows": None, "idx": idx1_bc, "vals": vals1_bc, "lengths": keep(offer1).sum(axis=1)},
            {"rows": rows2_h, "idx": idx2_hc, "vals": vals2_hc, "lengths": keep(offer2).sum(axis=1)},
        ],
        "rows3": rows3_h, "mask3": keep(acts3_hs), "kth": kth, "capped_fraction": capped / b,
    }


def _batchtopk_encode(params, buffers, x_bd, cfg, hp):
    """Inference: JumpReLU with the learned global threshold (what SAELens exports)."""
    del hp
    pre_bs = preacts(params, x_bd, cfg)
    return jnp.where(pre_bs > buffers["threshold"], jax.nn.relu(pre_bs), 0.0)


def _batchtopk_loss(params, buffers, x_bd, cfg, hp, dead_s):
    """SAELens's BatchTopK loss, computed sparsely: `batchtopk_select` picks the kept entries
    from the dense pre-activations (values only); the first two tiers' reconstruction and
    gradients go through the row-sparse kernels with per-token lengths, the few
    whole-row tokens' through a dense [B/64, S] encode/decode."""
    pre_bs = jax.lax.stop_gradient(preacts(params, x_bd, cfg))
    sel = batchtopk_select(pre_bs, cfg.k, hp["k"])
    x_hat_bd = jnp.broadcast_to(params["b_dec_d"], x_bd.shape)
    fired_s = jnp.zeros((cfg.d_sae,), jnp.int32)
    n_kept, min_pos = jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, x_bd.dtype)
    for tier in sel["tiers"]:
        rows, idx, lengths = tier["rows"], tier["idx"], tier["lengths"]
        x_t = x_bd if rows is None else x_bd[rows]
        acts = jax.nn.relu(selected_preacts(x_t, params["b_dec_d"], params["w_enc_sd"], params["b_enc_s"], idx,
                                            tier["vals"], cfg.apply_b_dec_to_input, lengths))
        part_bd = sparse_decode(acts, idx, params["w_dec_sd"], lengths)
        x_hat_bd = x_hat_bd + part_bd if rows is None else x_hat_bd.at[rows].add(part_bd)
        keep = jnp.arange(idx.shape[1])[None, :] < lengths[:, None]
        fired_s = fired_s + segment_sum(keep.astype(jnp.int32), idx, cfg.d_sae)
        n_kept = n_kept + lengths.sum()
        min_pos = jnp.minimum(min_pos, jnp.min(jnp.where(keep, tier["vals"], jnp.inf)))
    rows3, mask3 = sel["rows3"], sel["mask3"]
    acts3 = jnp.where(mask3, preacts(params, x_bd[rows3], cfg), 0.0)  # dense, with its gradient
    x_hat_bd = x_hat_bd.at[rows3].add(acts3 @ params["w_dec_sd"])
    fired_s = fired_s + mask3.sum(0, dtype=jnp.int32)
    n_kept = n_kept + mask3.sum()
    min_pos = jnp.minimum(min_pos, jnp.min(jnp.where(mask3, jax.nn.relu(pre_bs[rows3]), jnp.inf)))
    mse = _mse(x_bd, x_hat_bd)
    aux = auxk_loss(params, x_bd, x_hat_bd, pre_bs, dead_s, cfg, hp)
    # SAELens: threshold <- (1 - lr) threshold + lr * (smallest positive kept activation).
    lr = hp["topk_threshold_lr"]
    new_threshold = jnp.where(jnp.isfinite(min_pos), (1 - lr) * buffers["threshold"] + lr * min_pos,
                              buffers["threshold"])
    out = StepOutput(
        loss=mse + aux,
        losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
        metrics={**reconstruction_metrics(x_bd, x_hat_bd, n_kept / x_bd.shape[0]), "topk_threshold": new_threshold,
                 "batchtopk_capped_fraction": sel["capped_fraction"]},
        fired_s=fired_s,
        buffers={"threshold": new_threshold},
    )
    return out.loss, out


def _batchtopk_export(params, buffers, cfg, hp):
    del hp
    weights = _fold_common(params, cfg)
    weights["threshold"] = jnp.full((cfg.d_sae,), buffers["threshold"], jnp.float32)
    return "jumprelu", weights, {}


register_architecture(
    Architecture("batchtopk", lambda key, cfg: _init_common(key, cfg),
                 lambda cfg: {"threshold": jnp.zeros((), jnp.float32)}, _batchtopk_encode, _batchtopk_loss,
                 unit_norm_decoder, _batchtopk_export)
)


# ---------------------------------------------------------------- jumprelu (Gemma Scope)


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - threshold). Pseudo-gradient (Gemma Scope): d/dz = H(z - t);
    d/dt = -(t / eps) * rect((z - t) / eps)."""
    return z * (z > threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return z * (z > threshold), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, t, eps = res
    d_t = -(t / eps) * _rectangle((z - t) / eps) * g
    d_t = jnp.sum(d_t.reshape(-1, t.shape[-1]), axis=0)
    return (z > t) * g, d_t, None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step_fn(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - threshold). Pseudo-gradient: d/dz = 0; d/dt = -(1 / eps) * rect((z - t) / eps)."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return (z > threshold).astype(z.dtype), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, t, eps = res
    d_t = -(1.0 / eps) * _rectangle((z - t) / eps) * g
    return jnp.zeros_like(z), jnp.sum(d_t.reshape(-1, t.shape[-1]), axis=0), None


step_fn.defvjp(_step_fwd, _step_bwd)


# SAELens's JumpReLU: decoder rows of norm 0.1 at init (its decoder_init_norm, Anthropic's April 2024
# heuristic; encoder = decoder transpose) and no norm constraint after. With unit-norm rows and the
# 0.01 initial threshold about half the latents fire on every token at init, each adding a unit
# vector, and 40 steps (163,840 tokens) ended at FVU 23.8, L0 6,572 where SAELens reached 0.45
# (benchmarks/bench_sae.py --whole).
JUMPRELU_DECODER_INIT_NORM = 0.1


def _jumprelu_init(key, cfg):
    params = _init_common(key, cfg)
    params["w_dec_sd"] = params["w_dec_sd"] * JUMPRELU_DECODER_INIT_NORM
    params["w_enc_sd"] = params["w_enc_sd"] * JUMPRELU_DECODER_INIT_NORM
    params["log_threshold_s"] = jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), jnp.float32)
    return params


def _jumprelu_encode(params, buffers, x_bd, cfg, hp):
    del buffers, hp
    pre_bs = preacts(params, x_bd, cfg)
    t_s = jnp.exp(params["log_threshold_s"])
    # ReLU then gate, as SAELens's inference JumpReLUSAE (equal to z*H(z-t) for t >= 0).
    return jax.nn.relu(pre_bs) * (pre_bs > t_s)


def _jumprelu_loss(params, buffers, x_bd, cfg, hp, dead_s, *, target_bd=None):
    """MSE of reconstructing `target_bd` (a transcoder's target; default x_bd itself) + the L0 penalty."""
    del buffers, dead_s
    y_bd = x_bd if target_bd is None else target_bd
    pre_bs = preacts(params, x_bd, cfg)
    t_s = jnp.exp(params["log_threshold_s"])
    acts_bs = jumprelu(pre_bs, t_s, cfg.jumprelu_bandwidth)
    y_hat_bd = decode(params, acts_bs)
    mse = _mse(y_bd, y_hat_bd)
    l0_b = jnp.sum(step_fn(pre_bs, t_s, cfg.jumprelu_bandwidth), axis=-1)
    l0_loss = hp["l0_coefficient"] * jnp.mean(l0_b)
    fired_bs = acts_bs > 0
    out = StepOutput(
        loss=mse + l0_loss,
        losses={"mse_loss": mse, "l0_loss": l0_loss},
        metrics=reconstruction_metrics(y_bd, y_hat_bd, fired_bs.sum(-1).mean()),
        fired_s=fired_bs.sum(0),
    )
    return out.loss, out


def _jumprelu_export(params, buffers, cfg, hp):
    del buffers, hp
    weights = _fold_common(params, cfg)
    weights["threshold"] = jnp.exp(params["log_threshold_s"])
    return "jumprelu", weights, {}


register_architecture(
    Architecture("jumprelu", _jumprelu_init, _no_buffers, _jumprelu_encode, _jumprelu_loss, _identity,
                 _jumprelu_export)
)


def sweep_config(members: tuple[SAEConfig, ...] | list[SAEConfig]) -> tuple[SAEConfig, HParams]:
    """Check that sweep members differ only in SWEEPABLE fields; return the static config
    (k = the largest k) and the stacked [M] hyperparameters."""
    members = tuple(members)
    if not members:
        raise ValueError("a site needs at least one SAEConfig; got an empty sweep")
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        for f in dataclasses.fields(SAEConfig):
            if f.name in SWEEPABLE:
                continue
            if getattr(m, f.name) != getattr(first, f.name):
                raise ValueError(
                    f"sweep member {i} has {f.name}={getattr(m, f.name)!r} but member 0 has "
                    f"{getattr(first, f.name)!r}; a sweep may differ only in {SWEEPABLE} (same d_sae)"
                )
    static = dataclasses.replace(first, k=max(m.k for m in members))
    hps = [m.hparams() for m in members]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    return static, stacked


def member_names(members: tuple[SAEConfig, ...] | list[SAEConfig]) -> list[str]:
    """Folder names for sweep members: `m{i}` plus the swept fields that differ, e.g. `m0_k32`."""
    members = tuple(members)
    varying = [f for f in SWEEPABLE if len({getattr(m, f) for m in members}) > 1]
    return ["_".join([f"m{i}"] + [f"{f.split('_')[0]}{getattr(m, f)}" for f in varying])
            for i, m in enumerate(members)]

