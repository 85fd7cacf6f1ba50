"""The SAE training step shared by the online (ring buffer) and offline (store) trainers.

`make_train_step(specs, train_cfg, mesh)` returns one jitted function that
updates the SAEs of every site in a single step:

  state, metrics = step(state, {site: x_nd})

* Sites may differ in d_in and d_sae: the step loops over them in Python
  (one traced program, one dispatch).
* A site's SAEs are a sweep of M members (M = 1 without a sweep) differing only
  in k / coefficients / lr (SAEConfig.SWEEPABLE): every parameter carries a
  leading [M] axis and the member update is `jax.vmap`ped over it, the batch
  being shared.
* With a mesh (axes ('data', 'model')), d_sae is sharded over 'model' and the
  batch over 'data'; the result equals the unsharded step.
* The batch arrays are consumed where they are (already on device): no host
  round trip, so the online trainer can feed it from the ring buffer.

Optimiser: clip_by_global_norm -> Adam -> (linear warm-up, constant, linear decay
to 0 over the last `decay_steps`) x the member's lr; then the architecture's
constraint (unit-norm decoder rows). Dead latents: steps since a latent last
fired, per member; dead = more than `cfg.dead_steps`.
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

from arcstream.sae.architectures import Buffers, HParams, Params, SAEConfig, get_architecture, sweep_config

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
    rng: jax.Array  # uint32[2] key, split once per step; the caller's batch sampler may use it


def lr_shape(train_cfg: TrainConfig) -> optax.Schedule:
    """Multiplier in [0, 1]: warm-up, constant, linear decay to 0 at total_steps."""
    w, d, t = train_cfg.warmup_steps, train_cfg.decay_steps, train_cfg.total_steps

    def shape(count):
        c = jnp.asarray(count, jnp.float32)
        up = jnp.minimum(1.0, (c + 1) / w) if w > 0 else 1.0
        down = jnp.clip((t - c) / d, 0.0, 1.0) if d > 0 else 1.0
        return up * down

    return shape


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


def _check_batch(site: str, x, cfg: SAEConfig) -> None:
    if x.ndim != 2 or x.shape[1] != cfg.d_in:
        raise ValueError(f"batch for site {site!r} has shape {tuple(x.shape)}; expected [N, d_in={cfg.d_in}]")


def init_train_state(
    specs: Specs, train_cfg: TrainConfig, first_batches: Mapping[str, jax.Array], mesh: Mesh | None = None
) -> TrainState:
    """Fresh state. `first_batches[site]` [N, d_in] sets the input scale (E||x|| = sqrt(d_in))
    and b_dec (geometric median or mean of the scaled batch)."""
    key = jax.random.PRNGKey(train_cfg.seed)
    tx = _optimizer(train_cfg)
    sites = {}
    for i, (site, members) in enumerate(sorted(specs.items())):
        if site not in first_batches:
            raise ValueError(f"init_train_state: no first batch for site {site!r}; got {sorted(first_batches)}")
        static, hp = sweep_config(members)
        arch = get_architecture(static.architecture)
        x_nd = jnp.asarray(first_batches[site], jnp.float32)
        _check_batch(site, x_nd, static)
        scale = jnp.sqrt(static.d_in) / jnp.maximum(jnp.linalg.norm(x_nd, axis=1).mean(), 1e-12)
        xs_nd = x_nd * scale
        if static.b_dec_init == "geometric_median":
            b_dec_d = geometric_median(xs_nd)
        elif static.b_dec_init == "mean":
            b_dec_d = xs_nd.mean(0)
        else:
            b_dec_d = jnp.zeros((static.d_in,), jnp.float32)
        m = len(members)
        keys = jax.random.split(jax.random.fold_in(key, i), m)
        params = jax.vmap(lambda k: arch.constrain({**arch.init(k, static), "b_dec_d": b_dec_d}))(keys)
        buffers = {
            "scale": jnp.full((m,), scale, jnp.float32),
            "steps_since_fired_s": jnp.zeros((m, static.d_sae), jnp.int32),
            **jax.tree.map(lambda a: jnp.broadcast_to(a, (m,) + a.shape), arch.init_buffers(static)),
        }
        sites[site] = SiteState(params=params, opt_state=jax.vmap(tx.init)(params), buffers=buffers)
        del hp
    state = TrainState(sites=sites, step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(train_cfg.seed + 1))
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    return state


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

    def update(params, opt_state, buffers, hp: HParams, x_nd, step, any_dead: bool):
        xs_nd = x_nd * buffers["scale"]
        dead_s = buffers["steps_since_fired_s"] > static.dead_steps if any_dead else None
        arch_buffers = {k: v for k, v in buffers.items() if k not in ("scale", "steps_since_fired_s")}
        (_, out), grads = jax.value_and_grad(arch.loss, has_aux=True)(params, arch_buffers, xs_nd, static, hp, dead_s)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -hp["lr"] * u, updates)
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


def make_train_step(
    specs: Specs, train_cfg: TrainConfig, mesh: Mesh | None = None
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, dict[str, jax.Array]]]]:
    """One jitted step over all sites: `(state, {site: x_nd}) -> (state, {site: {metric: [M]}})`.

    The state is donated (updated in place). Metrics are device arrays with a
    leading member axis; convert to floats only when logging.
    """
    tx = _optimizer(train_cfg)
    plan = {}
    for site, members in specs.items():
        static, hp = sweep_config(members)
        plan[site] = (static, hp, _member_update(get_architecture(static.architecture), static, tx, train_cfg))

    def step_fn(state: TrainState, batches: Mapping[str, jax.Array]):
        new_sites, metrics = {}, {}
        for site, (static, hp, update) in plan.items():
            x_nd = batches[site].astype(jnp.float32)
            s = state.sites[site]
            # Dead-latent terms (AuxK) cost several times the main step; run them only when
            # some member has a dead latent. The predicate is outside the vmap, so this is a
            # real branch (a cond under vmap would compute both sides).
            any_dead = jnp.any(s.buffers["steps_since_fired_s"] > static.dead_steps)
            branches = [
                lambda args, flag=flag, update=update: jax.vmap(
                    partial(update, any_dead=flag), in_axes=(0, 0, 0, 0, None, None))(*args)
                for flag in (False, True)
            ]
            params, opt_state, buffers, m = jax.lax.cond(
                any_dead, branches[1], branches[0], (s.params, s.opt_state, s.buffers, hp, x_nd, state.step))
            new_sites[site] = SiteState(params=params, opt_state=opt_state, buffers=buffers)
            metrics[site] = m
        new_state = TrainState(sites=new_sites, step=state.step + 1, rng=jax.random.split(state.rng)[0])
        if mesh is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings(new_state, mesh))
        return new_state, metrics

    jitted = jax.jit(step_fn, donate_argnums=(0,))

    def step(state: TrainState, batches: Mapping[str, jax.Array]):
        missing = set(plan) - set(batches)
        if missing:
            raise ValueError(f"train step: no batch for sites {sorted(missing)}; got {sorted(batches)}")
        for site, (static, _, _) in plan.items():
            _check_batch(site, batches[site], static)
        return jitted(state, batches)

    return step


def member_state(state: TrainState, site: str, i: int) -> tuple[Params, Buffers]:
    """Member i of a site's sweep as host-side single-SAE params and buffers (for export)."""
    s = state.sites[site]
    take = lambda a: np.asarray(jax.device_get(a[i]))  # noqa: E731
    return jax.tree.map(take, s.params), jax.tree.map(take, s.buffers)
