"""SAE training throughput and quality: arcstream's offline trainer vs SAELens's own SAETrainer.

Shape: d_in 896, expansion 16 (d_sae 14336), k 64, batch 4096, fp32.

In-loop (the default): both steps on one batch in this process, one after the
other; SAELens's `SAETrainer.fit()` is timed over its whole loop (data provider,
step, dead-latent bookkeeping), arcstream's jitted `make_train_step` likewise;
the first steps (compile / warm-up) are excluded.

  python benchmarks/bench_sae.py [--steps 4] [--batch 4096] [--devices 1] [--archs topk,batchtopk]

Whole process (`--whole`): one run writes a store-shaped run directory of
planted-dictionary activations once (`--data_dir`, reused while its parameters
match), then times each trainer as its own child process, start-up and
compilation included, on the same stored rows:
  arcstream: `python -m arcstream.train_sae --config=configs/train_sae.py ...`
  SAELens:   this script's `--_child saelens` (reads the same store, `SAETrainer.fit()`,
             `save_inference_model`)
at every `--tokens` count (default 163,840 and 40,960) for every `--archs`
architecture, `--repeats` times (medians printed). arcstream runs with its
persistent compilation cache: the first repeat starts from an empty cache
(`cold`), later ones reuse it (`warm`); both are printed. Both trainers use Adam,
lr 3e-4 constant (no warm-up, no decay), no activation normalisation (the data
already has E||x|| = sqrt(d_in)). Then every export (both trainers, the
largest token count, plus `--quality_archs` trained only for the table) is
loaded with SAELens's `SAE.load_from_disk` and scored through SAELens's own
`encode`/`decode` on held-out rows of the same distribution: FVU and L0.

  python benchmarks/bench_sae.py --whole [--tokens 163840,40960] [--archs topk,batchtopk]
      [--quality_archs jumprelu] [--repeats 3] [--data_dir /tmp/arcstream_bench_sae]
      [--select_dtypes float32,bfloat16]

`--select_dtypes`: one arcstream run per value of `sae.select_dtype` (topk and batchtopk: the dtype
of the dense encoder matmul that only picks the kept latents; their values and every gradient stay
f32), each in both tables.

The data: 16,384 random unit atoms, each token a Poisson(48) sum of atoms drawn
with Zipf-like frequencies and exponential magnitudes, plus a mean offset, a
rank-32 dense component, isotropic noise and 0.3% high-norm tokens along one
direction (the attention-sink tokens of real residual streams); rescaled so
E||x|| = sqrt(d_in). Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

SITE = "blocks.0.hook_resid_post"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_in", type=int, default=896)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4, help="in-loop: timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1, help="in-loop: untimed steps per trainer")
    ap.add_argument("--devices", type=int, default=1, help="in-loop: XLA CPU devices for arcstream (data parallel)")
    ap.add_argument("--skip_saelens", action="store_true")
    ap.add_argument("--archs", default="topk", help="architectures timed (topk, batchtopk, jumprelu)")
    ap.add_argument("--whole", action="store_true", help="whole-process runs + quality table (see docstring)")
    ap.add_argument("--skip_in_loop", action="store_true", help="--whole: skip the in-loop figures")
    ap.add_argument("--tokens", default="163840,40960", help="--whole: training tokens per run (comma-separated)")
    ap.add_argument("--quality_archs", default="jumprelu",
                    help="--whole: extra architectures trained at the largest token count for the table only")
    ap.add_argument("--repeats", type=int, default=1, help="--whole: runs per (trainer, arch, tokens)")
    ap.add_argument("--data_dir", default="/tmp/arcstream_bench_sae")
    ap.add_argument("--data_rows", type=int, default=0, help="--whole: stored rows (default: the largest --tokens)")
    ap.add_argument("--eval_rows", type=int, default=8192)
    ap.add_argument("--l0_coefficient", type=float, default=1.0, help="jumprelu, both trainers (SAELens default)")
    ap.add_argument("--select_dtypes", default="bfloat16",
                    help="arcstream's sae.select_dtype, one arcstream run per value (topk/batchtopk; bfloat16 is "
                         "the default of sae.select_dtype=auto), e.g. float32,bfloat16; other architectures "
                         "always run float32")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_arch", default="topk", help=argparse.SUPPRESS)
    ap.add_argument("--_out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_train_tokens", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"

import numpy as np  # noqa: E402


# ---------------------------------------------------------------- data


def planted_activations(n: int, d: int, seed: int, n_atoms: int = 16384, mean_active: float = 48.0) -> np.ndarray:
    """[n, d] float32 rows: sparse sums of a fixed planted dictionary plus the dense parts real residual
    streams have (module docstring). The dictionary and dense parts depend only on `d` (seed 0);
    `seed` picks the rows, so train and held-out rows share the distribution."""
    import scipy.sparse

    g = np.random.default_rng(0)
    atoms = g.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    freq = 1.0 / (np.arange(n_atoms) + 50.0) ** 0.8
    freq = freq / freq.sum()
    atom_scale = np.exp(g.normal(0.0, 0.5, n_atoms)).astype(np.float32)
    mean = g.standard_normal(d).astype(np.float32) * 0.5
    dense_basis = np.linalg.qr(g.standard_normal((d, 32)))[0].T.astype(np.float32)  # [32, d]
    dense_sd = (2.0 / np.sqrt(np.arange(1, 33))).astype(np.float32)
    sink = g.standard_normal(d).astype(np.float32)
    sink /= np.linalg.norm(sink)

    r = np.random.default_rng(seed + 1)
    counts = r.poisson(mean_active, n)
    ids = r.choice(n_atoms, size=int(counts.sum()), p=freq)
    mags = (r.exponential(1.0, ids.size) * atom_scale[ids]).astype(np.float32)
    rows = np.repeat(np.arange(n), counts)
    coef = scipy.sparse.csr_matrix((mags, (rows, ids)), shape=(n, n_atoms))
    x = np.asarray(coef @ atoms, dtype=np.float32)
    x += mean
    x += (r.standard_normal((n, 32)).astype(np.float32) * dense_sd) @ dense_basis
    x += r.standard_normal((n, d)).astype(np.float32) * 0.05
    sinks = r.random(n) < 0.003
    x[sinks] += sink * 60.0
    # Fixed global rescale (from the dictionary's seed, not the rows'), so every split shares it.
    return x * np.float32(np.sqrt(d) / 20.0)


def _data_meta(n_train: int) -> dict:
    return {"version": 1, "d_in": ARGS.d_in, "rows": n_train, "eval_rows": ARGS.eval_rows, "dtype": "float32"}


def prepare_data(n_train: int) -> tuple[str, str]:
    """The run directory (a real arcstream store, float32) and the held-out .npy; written once."""
    run_dir = os.path.join(ARGS.data_dir, "run")
    eval_path = os.path.join(ARGS.data_dir, "heldout.npy")
    meta_path = os.path.join(ARGS.data_dir, "meta.json")
    meta = _data_meta(n_train)
    if os.path.exists(meta_path) and json.load(open(meta_path)) == meta:
        return run_dir, eval_path
    from arcstream.data.records import PromptInfo
    from arcstream.store import StoreWriter

    shutil.rmtree(ARGS.data_dir, ignore_errors=True)
    os.makedirs(ARGS.data_dir)
    t0 = time.perf_counter()
    writer = StoreWriter.create_or_resume(run_dir, sites={SITE: ARGS.d_in}, config={"bench": "bench_sae", **meta},
                                          dtype="float32", rows_per_shard=4096)
    prompt_len, chunk = 2048, 16384
    for step, start in enumerate(range(0, n_train, chunk)):
        n = min(chunk, n_train - start)
        x = planted_activations(n, ARGS.d_in, seed=1000 + step)
        prompt = (start + np.arange(n)) // prompt_len
        tokens = {"prompt": prompt.astype(np.int32), "position": ((start + np.arange(n)) % prompt_len).astype(np.int32),
                  "token_id": np.zeros(n, np.int32), "grid_kind": np.zeros(n, np.int8)}
        for f in ("pair_index", "row", "col", "colour"):
            tokens[f] = np.full(n, -1, np.int8)
        infos = [PromptInfo(int(p), f"synthetic{p}", 0, {}, np.zeros(prompt_len, np.int32), 0)
                 for p in np.unique(prompt) if p * prompt_len >= start]
        writer.append({SITE: x}, tokens, infos)
        writer.commit(step + 1)
    writer.close()
    np.save(eval_path, planted_activations(ARGS.eval_rows, ARGS.d_in, seed=7), allow_pickle=False)
    json.dump(meta, open(meta_path, "w"))
    print(f"# wrote {n_train} rows + {ARGS.eval_rows} held-out to {ARGS.data_dir} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir, eval_path


# ---------------------------------------------------------------- in-loop


def bench_arcstream(x_np: np.ndarray, d_sae: int, arch: str = "topk", select_dtype: str = "float32") -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    from arcstream.sae import SAEConfig, TrainConfig, batch_sharding, init_train_state, make_train_step

    d_in = x_np.shape[1]
    cfg = SAEConfig(arch, d_in, d_sae, k=ARGS.k, b_dec_init="mean", l0_coefficient=ARGS.l0_coefficient,
                    select_dtype=select_dtype)
    specs = {SITE: [cfg]}
    tc = TrainConfig(total_steps=ARGS.steps + ARGS.warmup + 1)
    mesh = None
    x = jnp.asarray(x_np)
    if ARGS.devices > 1:
        mesh = jax.make_mesh((ARGS.devices, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        x = jax.device_put(x, batch_sharding(mesh))
    state = init_train_state(specs, tc, {SITE: x[:1024]}, mesh=mesh)
    step = make_train_step(specs, tc, mesh=mesh)
    for _ in range(ARGS.warmup):
        state, m = step(state, {SITE: x})
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(ARGS.steps):
        state, m = step(state, {SITE: x})
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
    return ARGS.steps * x_np.shape[0] / dt


def _saelens_sae(arch: str, d_in: int, d_sae: int):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu")
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=ARGS.k, **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=ARGS.k, **common))
    if arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=ARGS.l0_coefficient, **common))
    raise ValueError(f"--archs: {arch!r} has no SAELens counterpart here; expected topk, batchtopk or jumprelu")


def bench_saelens(x_np: np.ndarray, d_sae: int, arch: str = "topk") -> float:
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = _saelens_sae(arch, x_np.shape[1], d_sae)
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


def in_loop(x_np: np.ndarray) -> dict[str, tuple[float, float | None]]:
    d_sae = ARGS.d_in * ARGS.expansion
    out = {}
    for arch in _archs(ARGS.archs):
        ours = {dt: bench_arcstream(x_np, d_sae, arch, dt) for dt in _select_dtypes(arch)}
        for dt, v in ours.items():
            print(f"in-loop {arch:10s} arcstream {dt:8s} {v:9.1f} tokens/s", flush=True)
        theirs = None
        if not ARGS.skip_saelens:
            theirs = bench_saelens(x_np, d_sae, arch)
            print(f"in-loop {arch:10s} SAELens            {theirs:9.1f} tokens/s   ratio "
                  + ", ".join(f"{dt} {v / theirs:.2f}x" for dt, v in ours.items()), flush=True)
        out[arch] = (ours, theirs)
    return out


def _select_dtypes(arch: str) -> list[str]:
    """The arcstream variants run for `arch`: every --select_dtypes value where the architecture has a
    selection-only matmul (topk, batchtopk), else float32 alone."""
    from arcstream.sae.architectures import get_architecture

    dts = _archs(ARGS.select_dtypes)
    return dts if get_architecture(arch).sparse_selection else ["float32"]


def _trainers(arch: str) -> list[str]:
    """Trainer names of the whole-process runs: "arcstream/<select_dtype>" per variant, then "saelens"."""
    return [f"arcstream/{dt}" for dt in _select_dtypes(arch)] + ([] if ARGS.skip_saelens else ["saelens"])


# ---------------------------------------------------------------- whole process


def saelens_child() -> None:
    """One SAELens training process: read the store, fit, save the inference SAE, print a JSON line."""
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from arcstream.store import open_run

    torch.manual_seed(0)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(open_run(ARGS.data_dir).activations(SITE)[:], np.float32)))
    sae = _saelens_sae(ARGS._arch, x.shape[1], x.shape[1] * ARGS.expansion)
    batch = ARGS.batch
    gen = torch.Generator().manual_seed(0)

    def provider():
        while True:  # every row once per epoch, in a fresh random order
            perm = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0] - batch + 1, batch):
                yield x[perm[i:i + batch]]

    cfg = SAETrainerConfig(total_training_samples=ARGS._train_tokens, train_batch_size_samples=batch, lr=3e-4,
                           lr_end=3e-4)
    trainer = SAETrainer(cfg, sae, provider())
    t0 = time.perf_counter()
    trainer.fit()
    loop_s = time.perf_counter() - t0
    sae.save_inference_model(ARGS._out)
    print(json.dumps({"loop_tokens_per_s": ARGS._train_tokens / loop_s}))


def _archs(s: str) -> list[str]:
    return [a.strip() for a in s.split(",") if a.strip()]


def _timed_child(cmd: list[str], log_name: str, env: dict | None = None) -> tuple[float, float, int, str]:
    """common.timed_child with its stderr in `data_dir/logs/<log_name>.log`."""
    import common

    logs = os.path.join(ARGS.data_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    return common.timed_child(cmd, cwd=ROOT, env=env, capture=True, stderr_path=os.path.join(logs, f"{log_name}.log"))


def run_arcstream(run_dir: str, arch: str, tokens: int, out: str, cache_dir: str, select_dtype: str) -> dict:
    """One `python -m arcstream.train_sae` process on the stored rows; its export is moved to `out`."""
    shutil.rmtree(os.path.join(run_dir, "saes"), ignore_errors=True)
    ckpt = os.path.join(ARGS.data_dir, "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    cmd = [sys.executable, "-m", "arcstream.train_sae", "--config=configs/train_sae.py",
           f"--config.run_dir={run_dir}", f"--config.checkpoint_dir={ckpt}", f"--config.sites={SITE}",
           f"--config.sae.architecture={arch}", f"--config.sae.k={ARGS.k}",
           f"--config.sae.expansion_factor={ARGS.expansion}", f"--config.sae.batch_size={ARGS.batch}",
           f"--config.sae.train_tokens={tokens}", "--config.sae.warmup_steps=0", "--config.sae.decay_fraction=0",
           "--config.sae.lr=3e-4", f"--config.sae.l0_coefficient={ARGS.l0_coefficient}",
           f"--config.compilation_cache_dir={cache_dir}", "--config.log_every=1000000",
           f"--config.sae.select_dtype={select_dtype}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    wall, rss, rc, text = _timed_child(cmd, os.path.basename(out), env=env)
    if rc != 0:
        raise RuntimeError(f"arcstream child failed (exit {rc}): {' '.join(cmd)}\n{text[-2000:]} "
                           f"(log: {ARGS.data_dir}/logs)")
    # the summary box's "steps  N, R tokens/s" row (sae/offline.py summary_rows)
    speeds = [re.search(r"([\d.]+) tokens/s", ln) for ln in text.splitlines() if "steps" in ln]
    loop = next((float(m.group(1)) for m in speeds if m), float("nan"))
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(os.path.join(run_dir, "saes", SITE), out)
    return {"wall_s": wall, "rss_gb": rss, "loop_tokens_per_s": loop}


def run_saelens(run_dir: str, arch: str, tokens: int, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "saelens", "--_arch", arch, "--_out", out,
           "--_train_tokens", str(tokens), "--data_dir", run_dir, "--d_in", str(ARGS.d_in),
           "--expansion", str(ARGS.expansion), "--k", str(ARGS.k), "--batch", str(ARGS.batch),
           "--l0_coefficient", str(ARGS.l0_coefficient)]
    wall, rss, rc, text = _timed_child(cmd, os.path.basename(out))
    if rc != 0:
        raise RuntimeError(f"SAELens child failed (exit {rc}): {' '.join(cmd)}\n{text[-2000:]} "
                           f"(log: {ARGS.data_dir}/logs)")
    loop = json.loads(text.strip().splitlines()[-1])["loop_tokens_per_s"]
    return {"wall_s": wall, "rss_gb": rss, "loop_tokens_per_s": loop}


def score(folder: str, x_eval: np.ndarray, batch_k: int = 0) -> tuple[float, float]:
    """(FVU, L0) of the SAE saved in `folder`, through SAELens's own load_from_disk / encode / decode.

    `batch_k` > 0 (BatchTopK): the latents are chosen by the training rule instead of the exported
    threshold, the batch_k x rows largest ReLU pre-activations of each 1024-row batch (pre-activations
    from the loaded W_enc, b_enc, b_dec), then decoded by SAELens's `decode`.
    """
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device="cpu")
    x = torch.from_numpy(x_eval)
    sse, l0 = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], 1024):
            xb = x[i:i + 1024]
            if batch_k:
                pre = torch.relu((xb - sae.b_dec) @ sae.W_enc + sae.b_enc)
                kth = torch.topk(pre.flatten(), batch_k * xb.shape[0]).values[-1]
                feats = torch.where(pre >= kth, pre, torch.zeros_like(pre))
            else:
                feats = sae.encode(xb)
            sse += float(((sae.decode(feats) - xb) ** 2).sum())
            l0 += float((feats != 0).sum())
    total = float(((x - x.mean(0)) ** 2).sum())
    return sse / total, l0 / x.shape[0]


def _busy_processes(n: int = 5) -> list[str]:
    """The busiest other processes right now (what else shares the CPU during the measurement)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return ["(ps unavailable)"]
    rows = [ln.split(None, 2) for ln in out.splitlines()[1:]]
    return [f"{r[0]}% {r[2][:70]}" for r in rows if len(r) == 3 and int(r[1]) != os.getpid()][:n]


