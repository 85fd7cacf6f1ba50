"""Where a TopK / BatchTopK SAE step's time goes: each part jitted alone, medians of repeats.

  python benchmarks/profile_sae_step.py [--reps 5] [--parts matmul,topk,...]
      [--from_export DATA_DIR/exports/RUN --rows DATA_DIR/heldout.npy]

`--from_export` / `--rows`: a trained SAE (a bench_sae.py export) and its data in place of
a fresh init and Gaussian rows; a trained BatchTopK keeps heavy-tailed counts per token
(median 20, p99 ~600 at k 64), which a fresh init does not show.

Shape as bench_sae.py (d_in 896, expansion 16, k 64, batch 4096, fp32). Each
part is one jitted function timed after one warm-up call; the figure is the
median wall time of `--reps` calls. Parts:
  matmul      encoder pre-activations (x - b_dec) @ W_enc^T + b_enc (the dense cost)
  topk        jax.lax.top_k(pre, k) over d_sae
  fwd         matmul + top-k selection (what the step's forward computes)
  decode      sparse decoder forward
  decode_bwd  sparse decoder VJP (d_acts and d_W_dec)
  enc_bwd     encoder VJP of the selected pre-activations (d_W_enc, d_b_enc, d_b_dec)
  adam        clip + Adam + unit-norm constraint on the [d_sae, d_in] weights
  auxk        AuxK's value and gradient (all latents' pre-activations given)
  step_topk / step_topk_dead / step_batchtopk / step_batchtopk_dead
              the whole train step (make_train_step), without / with dead latents
Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ALL = ("matmul", "topk", "fwd", "decode", "decode_bwd", "enc_bwd", "adam", "auxk",
       "step_topk", "step_topk_dead", "step_batchtopk", "step_batchtopk_dead")


def _time(fn, *args, reps: int) -> tuple[float, float, float]:
    """(median wall s, median process CPU s, first call s). CPU time is what a shared machine
    does not distort much: parts that run on one thread have cpu ~ wall on an idle machine."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), first


