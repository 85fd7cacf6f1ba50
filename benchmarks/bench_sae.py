"""SAE training throughput: arcstream's sparse TopK step vs SAELens's own SAETrainer.

Same activations (random Gaussian, fp32), same shape (d_in 896, expansion 16 ->
d_sae 14336, TopK k=64, batch 4096), same process, one after the other. Both
train with Adam and no activation normalisation; SAELens's `SAETrainer.fit()` is
timed over its whole loop (data provider, step, dead-latent bookkeeping), and
arcstream's jitted `make_train_step` step likewise. The first steps of each
(compile / warm-up) are excluded. Prints tokens/s and the ratio.

  /work/venv/bin/python benchmarks/bench_sae.py [--steps 4] [--batch 4096] [--devices 1]

`--devices N` runs arcstream on N XLA CPU devices with the batch split over
'data' (each device runs its gathers/scatters in its own thread). Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_in", type=int, default=896)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer")
    ap.add_argument("--devices", type=int, default=1, help="XLA CPU devices for arcstream (data parallel)")
    ap.add_argument("--skip_saelens", action="store_true")
    return ap.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"

import numpy as np  # noqa: E402


def bench_arcstream(x_np: np.ndarray, d_sae: int) -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    from arcstream.sae import SAEConfig, TrainConfig, batch_sharding, init_train_state, make_train_step

    d_in = x_np.shape[1]
    cfg = SAEConfig("topk", d_in, d_sae, k=ARGS.k, b_dec_init="mean")
    specs = {"blocks.0.hook_resid_post": [cfg]}
    tc = TrainConfig(total_steps=ARGS.steps + ARGS.warmup + 1)
    mesh = None
    x = jnp.asarray(x_np)
    if ARGS.devices > 1:
        mesh = jax.make_mesh((ARGS.devices, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        x = jax.device_put(x, batch_sharding(mesh))
    state = init_train_state(specs, tc, {"blocks.0.hook_resid_post": x[:1024]}, mesh=mesh)
    step = make_train_step(specs, tc, mesh=mesh)
    for _ in range(ARGS.warmup):
        state, m = step(state, {"blocks.0.hook_resid_post": x})
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(ARGS.steps):
        state, m = step(state, {"blocks.0.hook_resid_post": x})
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return ARGS.steps * x_np.shape[0] / dt


def bench_saelens(x_np: np.ndarray, d_sae: int) -> float:
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    d_in = x_np.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=ARGS.k, dtype="float32", device="cpu"))
    x = torch.from_numpy(x_np)

    def provider():
        while True:
            yield x

    def run(n_steps: int) -> float:
        cfg = SAETrainerConfig(total_training_samples=n_steps * x.shape[0], train_batch_size_samples=x.shape[0],
                               lr=3e-4, lr_end=3e-4)
        trainer = SAETrainer(cfg, sae, provider())
        t0 = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - t0

    run(ARGS.warmup)
    dt = run(ARGS.steps)
    return ARGS.steps * x_np.shape[0] / dt


def main() -> None:
    d_sae = ARGS.d_in * ARGS.expansion
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((ARGS.batch, ARGS.d_in), dtype=np.float32)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# commit {commit}  cpu cores {os.cpu_count()}  load {os.getloadavg()[0]:.2f}  "
          f"shape d_in={ARGS.d_in} d_sae={d_sae} k={ARGS.k} batch={ARGS.batch} fp32  "
          f"arcstream devices={ARGS.devices}")
    ours = bench_arcstream(x_np, d_sae)
    print(f"arcstream  {ours:9.1f} tokens/s")
    if ARGS.skip_saelens:
        return
    theirs = bench_saelens(x_np, d_sae)
    print(f"SAELens    {theirs:9.1f} tokens/s")
    print(f"ratio arcstream / SAELens = {ours / theirs:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
