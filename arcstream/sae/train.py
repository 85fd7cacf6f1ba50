"""The SAE training step shared by the online (ring buffer) and offline (store) trainers.

`make_train_step(specs, train_cfg, mesh)` returns one jitted function that
updates the SAEs of every site in a single step:

  state, metrics = step(state, {site: x_nd})

* Sites may differ in d_in and d_sae: the step loops over them in Python
  (one traced program, one dispatch).
* A spec is keyed by its input site (an autoencoder) or by a name
  (`transcoder.transcoder_key`) for a transcoder, which reads `cfg.input_site` and
  reconstructs `cfg.target_site` of the same rows. The batch dict holds every
  site any spec reads (`batch_sites`), all at the same token rows; the online
  trainer samples each ring site at the same indices, the offline one reads
  each site's stored rows with one permutation.
* A site's SAEs are a sweep of M members (M = 1 without a sweep) differing only
  in k / coefficients / lr (SAEConfig.SWEEPABLE): every parameter carries a
  leading [M] axis and the member update is `jax.vmap`ped over it, the batch
  being shared.
* With a mesh (axes ('data', 'model')), d_sae is sharded over 'model' and the
  batch over 'data'; the result equals the unsharded step.
* The batch arrays are consumed where they are (already on device): no host
  round trip, so the online trainer can feed it from the ring buffer.

Optimiser: clip_by_global_norm -> Adam -> (linear warm-up, constant, linear decay
to 0 over the last `decay_steps`; optax schedules, `lr_shape`) x the member's lr;
then the architecture's constraint (unit-norm decoder rows). Dead latents: steps
since a latent last fired, per member; dead = more than `cfg.dead_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arcstream.sae.architectures import (Buffers, HParams, Params, SAEConfig, decode_blocks, get_architecture,
                                        sweep_config)
from arcstream.sae.export import TRAINING_ONLY_BUFFERS

Specs = Mapping[str, Sequence[SAEConfig]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule settings shared by all sites (per-member lr lives in SAEConfig)."""

    total_steps: int  # steps of the whole run (the decay ends here)
    warmup_steps: int = 0  # linear lr warm-up from 0
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps (SAELens lr_decay_steps)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient-norm clip per SAE (0 disables)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"TrainConfig.total_steps={self.total_steps} must be positive")
        if self.warmup_steps < 0 or self.decay_steps < 0 or self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"TrainConfig warmup_steps={self.warmup_steps} + decay_steps={self.decay_steps} must be >= 0 "
                f"and at most total_steps={self.total_steps}"
            )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SiteState:
    """One site's sweep of SAEs; every leaf has a leading [M] member axis."""

    params: Params
    opt_state: optax.OptState
    buffers: Buffers  # scale [M], steps_since_fired_s [M, S], architecture buffers


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    """Everything a resumed run needs besides the data iterator."""

    sites: dict[str, SiteState]
    step: jax.Array  # int32 scalar: completed steps


def lr_shape(train_cfg: TrainConfig) -> optax.Schedule:
    """Multiplier in [0, 1] of the update count c (updates applied before this one), optax pieces joined:

      c < w:            (c + 1) / w        linear warm-up (the first update already moves, at 1/w)
      w <= c < t - d:   1
      t - d <= c < t:   (t - c) / d        linear decay (SAELens's lr_decay_steps)
      t <= c:           0                  (with a decay)

    w = warmup_steps, d = decay_steps, t = total_steps (w + d <= t, so the pieces never overlap;
    w <= 1 or d = 0 leave their piece out). Equal to that closed form within float32 rounding
    (tests/sae/test_train.py checks every step).
    """
    w, d, t = train_cfg.warmup_steps, train_cfg.decay_steps, train_cfg.total_steps
    pieces, boundaries = [], []
    if w > 1:  # (c + 1) / w for c = 0 .. w - 1: from 1/w to 1 over w - 1 steps
        pieces.append(optax.linear_schedule(1.0 / w, 1.0, w - 1))
        boundaries.append(w)
    pieces.append(optax.constant_schedule(1.0))
    if d > 0:
        pieces.append(optax.linear_schedule(1.0, 0.0, d))
        boundaries.append(t - d)
        # Exactly 0 from c = t on: jitted on XLA:CPU the decay's 1 - c / d came out at -1.5e-8 for c >= d
        # (a reversed update), where the closed form clips to 0.
        pieces.append(optax.constant_schedule(0.0))
        boundaries.append(t)
    return optax.join_schedules(pieces, boundaries) if boundaries else pieces[0]


