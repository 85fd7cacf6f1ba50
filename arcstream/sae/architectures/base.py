"""The contract every SAE architecture fulfils, and the one training loss built on it (SAELens's).

An architecture is a handful of pure functions over a parameter dict, bundled in an
`Architecture` record and registered by name. As in SAELens (`TrainingSAE.training_forward_pass`),
an architecture provides only

* `encode_with_hidden_pre`: its training-time latents, an `Encoding` (the activations as
  `Latents` blocks, dense or row-sparse, and the pre-activations), and
* `aux_loss`: its named extra loss terms, each already weighted by its coefficient (the
  sweepable scalars in `hp`, SAELens's `get_coefficients`), plus any metrics and updated
  buffers of its own (`AuxTerms`).

`Architecture.loss` does the rest, here and nowhere else: it decodes the blocks, adds the
reconstruction MSE (`mse_loss`), sums the terms, and computes the metrics (`l0`, `fvu`,
`explained_variance`) and the per-latent firing counts. The training loop calls only
`arch.loss(...)`, which returns `(loss, StepOutput)`, so a new architecture never touches the
loop (SAELens's trainer contract).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from arcstream.sae.sparse import gather_dot, segment_sum, selected_preacts, sparse_decode

# SAEConfig.select_dtype: the dtypes the training step's selection matmul may take its inputs in
SELECT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

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
    # The dtype of the training step's dense encoder matmul's inputs, "float32" or "bfloat16" (f32
    # accumulation either way), for architectures whose dense pre-activations only choose the kept latents
    # (topk, batchtopk: `Architecture.sparse_selection`). With "bfloat16" that matmul picks the latents and
    # the kept ones' pre-activations are recomputed in f32 (`kept_preacts`), so the loss, the values and
    # every gradient are f32 for the latents chosen; only ties within bf16 rounding may choose differently.
    # Measured (d_in 896, d_sae 14336, k 64, 4096 tokens, 2-core AVX-512-BF16 CPU): TopK step 1,226 ->
    # 961 ms. Inference encodings (export, analysis) are always f32.
    select_dtype: str = "float32"
    # Where the architecture's kept set does not depend on the encoder's scale (`Architecture.scale_free_selection`:
    # topk, batchtopk, matryoshka_batchtopk, batchtopk_transcoder), multiply the initial encoder by the
    # least-squares factor that best reconstructs the first batch (`fit_encoder_scale` in sae/train.py), instead
    # of starting from the decoder's transpose at full scale, which overshoots: a token keeping n latents gets
    # about n/d_in times its own norm back, and BatchTopK gives a few tokens thousands. Measured
    # (benchmarks/bench_sae.py --whole, d_in 896, 16x, k 64, 163,840 tokens, held-out FVU through SAELens):
    # TopK 0.608 -> 0.520, BatchTopK by its batch rule 1.165 -> 0.647 (SAELens 0.823, 0.895). Ignored elsewhere.
    # The encoder's Adam steps are scaled by the same factor. A short run may lose latents by it: off for the
    # embedded run's online SAEs (stream/options.py run_sae_section, with figures).
    fit_encoder_scale: bool = True

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
        if self.select_dtype not in SELECT_DTYPES:
            raise ValueError(f"SAEConfig.select_dtype={self.select_dtype!r}; expected one of {list(SELECT_DTYPES)}")
        if self.select_dtype != "float32" and not arch.sparse_selection:
            raise ValueError(
                f"SAEConfig.select_dtype={self.select_dtype!r} is for architectures whose dense pre-activations only "
                f"select latents ({sorted(n for n, a in _REGISTRY.items() if a.sparse_selection)}); "
                f"{self.architecture!r} trains through them, so it keeps float32"
            )
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


def check_k(cfg: SAEConfig) -> None:
    """The TopK family's config check (an `Architecture.validate`): k latents must exist."""
    if not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"SAEConfig.k={cfg.k} must be in [1, d_sae={cfg.d_sae}] for {cfg.architecture}")


# ---------------------------------------------------------------- the contract


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
class Latents:
    """One block of a batch's latent activations, in the form the architecture computed them.

    Dense (`idx` None): `acts` [R, K] are latents [start, start + K) of R rows.
    Row-sparse (`idx` [R, K] latent ids): `acts[r, j]` is latent `idx[r, j]`; with `lengths` [R]
    only entries j < lengths[r] count, whatever the rest hold (sparse.py's ragged layout).
    `rows` [R]: the batch rows the block covers; None = every row, in order.
    `fired` [R, K]: which entries count as firing (L0, dead/dense tracking); None = `acts > 0`
    (where they count). An architecture passes it when its selection was decided on other
    values than `acts` (BatchTopK's whole-row tokens), so the counts follow the selection.

    Blocks add up: the reconstruction is b_dec plus every block's decode, and a latent of a
    row is in at most one block.
    """

    acts: jax.Array
    idx: jax.Array | None = None
    start: int = 0
    rows: jax.Array | None = None
    lengths: jax.Array | None = None
    fired: jax.Array | None = None


