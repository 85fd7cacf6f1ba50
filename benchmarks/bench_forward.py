"""Forward tokens/s with capture on: arcstream (JAX) vs HF transformers (PyTorch), same run.

    python benchmarks/bench_forward.py                      # Qwen2.5-0.5B shape, 4 of 24 layers
    python benchmarks/bench_forward.py --layers 24 --batch 8 --seq 512 --dtype bfloat16

Both sides run the *same random weights* (written once with
`save_hf_checkpoint`, read by `load_model` and by `from_pretrained`) on the
same prompts.  The capture case is the product's: hidden states of the
captured sites, no LM head (arcstream stops after the deepest captured layer;
HF runs its base model with forward hooks on those sites).  A second line adds
the LM head on both sides.  Prints one JSON record per case with the device,
commit and config, and the ratio JAX / HF.  On a GPU, pass --peak_tflops to
get MFU (forward FLOPs / peak).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcstream.model import ModelConfig, forward, init_random, load_model, parse_sites, save_hf_checkpoint
from common import git_commit


def _time(fn, repeats: int) -> float:
    """Median seconds per call after one warm-up call (which includes compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2_0p5b", help="ModelConfig preset whose shape is used")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (the preset has more)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak (e.g. 989 for H100 bf16)")
    ap.add_argument("--skip_hf", action="store_true", help="JAX only (e.g. on a GPU host without torch)")
    args = ap.parse_args()

    cfg = ModelConfig.from_preset(args.preset).replace(num_layers=args.layers)
    sites = parse_sites(f"blocks.{args.layers // 2}.hook_resid_post,blocks.{args.layers - 1}.hook_resid_post",
                        args.layers)
    rng = np.random.RandomState(0)
    tokens_bt = rng.randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(init_random(cfg, seed=0, dtype=args.dtype), cfg, tmp)
        model, _ = load_model(tmp, dtype=args.dtype)
        graphdef, state = nnx.split(model)

        @partial(jax.jit, static_argnames=("return_logits",))
        def step(state, tok, seg, pos, return_logits):
            out = forward(nnx.merge(graphdef, state), tok, seg, pos, sites=sites, return_logits=return_logits)
            return out.captures, out.logits

        tok = jnp.asarray(tokens_bt)
        seg = jnp.ones_like(tok)
        pos = jnp.tile(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, 1))
        jax_s = {rl: _time(lambda rl=rl: jax.block_until_ready(step(state, tok, seg, pos, rl)), args.repeats)
                 for rl in (False, True)}

        hf_s: dict[bool, float | None] = {False: None, True: None}
        torch_threads = None
        if not args.skip_hf:
            import torch
            import transformers

            torch_threads = torch.get_num_threads()
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype)).eval()
            captured: dict[str, torch.Tensor] = {}
            for s in sites:
                layer = int(s.split(".")[1])
                hf.model.layers[layer].register_forward_hook(
                    lambda m, a, o, s=s: captured.__setitem__(s, o[0] if isinstance(o, tuple) else o))
            ids = torch.as_tensor(tokens_bt, dtype=torch.long)
            with torch.inference_mode():
                hf_s[False] = _time(lambda: hf.model(ids), args.repeats)
                hf_s[True] = _time(lambda: hf(ids), args.repeats)

    device = jax.devices()[0]
    for rl in (False, True):
        jax_tps = n_tokens / jax_s[rl]
        flops = cfg.flops_per_token(args.seq, num_layers=args.layers if rl else max(
            int(s.split(".")[1]) for s in sites) + 1, with_head=rl)
        rec = {
            "case": "capture+logits" if rl else "capture (no LM head)",
            "jax_tokens_per_s": round(jax_tps, 1),
            "hf_tokens_per_s": None if hf_s[rl] is None else round(n_tokens / hf_s[rl], 1),
            "ratio_jax_over_hf": None if hf_s[rl] is None else round(hf_s[rl] / jax_s[rl], 3),
            "jax_tflops": round(jax_tps * flops / 1e12, 4),
            "mfu": None if args.peak_tflops is None else round(jax_tps * flops / (args.peak_tflops * 1e12), 4),
            "preset": args.preset, "layers": args.layers, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "sites": list(sites), "device": f"{device.platform}:{device.device_kind}",
            "jax_devices": jax.device_count(), "cpu_count": os.cpu_count(), "torch_threads": torch_threads,
            "commit": git_commit(), "jax": jax.__version__,
        }
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