def _optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if train_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps))
    parts.append(optax.scale_by_schedule(lr_shape(train_cfg)))
    return optax.chain(*parts)


def geometric_median(x_nd: jax.Array, iters: int = 30, eps: float = 1e-6) -> jax.Array:
    """Weiszfeld iterations from the mean: argmin_m sum_i ||x_i - m|| (robust b_dec init)."""

    def body(_, m_d):
        w_n = 1.0 / jnp.maximum(jnp.linalg.norm(x_nd - m_d, axis=1), eps)
        return (w_n[:, None] * x_nd).sum(0) / w_n.sum()

    return jax.lax.fori_loop(0, iters, body, x_nd.mean(0))


def _check_batch(site: str, x, width: int, what: str = "d_in") -> None:
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"batch for site {site!r} has shape {tuple(x.shape)}; expected [N, {what}={width}]")


# Buffers the trainer owns (the rest belong to the architecture and are passed to its loss).
_TRAINER_BUFFERS = ("scale", "target_scale", *TRAINING_ONLY_BUFFERS)
_ENCODER_PARAMS = ("w_enc_sd", "b_enc_s")  # scaled together by fit_encoder_scale's c


def spec_sites(key: str, cfg: SAEConfig) -> tuple[str, str | None]:
    """(input site, target site) that the spec `key` trains on; the target is None for an autoencoder.

    An autoencoder reads `cfg.input_site` or, by default, the site its key names;
    a transcoder reads `cfg.input_site` and reconstructs `cfg.target_site` (both required).
    """
    if get_architecture(cfg.architecture).transcoder:
        if not cfg.input_site or not cfg.target_site:
            raise ValueError(
                f"spec {key!r}: architecture {cfg.architecture!r} is a transcoder but input_site="
                f"{cfg.input_site!r}, target_site={cfg.target_site!r}; set both (sae.input_site, sae.target_site)"
            )
        return cfg.input_site, cfg.target_site
    return cfg.input_site or key, None


def batch_sites(specs: Specs) -> list[str]:
    """Every site the specs read (inputs and transcoder targets): what a batch dict must hold, rows aligned."""
    out = set()
    for key, members in specs.items():
        x_site, y_site = spec_sites(key, members[0])
        out.update(s for s in (x_site, y_site) if s)
    return sorted(out)


def _norm_scale(x_nd: jax.Array, width: int) -> jax.Array:
    """The factor that makes E||x|| = sqrt(width) on this batch."""
    return jnp.sqrt(width) / jnp.maximum(jnp.linalg.norm(x_nd, axis=1).mean(), 1e-12)


def init_train_state(
    specs: Specs, train_cfg: TrainConfig, first_batches: Mapping[str, jax.Array], mesh: Mesh | None = None
) -> TrainState:
    """Fresh state. `first_batches[site]` [N, d_in] sets the input scale (E||x|| = sqrt(d_in))
    and b_dec (geometric median or mean of the scaled batch). A transcoder's b_dec and its
    `target_scale` (E||y|| = sqrt(d_out)) come from its target site's batch (same rows)."""
    # One jitted program: run op by op, the ~30 small ops each compiled on their own (~5 s of
    # a short run's start-up on a 2-core CPU); jitted, one compile the persistent cache keeps.
    state = jax.jit(partial(_fresh_state, specs, train_cfg))(dict(first_batches))
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    return state