def _export_params(folder: str, like: dict) -> dict:
    """An SAELens-layout export's four weight tensors (read by arcstream's own `load_sae`), in place of
    `like`'s; its shapes must be the profile's."""
    from arcstream.sae.export import load_sae
    got = {key: value for key, value in load_sae(folder)[0].items() if key in like}
    for key, value in got.items():
        if value.shape != like[key].shape:
            raise SystemExit(f"{folder}: {key} has shape {value.shape}, the profile's shape is {like[key].shape}")
    return {**like, **got}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_in", type=int, default=896)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n_dead", type=int, default=2000, help="dead latents for the auxk part")
    ap.add_argument("--parts", default=",".join(ALL))
    ap.add_argument("--select_dtype", default="bfloat16",
                    help="step_*: sae.select_dtype of the steps (bfloat16 is what the trainer's auto picks)")
    ap.add_argument("--from_export", default="",
                    help="an SAELens-layout export (e.g. bench_sae.py's DATA_DIR/exports/<run>) whose weights the "
                         "parts and steps start from, instead of a fresh init: a trained SAE's kept counts are "
                         "heavy-tailed, which moves BatchTopK's cost")
    ap.add_argument("--rows", default="", help="a .npy of [N >= batch, d_in] float32 rows (e.g. DATA_DIR/heldout.npy) "
                                              "in place of Gaussian x")
    args = ap.parse_args()

    from arcstream.sae import SAEConfig, TrainConfig, get_architecture, init_train_state, make_train_step
    from arcstream.sae.architectures import auxk_loss, preacts
    from arcstream.sae.sparse import selected_preacts, sparse_decode

    d, s, k, b = args.d_in, args.d_in * args.expansion, args.k, args.batch
    print(f"# load {os.getloadavg()[0]:.2f}  d_in={d} d_sae={s} k={k} batch={b} fp32  median of {args.reps}")
    cfg = SAEConfig("topk", d, s, k=k, b_dec_init="mean")
    hp = cfg.hparams()
    arch = get_architecture("topk")
    params = arch.constrain(arch.init(jax.random.PRNGKey(0), cfg))
    if args.from_export:
        params = _export_params(args.from_export, params)
    x = (jnp.asarray(np.load(args.rows)[:b], jnp.float32) if args.rows
         else jax.random.normal(jax.random.PRNGKey(1), (b, d), jnp.float32))
    pre = jax.jit(lambda p, x: preacts(p, x, cfg))(params, x)
    vals, idx = jax.jit(lambda p: jax.lax.top_k(p, k))(pre)
    g_bd = jax.random.normal(jax.random.PRNGKey(2), (b, d), jnp.float32)
    g_bk = jax.random.normal(jax.random.PRNGKey(3), (b, k), jnp.float32)
    dead = jnp.zeros((s,), bool).at[jax.random.permutation(jax.random.PRNGKey(4), s)[:args.n_dead]].set(True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]

    def step_fn(arch_name: str, dead_frac: bool):
        c = SAEConfig(arch_name, d, s, k=k, b_dec_init="mean", dead_steps=0 if dead_frac else 10**6,
                      select_dtype=args.select_dtype)
        specs = {"site": [c]}
        tc = TrainConfig(total_steps=1000)
        state = init_train_state(specs, tc, {"site": x[:512]})
        if args.from_export:  # the member's parameters from the export, Adam's moments fresh
            site = state.sites["site"]
            trained = jax.tree.map(lambda a, p: jnp.broadcast_to(p, a.shape).astype(a.dtype), site.params,
                                   {key: params[key] for key in site.params})
            state = type(state)(sites={"site": type(site)(trained, site.opt_state, site.buffers)}, step=state.step)
        if dead_frac:  # latents not fired in the last step count as dead (dead_steps = 0): AuxK every step
            bufs = dict(state.sites["site"].buffers)
            bufs["steps_since_fired_s"] = bufs["steps_since_fired_s"].at[:, dead].set(5)
            sites = {"site": type(state.sites["site"])(state.sites["site"].params, state.sites["site"].opt_state,
                                                        bufs)}
            # a step past dead_steps, so the trainer runs its program with the dead-latent terms
            state = type(state)(sites=sites, step=jnp.asarray(10, jnp.int32))
        step = make_train_step(specs, tc)
        holder = {"state": state}

        def run():
            holder["state"], m = step(holder["state"], {"site": x})
            return m
        return run

    fns = {
        "matmul": (jax.jit(lambda p, x: preacts(p, x, cfg)), (params, x)),
        "topk": (jax.jit(lambda p: jax.lax.top_k(p, k)), (pre,)),
        "fwd": (jax.jit(lambda p, x: jax.lax.top_k(preacts(p, x, cfg), k)), (params, x)),
        "decode": (jax.jit(sparse_decode), (vals, idx, params["w_dec_sd"])),
        "decode_bwd": (jax.jit(lambda a, i, w, g: jax.vjp(lambda a, w: sparse_decode(a, i, w), a, w)[1](g)),
                       (vals, idx, params["w_dec_sd"], g_bd)),
        "enc_bwd": (jax.jit(lambda x, bd, w, be, i, v, g: jax.vjp(
            lambda bd, w, be: selected_preacts(x, bd, w, be, i, v, True), bd, w, be)[1](g)),
            (x, params["b_dec_d"], params["w_enc_sd"], params["b_enc_s"], idx, vals, g_bk)),
        "auxk": (jax.jit(lambda p, x, pre, dead: jax.value_and_grad(
            lambda p: auxk_loss(p, x, x * 0.5, pre, dead, cfg, hp, sparse=True))(p)), (params, x, pre, dead)),
    }
    if "adam" in parts:
        import optax

        from arcstream.sae.train import _optimizer
        tx = _optimizer(TrainConfig(total_steps=1000))
        opt = tx.init(params)

        def adam(p, o, g):
            u, o = tx.update(g, o, p)
            return arch.constrain(optax.apply_updates(p, jax.tree.map(lambda a: -3e-4 * a, u))), o
        fns["adam"] = (jax.jit(adam), (params, opt, params))
    for name in parts:
        if name.startswith("step_"):
            arch_name = "batchtopk" if "batchtopk" in name else "topk"
            run = step_fn(arch_name, name.endswith("_dead"))
            med, cpu, first = _time(run, reps=args.reps)
        else:
            fn, a = fns[name]
            med, cpu, first = _time(fn, *a, reps=args.reps)
        print(f"{name:22s} wall {med * 1e3:8.1f} ms  cpu {cpu * 1e3:8.1f} ms  (first call incl. compile "
              f"{first:6.2f} s)", flush=True)


if __name__ == "__main__":
    main()