@dataclass(frozen=True)
class Encoding:
    """What `encode_with_hidden_pre` returns: SAELens's `(feature_acts, hidden_pre)`.

    blocks: the activations as `Latents`, in decode order (the base reports the reconstruction
      after every block, which Matryoshka's prefix losses read).
    pre_bs: [B, d_sae] pre-activations (what AuxK and JumpReLU's L0 read); the TopK family
      passes values only, dense architectures keep their gradient.
    acts_bs: [B, d_sae] the dense activations where the architecture forms them, else None.
    info: by-products of the selection that the architecture's own `aux_loss` reads.
    """

    blocks: tuple[Latents, ...]
    pre_bs: jax.Array
    acts_bs: jax.Array | None = None
    info: dict[str, jax.Array] = field(default_factory=dict)

    @classmethod
    def dense(cls, acts_bs: jax.Array, pre_bs: jax.Array, **info: jax.Array) -> Encoding:
        """Every latent of every row in one dense block."""
        return cls((Latents(acts_bs),), pre_bs, acts_bs, info)


@dataclass(frozen=True)
class StepInput:
    """A batch as `aux_loss` sees it: SAELens's `TrainStepInput` plus the base's reconstruction.

    x_bd: the scaled input; target_bd: what is reconstructed (x_bd itself for an SAE, the
    scaled target site for a transcoder); recon_bd: the reconstruction (b_dec + every block);
    partials: the reconstruction after each block, in order (the last is recon_bd);
    dead_s: [d_sae] bool, or None when no latent is dead (dead-latent terms may skip work);
    hp: the member's sweepable hyperparameters (coefficients included).
    """

    x_bd: jax.Array
    target_bd: jax.Array
    recon_bd: jax.Array
    partials: tuple[jax.Array, ...]
    dead_s: jax.Array | None
    hp: HParams