def _fresh_state(specs: Specs, train_cfg: TrainConfig, first_batches: Mapping[str, jax.Array]) -> TrainState:
    key = jax.random.PRNGKey(train_cfg.seed)
    tx = _optimizer(train_cfg)
    sites = {}
    for i, (site, members) in enumerate(sorted(specs.items())):
        static, hp = sweep_config(members)
        arch = get_architecture(static.architecture)
        x_site, y_site = spec_sites(site, static)
        for s in (x_site, y_site):
            if s and s not in first_batches:
                raise ValueError(f"init_train_state: no first batch for site {s!r} (spec {site!r}); "
                                 f"got {sorted(first_batches)}")
        x_nd = jnp.asarray(first_batches[x_site], jnp.float32)
        _check_batch(x_site, x_nd, static.d_in)
        scale = _norm_scale(x_nd, static.d_in)
        extra_buffers = {}
        if y_site is None:
            ys_nd = x_nd * scale  # an autoencoder's b_dec is in its input's space
        else:
            y_nd = jnp.asarray(first_batches[y_site], jnp.float32)
            _check_batch(y_site, y_nd, static.d_target, "d_out")
            if y_nd.shape[0] != x_nd.shape[0]:
                raise ValueError(f"init_train_state: spec {site!r} has {x_nd.shape[0]} rows of {x_site!r} but "
                                 f"{y_nd.shape[0]} of {y_site!r}; the target rows must be the input's tokens")
            target_scale = _norm_scale(y_nd, static.d_target)
            extra_buffers["target_scale"] = jnp.full((len(members),), target_scale, jnp.float32)
            ys_nd = y_nd * target_scale
        if static.b_dec_init == "geometric_median":
            b_dec_d = geometric_median(ys_nd)
        elif static.b_dec_init == "mean":
            b_dec_d = ys_nd.mean(0)
        else:
            b_dec_d = jnp.zeros((static.d_target,), jnp.float32)
        m = len(members)
        keys = jax.random.split(jax.random.fold_in(key, i), m)
        params = jax.vmap(lambda k: arch.constrain({**arch.init(k, static), "b_dec_d": b_dec_d}))(keys)
        encoder_step = jnp.ones((m,), jnp.float32)
        if static.fit_encoder_scale and arch.scale_free_selection:
            fit = partial(fit_encoder_scale, arch, static, x_nd * scale, ys_nd)
            params, encoder_step = jax.vmap(fit)(params, hp)
        buffers = {
            "scale": jnp.full((m,), scale, jnp.float32),
            "encoder_step": encoder_step,
            "steps_since_fired_s": jnp.zeros((m, static.d_sae), jnp.int32),
            **extra_buffers,
            **jax.tree.map(lambda a: jnp.broadcast_to(a, (m,) + a.shape), arch.init_buffers(static)),
        }
        sites[site] = SiteState(params=params, opt_state=jax.vmap(tx.init)(params), buffers=buffers)
    return TrainState(sites=sites, step=jnp.zeros((), jnp.int32))


def fit_encoder_scale(arch, cfg: SAEConfig, x_nd: jax.Array, y_nd: jax.Array, params: Params, hp: HParams
                      ) -> tuple[Params, jax.Array]:
    """(`params` with the encoder multiplied by c, c): the c > 0 that minimises ||y - b_dec - c r||^2 over the
    batch, r the batch's reconstruction at c = 1 less b_dec: c = <y - b_dec, r> / <r, r> (closed form).

    Exact for an architecture whose kept set does not depend on the encoder's scale (`scale_free_selection`,
    b_enc = 0 at init): the latents kept at c are those kept at 1 and their values scale by c, so the
    reconstruction is b_dec + c r. Unchanged (c = 1) when nothing fired (r = 0) or the fit is not positive.

    The trainer scales the encoder's Adam steps by the same c (the `encoder_step` buffer): Adam's steps have
    a fixed size whatever the parameter's scale, so an encoder shrunk by c alone would move 1/c times faster
    relative to itself. Measured on the default run (configs/default.py, 75 steps at lr 1e-3, c ~ 0.3): with
    the shrunk encoder on plain steps 31.5% and 17.1% of the latents died, against 10.5% and 2.6% unfitted.
    With both scaled, training is that of W_enc / c at the unfitted init (Adam is invariant to the gradient's
    scale), started from the better reconstruction.
    """
    enc = arch.encode_with_hidden_pre(params, arch.init_buffers(cfg), x_nd, cfg, hp)
    r_nd = decode_blocks(params, enc.blocks, x_nd.shape[0])[-1] - params["b_dec_d"]
    rr = jnp.sum(r_nd * r_nd)
    c = jnp.sum((y_nd - params["b_dec_d"]) * r_nd) / jnp.where(rr > 0, rr, 1.0)
    c = jnp.where((rr > 0) & (c > 0), c, 1.0)
    c = jax.lax.stop_gradient(c)
    return {**params, "w_enc_sd": params["w_enc_sd"] * c}, c


def _spec_for(path, leaf) -> P:
    """d_sae axes (names ending in `_s` / `_sd`) on 'model'; everything else replicated.
    The leading axis of site leaves is the sweep member axis."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    last = next((n for n in reversed(names) if isinstance(n, str)), "")
    if "sites" in names and (last.endswith("_s") or last.endswith("_sd")) and leaf.ndim >= 2:
        return P(None, "model")
    return P()


def state_shardings(state: TrainState, mesh: Mesh):
    """NamedShardings for a TrainState on a ('data', 'model') mesh (d_sae over 'model')."""
    return jax.tree_util.tree_map_with_path(lambda p, a: NamedSharding(mesh, _spec_for(p, a)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [N, d_in] are split over 'data'."""
    return NamedSharding(mesh, P("data", None))


