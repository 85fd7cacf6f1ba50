"""Store write throughput: the arcstream writer against two naive baselines, in one run.

    python benchmarks/bench_store.py [--rows 32768] [--batch 512] [--d 896] [--sites 2] [--dtype bfloat16]

Writes the same synthetic rows (activations for every site + the 8 token
metadata fields) three ways, each into a fresh directory under --dir:

* arcstream: `StoreWriter` (host buffer, whole-shard async writes, a commit
  every --commit_every batches: tail in one transaction, ledger, manifest);
* naive_ts: the same zarr3 sharded arrays, pre-sized, each batch written
  straight into its (shared) shard, synchronously, no transaction: every write
  rewrites the shard file it lands in;
* np_save: one `np.save` file per batch and array (the seed's style; no fsync,
  so it is flattered compared to the other two, which fsync every file).

Prints rows/s and MB/s of each and the ratios arcstream / baseline, with the
host, the git commit and the settings. Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

from arcstream.store import TOKEN_FIELDS, StoreWriter
from arcstream.store.layout import activation_metadata, numpy_dtype, token_metadata


_SPLIT: list[tuple[float, float, float]] = []  # arcstream: (in append, in commit, total) per run


def make_batches(args):
    rng = np.random.default_rng(0)
    dt = numpy_dtype(args.dtype)
    sites = {f"blocks.{i}.hook_resid_post": args.d for i in range(args.sites)}
    batches = []
    for b in range(args.rows // args.batch):
        rows = {s: rng.standard_normal((args.batch, d), np.float32).astype(dt) for s, d in sites.items()}
        tokens = {f: np.zeros(args.batch, dt_f) for f, dt_f in TOKEN_FIELDS.items()}
        tokens["prompt"][:] = b  # one prompt per batch
        tokens["position"][:] = np.arange(args.batch)
        batches.append((rows, tokens))
    return sites, batches


def bench_arcstream(root: Path, sites, batches, args) -> float:
    from arcstream.data.records import PromptInfo
    t0 = time.perf_counter()
    writer = StoreWriter.create_or_resume(str(root), sites=sites, config={"bench": True}, dtype=args.dtype,
                                          rows_per_shard=args.rows_per_shard)
    in_append = in_commit = 0.0
    for i, (rows, tokens) in enumerate(batches):
        info = PromptInfo(i, "bench", 0, {}, np.zeros(args.batch, np.int32), args.batch)
        t = time.perf_counter()
        writer.append(rows, tokens, [info])
        in_append += time.perf_counter() - t
        if (i + 1) % args.commit_every == 0:
            t = time.perf_counter()
            writer.commit(i + 1)
            in_commit += time.perf_counter() - t
    t = time.perf_counter()
    writer.commit(len(batches))
    in_commit += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    _SPLIT.append((in_append, in_commit, seconds))
    return seconds


def bench_naive_ts(root: Path, sites, batches, args) -> float:
    t0 = time.perf_counter()
    n = len(batches) * args.batch
    stores = {}
    for s, d in sites.items():
        meta = activation_metadata(d, args.dtype, args.rows_per_shard, min(256, args.rows_per_shard), s, 0)
        meta["shape"] = [n, d]
        stores[s] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / s)},
                             "metadata": meta}, create=True).result()
    for f in TOKEN_FIELDS:
        meta = token_metadata(f, args.rows_per_shard, 0)
        meta["shape"] = [n]
        stores[f] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / f)},
                             "metadata": meta}, create=True).result()
    for i, (rows, tokens) in enumerate(batches):
        lo, hi = i * args.batch, (i + 1) * args.batch
        futures = [stores[s][lo:hi].write(x) for s, x in rows.items()]
        futures += [stores[f][lo:hi].write(x) for f, x in tokens.items()]
        for fut in futures:
            fut.result()
    return time.perf_counter() - t0


def bench_np_save(root: Path, sites, batches, args) -> float:
    t0 = time.perf_counter()
    root.mkdir(parents=True)
    for i, (rows, tokens) in enumerate(batches):
        for name, x in {**rows, **tokens}.items():
            np.save(root / f"{name}.{i:06d}.npy", x)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32768, help="rows in total")
    parser.add_argument("--batch", type=int, default=512, help="rows per append (a drained batch)")
    parser.add_argument("--d", type=int, default=896, help="activation width (896 = Qwen2.5-0.5B)")
    parser.add_argument("--sites", type=int, default=2, help="number of sites")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows_per_shard", type=int, default=4096)
    parser.add_argument("--commit_every", type=int, default=16, help="batches per commit (arcstream)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method; the best is kept")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir on /tmp)")
    args = parser.parse_args()

    sites, batches = make_batches(args)
    n_rows = len(batches) * args.batch
    nbytes = sum(x.nbytes for rows, tokens in batches for x in [*rows.values(), *tokens.values()])
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_"))
    methods = {"arcstream": bench_arcstream, "naive_ts": bench_naive_ts, "np_save": bench_np_save}
    best = {}
    for r in range(args.repeats):
        for name, fn in methods.items():
            root = base / f"{name}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            seconds = fn(root, sites, batches, args)
            best[name] = min(best.get(name, float("inf")), seconds)
            shutil.rmtree(root, ignore_errors=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    print(f"host: {platform.node()} {platform.machine()} cpus={os.cpu_count()}  commit: {commit}  dir: {base}")
    print(f"rows={n_rows} batch={args.batch} sites={args.sites}x d={args.d} dtype={args.dtype} "
          f"rows_per_shard={args.rows_per_shard} commit_every={args.commit_every} "
          f"({nbytes / 1e6:.1f} MB per run, best of {args.repeats})")
    print(f"{'method':<10} {'seconds':>8} {'rows/s':>10} {'MB/s':>8}")
    for name, seconds in best.items():
        print(f"{name:<10} {seconds:>8.3f} {n_rows / seconds:>10.0f} {nbytes / seconds / 1e6:>8.1f}")
    in_append, in_commit, total = min(_SPLIT, key=lambda x: x[2])
    print(f"arcstream caller time: {in_append:.3f} s in append ({in_append / len(batches) * 1e3:.2f} ms per "
          f"{args.batch}-row batch), {in_commit:.3f} s in commit, of {total:.3f} s")
    for name in ("naive_ts", "np_save"):
        print(f"arcstream / {name}: {best[name] / best['arcstream']:.2f}x throughput")


if __name__ == "__main__":
    main()