@dataclass(frozen=True)
class AuxTerms:
    """What `aux_loss` returns: named loss terms (weighted; the base adds them to `mse_loss`),
    metrics logged after the base's, and the architecture's updated buffers."""

    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array] = field(default_factory=dict)
    buffers: dict[str, jax.Array] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """The functions that make an architecture. All are pure and jit/vmap friendly.

    init(key, cfg) -> Params (b_dec zero; the trainer sets it from data)
    init_buffers(cfg) -> Buffers (architecture-specific buffers only)
    encode(params, buffers, x_bd, cfg, hp) -> acts_bs (inference encoding of scaled x)
    encode_with_hidden_pre(params, buffers, x_bd, cfg, hp) -> Encoding (training encoding of scaled x)
    aux_loss(params, buffers, enc, step: StepInput, cfg) -> AuxTerms (the terms besides the MSE)
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
    encode_with_hidden_pre: Callable[..., Encoding]
    aux_loss: Callable[..., AuxTerms]
    constrain: Callable[[Params], Params]
    export: Callable[..., tuple[str, dict[str, jax.Array], dict[str, Any]]]
    # Optional: raises a ValueError for configs this architecture cannot train (SAEConfig.__post_init__).
    validate: Callable[[SAEConfig], None] | None = None
    # A transcoder reconstructs another site: `loss(..., target_bd=y)` gets the scaled target batch,
    # w_dec_sd is [d_sae, d_out], and the trainer reads cfg.input_site and cfg.target_site.
    transcoder: bool = False
    # The training encoding uses the dense pre-activations as values only, to choose the kept latents, and
    # computes the kept ones through `kept_preacts` (so SAEConfig.select_dtype may make that matmul bf16).
    sparse_selection: bool = False
    # The kept set is the same for c * W_enc as for W_enc (c > 0, b_enc = 0) and the kept values scale by c:
    # ReLU'd pre-activations ranked against each other, no fixed threshold (SAEConfig.fit_encoder_scale).
    scale_free_selection: bool = False

    def loss(
        self, params: Params, buffers: Buffers, x_bd: jax.Array, cfg: SAEConfig, hp: HParams,
        dead_s: jax.Array | None, *, target_bd: jax.Array | None = None,
    ) -> tuple[jax.Array, StepOutput]:
        """`(loss, StepOutput)` on scaled x: mse_loss(target, decode(encoding)) + the architecture's terms.

        `target_bd` is what is reconstructed (a transcoder's target site; default x_bd itself).
        `dead_s` [d_sae] bool, or None when no latent is dead.
        """
        y_bd = x_bd if target_bd is None else target_bd
        enc = self.encode_with_hidden_pre(params, buffers, x_bd, cfg, hp)
        partials = decode_blocks(params, enc.blocks, y_bd.shape[0])
        losses = {"mse_loss": mse(y_bd, partials[-1])}
        aux = self.aux_loss(params, buffers, enc, StepInput(x_bd, y_bd, partials[-1], partials, dead_s, hp), cfg)
        losses.update(aux.losses)
        fired_s, l0 = fired_counts(enc.blocks, cfg.d_sae, y_bd.shape[0])
        out = StepOutput(
            loss=sum(losses.values()),
            losses=losses,
            metrics={**reconstruction_metrics(y_bd, partials[-1], l0), **aux.metrics},
            fired_s=fired_s,
            buffers=aux.buffers,
        )
        return out.loss, out


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


def init_params(key: jax.Array, cfg: SAEConfig) -> Params:
    """Unit-norm random decoder rows, encoder = decoder transpose, zero biases (SAELens init)."""
    w_dec_sd = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    w_dec_sd = w_dec_sd / jnp.linalg.norm(w_dec_sd, axis=1, keepdims=True)
    return {
        "w_enc_sd": jnp.copy(w_dec_sd),  # a distinct buffer: the step donates its state
        "b_enc_s": jnp.zeros((cfg.d_sae,), jnp.float32),
        "w_dec_sd": w_dec_sd,
        "b_dec_d": jnp.zeros((cfg.d_in,), jnp.float32),
    }


def no_buffers(cfg: SAEConfig) -> Buffers:
    """`init_buffers` of an architecture without buffers of its own."""
    del cfg
    return {}


def unconstrained(params: Params) -> Params:
    """`constrain` of an architecture whose parameters are free after an update."""
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


def selection_preacts(params: Params, x_bd: jax.Array, cfg: SAEConfig) -> jax.Array:
    """The dense pre-activations [B, d_sae] that choose the kept latents in training: values only (no
    gradient), the matmul's inputs in `cfg.select_dtype` with f32 accumulation.

    The bf16 product is written as a contraction over both operands' last axis: XLA:CPU runs that form
    as a native bf16 dot (AVX-512 BF16), while `x @ w.T` in bf16 is rewritten to an f32 dot on upcast
    copies (measured: 0.37-0.40 s vs 0.62-0.79 s for [4096, 896] x [14336, 896]).
    """
    if cfg.select_dtype == "float32":
        return jax.lax.stop_gradient(preacts(params, x_bd, cfg))
    dt = SELECT_DTYPES[cfg.select_dtype]
    xc_bd = x_bd - params["b_dec_d"] if cfg.apply_b_dec_to_input else x_bd
    pre_bs = jax.lax.dot_general(xc_bd.astype(dt), params["w_enc_sd"].astype(dt), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return jax.lax.stop_gradient(pre_bs + params["b_enc_s"])


def kept_preacts(params: Params, x_bd: jax.Array, idx_bk: jax.Array, vals_bk: jax.Array, cfg: SAEConfig,
                 lengths_b: jax.Array | None = None) -> jax.Array:
    """The kept latents' pre-activations [B, K] with their sparse gradient (sparse.selected_preacts).

    `vals_bk`: their values read from `selection_preacts`; when that matmul ran in bf16 they are
    recomputed in f32 over the kept latents only (`gather_dot`, B * K * d_in multiply-adds), so the
    loss sees exact f32 pre-activations.
    """
    if cfg.select_dtype != "float32":
        xc_bd = x_bd - params["b_dec_d"] if cfg.apply_b_dec_to_input else x_bd
        w_sd, b_s = jax.lax.stop_gradient(params["w_enc_sd"]), jax.lax.stop_gradient(params["b_enc_s"])
        vals_bk = gather_dot(jax.lax.stop_gradient(xc_bd), idx_bk, w_sd, lengths_b) + b_s[idx_bk]
    return selected_preacts(x_bd, params["b_dec_d"], params["w_enc_sd"], params["b_enc_s"], idx_bk, vals_bk,
                            cfg.apply_b_dec_to_input, lengths_b)


def decode(params: Params, acts_bs: jax.Array) -> jax.Array:
    """Dense decoder: acts @ W_dec + b_dec."""
    return acts_bs @ params["w_dec_sd"] + params["b_dec_d"]


def _latent_rows(w_sd: jax.Array, start: int, width: int) -> jax.Array:
    """Rows [start, start + width) of a [d_sae, ...] array (the array itself when that is all of it)."""
    return w_sd if (start, width) == (0, w_sd.shape[0]) else w_sd[start:start + width]


def _decode_block(params: Params, blk: Latents) -> jax.Array:
    """A block's share of the reconstruction, without b_dec: [R, d_out]."""
    if blk.idx is None:
        return blk.acts @ _latent_rows(params["w_dec_sd"], blk.start, blk.acts.shape[1])
    return sparse_decode(blk.acts, blk.idx, params["w_dec_sd"], blk.lengths)


def decode_blocks(params: Params, blocks: tuple[Latents, ...], n_rows: int) -> tuple[jax.Array, ...]:
    """b_dec plus the blocks' decodes, added in order: the reconstruction after every block (the last
    is the whole reconstruction, [n_rows, d_out]). One block over every row decodes as
    `acts @ W_dec + b_dec`; several start from b_dec broadcast to every row."""
    b_dec_d = params["b_dec_d"]
    if len(blocks) == 1 and blocks[0].rows is None:
        return (_decode_block(params, blocks[0]) + b_dec_d,)
    recon = jnp.broadcast_to(b_dec_d, (n_rows,) + b_dec_d.shape)
    out: list[jax.Array] = []
    for blk in blocks:
        part = _decode_block(params, blk)
        recon = recon + part if blk.rows is None else recon.at[blk.rows].add(part)
        out.append(recon)
    return tuple(out)


def fired_counts(blocks: tuple[Latents, ...], d_sae: int, n_rows: int) -> tuple[jax.Array, jax.Array]:
    """(fired_s [d_sae] int32: how many rows each latent fired on, l0: latents fired per row, averaged).

    Counted per row in int32 and averaged once, so L0 is the same number whichever blocks the
    architecture split its activations into.
    """
    fired_s = jnp.zeros((d_sae,), jnp.int32)
    per_row_b = jnp.zeros((n_rows,), jnp.int32)
    for blk in blocks:
        fired = blk.acts > 0 if blk.fired is None else blk.fired
        if blk.lengths is not None and blk.fired is None:
            fired = fired & (jnp.arange(fired.shape[1])[None, :] < blk.lengths[:, None])
        fired = fired.astype(jnp.int32)
        if blk.idx is not None:
            fired_s = fired_s + segment_sum(fired, blk.idx, d_sae)
        elif (blk.start, fired.shape[1]) == (0, d_sae):
            fired_s = fired_s + fired.sum(0)
        else:
            fired_s = fired_s.at[blk.start:blk.start + fired.shape[1]].add(fired.sum(0))
        per_row_b = per_row_b + fired.sum(-1) if blk.rows is None else per_row_b.at[blk.rows].add(fired.sum(-1))
    return fired_s, per_row_b.mean()


def mse(x_bd: jax.Array, x_hat_bd: jax.Array) -> jax.Array:
    """SAELens's mse_loss: squared error summed over d_in, mean over tokens."""
    return jnp.mean(jnp.sum(jnp.square(x_hat_bd - x_bd), axis=-1))


def fvu_and_explained_variance(resid_sq_sum, total_sq_sum):
    """(FVU, explained variance) of a reconstruction: arcstream's one definition, SAELens's.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the sums over the rows (tokens) and
    dimensions, mean(x) the per-dimension mean over the rows; explained variance = 1 - FVU
    (SAELens 6: `1 - per_token_l2_loss.mean() / total_variance.mean()` in training, the same
    in `ExplainedVarianceCalculator`). A reconstruction off by a constant vector therefore
    loses explained variance (the mean is part of what it must reconstruct).

    Plain arithmetic on the two sums, so the batch metrics (jax) and the streaming held-out
    evaluation (numpy float64, analysis/stats.py) both report exactly this; the caller
    guards a zero total.
    """
    fvu = resid_sq_sum / total_sq_sum
    return fvu, 1.0 - fvu


def reconstruction_metrics(x_bd: jax.Array, x_hat_bd: jax.Array, l0: jax.Array) -> dict[str, jax.Array]:
    """l0, fvu and explained variance of one batch (`fvu_and_explained_variance`)."""
    total = jnp.sum(jnp.square(x_bd - x_bd.mean(0)))
    fvu, ev = fvu_and_explained_variance(jnp.sum(jnp.square(x_bd - x_hat_bd)), jnp.maximum(total, 1e-12))
    return {"l0": l0, "fvu": fvu, "explained_variance": ev}


def saelens_weights(params: Params, threshold_s: jax.Array | None = None) -> dict[str, jax.Array]:
    """The export's tensors under SAELens's names (scaled space), + `threshold` [d_sae] for a JumpReLU export."""
    weights = {
        "W_enc": params["w_enc_sd"].T,
        "b_enc": params["b_enc_s"],
        "W_dec": params["w_dec_sd"],
        "b_dec": params["b_dec_d"],
    }
    if threshold_s is not None:
        weights["threshold"] = threshold_s
    return weights


# ---------------------------------------------------------------- sweeps


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