def _member_update(arch, static: SAEConfig, tx, train_cfg: TrainConfig):
    """One member's loss, gradient, Adam update and buffer bookkeeping (vmapped over members)."""

    def update(params, opt_state, buffers, hp: HParams, x_nd, y_nd, step, any_dead: bool):
        xs_nd = x_nd * buffers["scale"]
        # A transcoder's loss also gets its target rows (the same tokens), in their own scaled space.
        target = {"target_bd": y_nd * buffers["target_scale"]} if arch.transcoder else {}
        dead_s = buffers["steps_since_fired_s"] > static.dead_steps if any_dead else None
        arch_buffers = {k: v for k, v in buffers.items() if k not in _TRAINER_BUFFERS}
        (_, out), grads = jax.value_and_grad(arch.loss, has_aux=True)(params, arch_buffers, xs_nd, static, hp, dead_s,
                                                                      **target)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -hp["lr"] * u, updates)
        # the encoder steps at its fitted scale (fit_encoder_scale; 1 when not fitted)
        updates = {**updates, **{k: updates[k] * buffers["encoder_step"] for k in _ENCODER_PARAMS if k in updates}}
        params = arch.constrain(optax.apply_updates(params, updates))
        since_s = jnp.where(out.fired_s > 0, 0, buffers["steps_since_fired_s"] + 1)
        new_buffers = {**buffers, **out.buffers, "steps_since_fired_s": since_s}
        n = x_nd.shape[0]
        metrics = {
            "loss": out.loss,
            **out.losses,
            **out.metrics,
            "dead_fraction": jnp.mean(since_s > static.dead_steps),
            "dense_fraction": jnp.mean(out.fired_s > static.dense_threshold * n),
            "lr": hp["lr"] * lr_shape(train_cfg)(step),
        }
        return params, opt_state, new_buffers, metrics

    return update


def _over_members(update, args):
    """`update` vmapped over the sweep's members (the leading axis of params, opt state, buffers, hp).

    A single member runs unbatched and gets its axis back: XLA:CPU then fuses the encoder's
    bias add into its matmul and reads W_enc in place, where the batched program adds
    [B, d_sae] and transposes W_enc as passes of their own (measured ~0.17 s of a 2.8 s
    TopK step at d_sae 14336, batch 4096).
    """
    params, opt_state, buffers, hp, x_nd, y_nd, step = args
    if jax.tree.leaves(hp)[0].shape[0] == 1:
        first = jax.tree.map(lambda a: a[0], (params, opt_state, buffers, hp))
        return jax.tree.map(lambda a: a[None], update(*first, x_nd, y_nd, step))
    return jax.vmap(update, in_axes=(0, 0, 0, 0, None, None, None))(params, opt_state, buffers, hp, x_nd, y_nd, step)


@dataclass(frozen=True)
class _SpecPlan:
    """What the step needs of one spec: its static config, stacked hyperparameters, member update, sites."""

    static: SAEConfig
    hp: HParams
    update: Callable
    x_site: str
    y_site: str | None


def _plan(specs: Specs, train_cfg: TrainConfig) -> dict[str, _SpecPlan]:
    """Each spec's plan, checked once when the step is made (sweep rules, sites)."""
    tx = _optimizer(train_cfg)
    plan = {}
    for site, members in specs.items():
        static, hp = sweep_config(members)
        x_site, y_site = spec_sites(site, static)
        update = _member_update(get_architecture(static.architecture), static, tx, train_cfg)
        plan[site] = _SpecPlan(static, hp, update, x_site, y_site)
    return plan


def _site_step(p: _SpecPlan, s: SiteState, batches: Mapping[str, jax.Array], step: jax.Array,
               dead_terms: bool) -> tuple[SiteState, dict[str, jax.Array]]:
    """One spec's members updated on their batch rows (traced inside the jitted step)."""
    x_nd = batches[p.x_site].astype(jnp.float32)
    y_nd = None if p.y_site is None else batches[p.y_site].astype(jnp.float32)
    # Dead-latent terms (AuxK) cost several times the main step; run them only when
    # some member has a dead latent. The predicate is outside the vmap, so this is a
    # real branch (a cond under vmap would compute both sides).
    any_dead = jnp.any(s.buffers["steps_since_fired_s"] > p.static.dead_steps)
    branches = [lambda args, flag=flag: _over_members(partial(p.update, any_dead=flag), args) for flag in (False, True)]
    args = (s.params, s.opt_state, s.buffers, p.hp, x_nd, y_nd, step)
    if dead_terms:
        params, opt_state, buffers, m = jax.lax.cond(any_dead, branches[1], branches[0], args)
    else:  # no latent can be dead yet (see _DeadBound): the dead-latent branch is not compiled
        params, opt_state, buffers, m = branches[0](args)
    return SiteState(params=params, opt_state=opt_state, buffers=buffers), m


