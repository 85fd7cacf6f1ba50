"""Greedy generation on ARC-length prompts: arcstream's `generate` vs HF transformers `generate`, peak memory and time.

    python benchmarks/bench_generate.py [--lengths 2048,8192] [--new 8] [--attention auto]

Same checkpoint (arcstream-tiny, the shipped model), the same two prompts per length (random colour-digit
tokens, P and P - 100 long: a left-padded batch of 2), up to `--new` greedy tokens (both stop at the
model's stop token). Each side runs
as its own child process (`common.timed_child`), so its peak RSS is its own: arcstream = load + compile +
generate (JAX, `--attention`), HF = load + `generate(do_sample=False)` with SDPA attention, the two prompts
one at a time (HF's usual loop; batched HF needs an attention mask over left padding too, which adds
nothing to its peak at batch 2). Prints one JSON record per length with both sides' seconds and peak RSS
and the ratios arcstream / HF, and whether the first continuation's tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from common import git_commit, timed_child

_CHILD = "--_child"


def _prompts(p: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(3, 13, size=p).astype(np.int32), rng.integers(3, 13, size=p - 100).astype(np.int32)]


def _child(side: str, p: int, new: int, attention: str, out: str) -> None:
    import numpy as np

    from arcstream import models

    path = models.path("arcstream-tiny")
    prompts = _prompts(p)
    if side == "arcstream":
        from arcstream.model import load_model
        from arcstream.model.generate import generate

        model, cfg = load_model(path, dtype="float32", attention=attention)
        res = generate(model, prompts, max_new_tokens=new, eos_id=cfg.eos_token_ids, pad_id=0)
        first = np.asarray(res.tokens)[0].tolist()
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa")
        outs = []
        with torch.no_grad():
            for q in prompts:
                seq = hf.generate(torch.as_tensor(q[None], dtype=torch.long), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0)
                outs.append(seq[0, q.size:].tolist())
        first = outs[0]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"first": first}, f)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192", help="prompt lengths (tokens), comma-separated")
    ap.add_argument("--new", type=int, default=8, help="tokens generated per prompt")
    ap.add_argument("--attention", default="auto", help="arcstream's model_options.attention")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    for p in (int(v) for v in args.lengths.split(",")):
        rec = {"bench": "generate", "commit": git_commit(), "prompt_tokens": p, "new": args.new,
               "attention": args.attention}
        firsts = {}
        for side in ("arcstream", "hf"):
            out = os.path.join(tmp, f"{side}_{p}.json")
            secs, rss, rc, _ = timed_child([sys.executable, os.path.abspath(__file__), _CHILD, side, str(p),
                                            str(args.new), args.attention, out],
                                           stderr_path=os.path.join(tmp, f"{side}_{p}.err"))
            if rc != 0:
                rec[f"{side}_error"] = f"exit {rc}, see {tmp}/{side}_{p}.err"
                continue
            rec[f"{side}_s"], rec[f"{side}_peak_rss_gb"] = round(secs, 2), round(rss, 3)
            with open(out, encoding="utf-8") as f:
                firsts[side] = json.load(f)["first"]
        if "arcstream_s" in rec and "hf_s" in rec:
            rec["time_ratio"] = round(rec["arcstream_s"] / rec["hf_s"], 3)
            rec["rss_ratio"] = round(rec["arcstream_peak_rss_gb"] / rec["hf_peak_rss_gb"], 3)
            rec["same_first_continuation"] = firsts["arcstream"] == firsts["hf"]
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