def whole_process() -> None:
    tokens = sorted({int(t) for t in ARGS.tokens.split(",")}, reverse=True)
    archs = _archs(ARGS.archs)
    quality_only = [a for a in _archs(ARGS.quality_archs) if a not in archs]
    n_train = max(ARGS.data_rows, tokens[0])
    run_dir, eval_path = prepare_data(n_train)
    print("# other processes (%cpu, command):", "; ".join(_busy_processes()), flush=True)
    x_eval = np.load(eval_path, allow_pickle=False)
    cache_dir = os.path.join(ARGS.data_dir, "jax_cache")
    exports = os.path.join(ARGS.data_dir, "exports")
    os.makedirs(exports, exist_ok=True)
    if not ARGS.skip_in_loop:
        in_loop(np.asarray(planted_activations(ARGS.batch, ARGS.d_in, seed=11)))

    results: dict[tuple[str, str, int], list[dict]] = {}
    plan = [(a, t) for a in archs for t in tokens] + [(a, tokens[0]) for a in quality_only]
    for rep in range(ARGS.repeats):
        for arch, t in plan:
            if rep and arch in quality_only:
                continue
            cache_state = "warm"
            if rep == 0 and (arch, t) == next(p for p in plan if p[0] == arch):
                shutil.rmtree(cache_dir, ignore_errors=True)  # each architecture's first run compiles from cold
                cache_state = "cold"
            for trainer in _trainers(arch):
                out = os.path.join(exports, f"{trainer.replace('/', '_')}_{arch}_{t}")
                load = os.getloadavg()[0]
                if trainer.startswith("arcstream"):
                    r = run_arcstream(run_dir, arch, t, out, cache_dir, trainer.split("/")[1])
                    r["cache"] = cache_state
                else:
                    r = run_saelens(run_dir, arch, t, out)
                r["load"] = load
                results.setdefault((trainer, arch, t), []).append(r)
                print(f"run {rep} {trainer:18s} {arch:10s} {t:7d} tokens  {r['wall_s']:7.1f} s whole "
                      f"({t / r['wall_s']:7.1f} tok/s)  loop {r['loop_tokens_per_s']:7.1f} tok/s  "
                      f"rss {r['rss_gb']:.2f} GB  load {load:.2f}" + (f"  cache {r['cache']}" if 'cache' in r else ""),
                      flush=True)

    print("\n# whole process (start-up + compile included), medians over repeats; arcstream cold = empty cache")
    print(f"{'arch':10s} {'arcstream':18s} {'tokens':>7s} {'arcstream s':>11s} {'(cold s)':>9s} {'SAELens s':>9s} "
          f"{'arc tok/s':>9s} {'SL tok/s':>8s} {'ratio':>6s} {'ratio cold':>10s}")
    for arch, t, trainer in [(a, t, tr) for a in archs for t in tokens for tr in _trainers(a) if tr != "saelens"]:
        ours = results.get((trainer, arch, t), [])
        theirs = results.get(("saelens", arch, t), [])
        if not ours:
            continue
        warm = [r["wall_s"] for r in ours if r["cache"] == "warm"] or [r["wall_s"] for r in ours]
        cold = [r["wall_s"] for r in ours if r["cache"] == "cold"]
        a = statistics.median(warm)
        line = f"{arch:10s} {trainer:18s} {t:7d} {a:11.1f} {(statistics.median(cold) if cold else float('nan')):9.1f} "
        if theirs:
            s = statistics.median(r["wall_s"] for r in theirs)
            rc = f"{s / statistics.median(cold):10.2f}" if cold else f"{'-':>10s}"
            line += f"{s:9.1f} {t / a:9.1f} {t / s:8.1f} {s / a:6.2f} {rc}"
        else:
            line += f"{'-':>9s} {t / a:9.1f}"
        print(line)

    print(f"\n# quality at {tokens[0]} tokens: held-out rows ({x_eval.shape[0]}), every export through SAELens's "
          "load_from_disk/encode/decode (FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2)")
    print(f"{'arch':18s} {'trainer':18s} {'FVU':>8s} {'L0':>7s}")
    # BatchTopK twice: by the exported threshold (what SAELens's encode does; an EMA that short runs
    # leave far from converged) and by the batch top-k rule it was trained with.
    rows = [(a, 0) for a in archs + quality_only] + [("batchtopk", ARGS.k)] * ("batchtopk" in archs + quality_only)
    for arch, batch_k in rows:
        for trainer in _trainers(arch):
            folder = os.path.join(exports, f"{trainer.replace('/', '_')}_{arch}_{tokens[0]}")
            if os.path.exists(folder):
                fvu, l0 = score(folder, x_eval, batch_k)
                print(f"{arch + (' (batch)' if batch_k else ''):18s} {trainer:18s} {fvu:8.4f} {l0:7.1f}")
    print("# other processes at the end (%cpu, command):", "; ".join(_busy_processes()), flush=True)
    with open(os.path.join(ARGS.data_dir, "results.json"), "w") as f:
        json.dump({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, f, indent=1)


def main() -> None:
    if ARGS._child == "saelens":
        saelens_child()
        return
    sys.path.insert(0, HERE)
    import common

    d_sae = ARGS.d_in * ARGS.expansion
    print(f"# commit {common.git_commit()}  cpu cores {os.cpu_count()}  load {os.getloadavg()[0]:.2f}  "
          f"shape d_in={ARGS.d_in} d_sae={d_sae} k={ARGS.k} batch={ARGS.batch} fp32  "
          f"arcstream devices={ARGS.devices}", flush=True)
    if ARGS.whole:
        whole_process()
        return
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((ARGS.batch, ARGS.d_in), dtype=np.float32)
    in_loop(x_np)


if __name__ == "__main__":
    main()