def _check_step_batches(plan: Mapping[str, _SpecPlan], needed: Sequence[str], batches: Mapping[str, jax.Array]):
    """Clear errors on the host before the jitted step: every site there, widths right, target rows aligned."""
    missing = set(needed) - set(batches)
    if missing:
        raise ValueError(f"train step: no batch for sites {sorted(missing)}; got {sorted(batches)}")
    for site, p in plan.items():
        _check_batch(p.x_site, batches[p.x_site], p.static.d_in)
        if p.y_site is not None:
            _check_batch(p.y_site, batches[p.y_site], p.static.d_target, "d_out")
            if batches[p.y_site].shape[0] != batches[p.x_site].shape[0]:
                raise ValueError(f"train step: spec {site!r} got {batches[p.x_site].shape[0]} rows of {p.x_site!r} "
                                 f"but {batches[p.y_site].shape[0]} of {p.y_site!r}; rows must be the same tokens")


class _DeadBound:
    """A host-side bound on every steps-since-fired counter of the state a step is given.

    A latent is dead once its counter passes dead_steps, and a counter grows by at most one
    per step. So the largest counter of a state (read once from a state the step did not
    return: init, a restore, an edited state) bounds every counter for the steps after it:
    while that bound is <= dead_steps the step runs a program without the dead-latent terms,
    and the one with them is compiled only when a run gets that far (measured ~9 s of a cold
    start on a 2-core CPU; a 40-step run from init never needs it).
    """

    def __init__(self) -> None:
        self.step, self.age = None, 0  # the last state.step the step returned, and its largest counter's bound

    def of(self, state: TrainState) -> int:
        if self.step is not state.step:  # a state from elsewhere: one sync
            self.age = max(int(jnp.max(s.buffers["steps_since_fired_s"])) for s in state.sites.values())
        return self.age

    def advance(self, new_state: TrainState, age: int) -> None:
        self.step, self.age = new_state.step, age + 1


def make_train_step(
    specs: Specs, train_cfg: TrainConfig, mesh: Mesh | None = None
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, dict[str, jax.Array]]]]:
    """One jitted step over all specs: `(state, {site: x_nd}) -> (state, {key: {metric: [M]}})`.

    The batch dict maps site names to rows [N, width], row i of every site being
    the same token; it may hold more sites than the specs read (`batch_sites`).
    An autoencoder spec reads its input site; a transcoder spec reads its input
    and its target site. The state is donated (updated in place). Metrics are
    device arrays with a leading member axis; convert to floats only when logging.
    """
    plan = _plan(specs, train_cfg)

    def step_fn(state: TrainState, batches: Mapping[str, jax.Array], dead_terms: bool = True):
        new_sites, metrics = {}, {}
        for site, p in plan.items():
            new_sites[site], metrics[site] = _site_step(p, state.sites[site], batches, state.step, dead_terms)
        new_state = TrainState(sites=new_sites, step=state.step + 1)
        if mesh is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings(new_state, mesh))
        return new_state, metrics

    jitted = jax.jit(step_fn, donate_argnums=(0,), static_argnames=("dead_terms",))
    needed = batch_sites(specs)
    first_dead = min(p.static.dead_steps for p in plan.values())
    bound = _DeadBound()

    def step(state: TrainState, batches: Mapping[str, jax.Array]):
        _check_step_batches(plan, needed, batches)
        # Only the sites the specs read go into the jitted step (a ring batch may hold more).
        age = bound.of(state)
        new_state, metrics = jitted(state, {s: batches[s] for s in needed}, dead_terms=age > first_dead)
        bound.advance(new_state, age)
        return new_state, metrics

    return step


def member_state(state: TrainState, site: str, i: int) -> tuple[Params, Buffers]:
    """Member i of a site's sweep as host-side single-SAE params and buffers (for export)."""
    s = state.sites[site]
    take = lambda a: np.asarray(jax.device_get(a[i]))  # noqa: E731
    return jax.tree.map(take, s.params), jax.tree.map(take, s.buffers)
