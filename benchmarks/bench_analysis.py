"""Feature statistics throughput: arcstream's streaming `FeatureAccumulator` vs a whole-array NumPy baseline.

Same latent activations (TopK-like: k random latents per row with log-normal values, float32), same token
metadata, same process, alternating rounds. The baseline holds the whole [rows, d_sae] array and computes the
same statistics the direct way (dense firing mask, per-latent argpartition top-k, `np.histogram` per latent,
firing per attribute value as a dense one-hot matmul) - what a notebook would do, and what does not fit in
memory on a real site. Prints rows/s of both, the ratio, and the peak extra memory of each (tracemalloc).

  /work/venv/bin/python benchmarks/bench_analysis.py [--rows 65536] [--d_sae 4096] [--k 64] [--chunk 4096]

Not run by CI. Encoding (the SAE matmul) is not included: it is the same jitted call either way.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import tracemalloc

import numpy as np

from arcstream.analysis.stats import ACT_LOG10_EDGES, N_ATTRIBUTE_VALUES, FeatureAccumulator, attribute_codes


def make_data(rows: int, d_sae: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    acts = np.zeros((rows, d_sae), np.float32)
    idx = np.stack([rng.choice(d_sae, k, replace=False) for _ in range(rows)])
    np.put_along_axis(acts, idx, rng.lognormal(0, 1, (rows, k)).astype(np.float32), 1)
    kind = rng.integers(0, 5, rows).astype(np.int8)
    cell = kind > 0
    tok = {"prompt": (np.arange(rows) // 1500).astype(np.int32), "position": (np.arange(rows) % 1500).astype(np.int32),
           "grid_kind": kind, "row": np.where(cell, rng.integers(0, 30, rows), -1).astype(np.int8),
           "col": np.where(cell, rng.integers(0, 30, rows), -1).astype(np.int8),
           "colour": np.where(cell, rng.integers(0, 10, rows), -1).astype(np.int8)}
    return acts, tok


def streaming(acts, tok, chunk: int, top_k: int):
    acc = FeatureAccumulator(acts.shape[1], top_k)
    for a in range(0, len(acts), chunk):
        acc.update(acts[a:a + chunk], {f: v[a:a + chunk] for f, v in tok.items()}, a)
    return acc.result()


def baseline(acts, tok, top_k: int):
    fires = acts > 0
    density, mean, mx = fires.mean(0), acts.mean(0), acts.max(0)
    top = np.argpartition(-acts, top_k - 1, axis=0)[:top_k]
    hist = np.stack([np.histogram(np.clip(np.log10(acts[fires[:, j], j]), -4, 4 - 1e-9), ACT_LOG10_EDGES)[0]
                     for j in range(acts.shape[1])])
    codes = attribute_codes(tok)
    onehot = np.zeros((len(acts), N_ATTRIBUTE_VALUES), np.float32)
    r, c = np.nonzero(codes >= 0)
    onehot[r, codes[r, c]] = 1
    attr = fires.T.astype(np.float32) @ onehot
    return density, mean, mx, top, hist, attr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d_sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--top_k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; rows {args.rows}, d_sae {args.d_sae}, k {args.k}, chunk {args.chunk}, "
          f"top_k {args.top_k}; CPU, numpy {np.__version__}")
    acts, tok = make_data(args.rows, args.d_sae, args.k)
    times = {"streaming": [], "baseline": []}
    peaks = {}
    for _ in range(args.rounds):
        for name, fn in (("streaming", lambda: streaming(acts, tok, args.chunk, args.top_k)),
                         ("baseline", lambda: baseline(acts, tok, args.top_k))):
            tracemalloc.start()
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if name == "streaming":
                st = out
            else:
                np.testing.assert_allclose(st.density_s, out[0])
                np.testing.assert_array_equal(st.attr_fire_sv, out[5].astype(np.int64))
                np.testing.assert_array_equal(st.hist_sb, out[4])
    for name in times:
        best = min(times[name])
        print(f"{name:>9}: {args.rows / best:12,.0f} rows/s  (best of {args.rounds}: {best:.2f} s; "
              f"peak extra memory {peaks[name] / 2**20:,.0f} MiB)")
    print(f"streaming / baseline speed: {min(times['baseline']) / min(times['streaming']):.2f}x; "
          f"memory: {peaks['streaming'] / peaks['baseline']:.3f}x")


if __name__ == "__main__":
    main()
