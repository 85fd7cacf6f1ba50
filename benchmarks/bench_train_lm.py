"""LM training tokens/s: arcstream's train_lm step (JAX, packed rows) vs an HF transformers PyTorch loop, same run.

    python benchmarks/bench_train_lm.py                 # arcstream-tiny's shape, 4 rows x 2048 tokens
    python benchmarks/bench_train_lm.py --steps 4 --seq 1024

Both sides train the same model shape (configs/train_lm.py: Qwen2, 4 layers,
hidden 128, the `digits` vocabulary) from the same initial weights with AdamW
on the same prompts and the same targets (the output-grid loss mask).
arcstream packs several prompts per row (block-diagonal attention by segment);
the baseline is the usual HF fine-tuning loop: one prompt per row, padded to
the longest in the batch, labels -100 off the mask, `loss.backward()`,
`optimizer.step()`. Each side does one untimed warm-up step (compilation), then
`--steps` timed steps; the figure is real (non-padding) prompt tokens per second.
Prints one JSON record with both rates and the ratio arcstream / HF.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
from common import git_commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per arcstream step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = ap.parse_args()

    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.lm.data import targets
    from arcstream.lm.options import TrainLMOptions
    from arcstream.lm.train import (
        EpochStream,
        make_optimizer,
        make_train_step,
        model_config,
        training_source,
    )
    from arcstream.model import init_random, save_hf_checkpoint
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for configs/
    from configs.train_lm import get_config

    torch.set_num_threads(args.threads)
    cfg = get_config()
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.max_prompt_len = args.batch, args.seq, args.seq
    c = TrainLMOptions.from_config(cfg)
    tok = build_arc_tokenizer("digits")
    mcfg = model_config(c.model, tok, c.data.seq_len)
    stream = EpochStream(c, tok, training_source(c))
    batches = [next(stream) for _ in range(args.steps + 1)]
    stream.close()

    # The same initial weights on both sides.
    model = init_random(mcfg, seed=0)
    tmp = tempfile.mkdtemp(prefix="bench_train_lm_")
    save_hf_checkpoint(model, mcfg, tmp)
    graphdef, params = nnx.split(model)
    optimizer, _ = make_optimizer(c.train)
    opt_state = optimizer.init(params)
    step = make_train_step(graphdef, optimizer)

    def ours(batch):
        nonlocal params, opt_state
        tgt, w = targets(batch)
        params, opt_state, m = step(params, opt_state, batch.tokens, batch.segment_ids, batch.positions, tgt, w)
        jax.block_until_ready(m["loss"])

    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=float(c.train.lr), betas=(float(c.train.b1), float(c.train.b2)),
                            weight_decay=float(c.train.weight_decay))

    def unpacked(batch):
        """The batch's prompts one per row, padded right; labels = next-token targets under the same mask."""
        tgt, w = targets(batch)
        rows = []
        for b in range(batch.tokens.shape[0]):
            for s in np.unique(batch.segment_ids[b][batch.segment_ids[b] > 0]):
                idx = np.nonzero(batch.segment_ids[b] == s)[0]
                rows.append((batch.tokens[b, idx], np.where(w[b, idx] > 0, tgt[b, idx], -100)))
        n = max(len(r[0]) for r in rows)
        ids = np.zeros((len(rows), n), np.int64)
        lab = np.full((len(rows), n), -100, np.int64)
        att = np.zeros((len(rows), n), np.int64)
        for i, (t, y) in enumerate(rows):
            ids[i, :len(t)], lab[i, :len(t)], att[i, :len(t)] = t, y, 1
        return torch.from_numpy(ids), torch.from_numpy(lab), torch.from_numpy(att)

    def theirs(batch):
        ids, lab, att = unpacked(batch)
        logits = hf(input_ids=ids, attention_mask=att).logits
        # labels already hold the *next* token at each position, so no shift here
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), float(c.train.clip_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = sum(int(b.valid.sum()) for b in batches[1:])
    rates = {}
    for name, fn in (("arcstream", ours), ("hf_torch", theirs)):
        fn(batches[0])
        t0 = time.perf_counter()
        for b in batches[1:]:
            fn(b)
        rates[name] = tokens / (time.perf_counter() - t0)
    print(json.dumps({
        "bench": "train_lm", "commit": git_commit(), "device": jax.devices()[0].device_kind,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "rows": args.batch, "seq": args.seq, "steps": args.steps, "tokens": tokens,
        "arcstream_tokens_per_s": round(rates["arcstream"], 1), "hf_tokens_per_s": round(rates["hf_torch"], 1),
        "ratio": round(rates["arcstream"] / rates["hf_torch"], 3),
    }))


if __name__ == "__main__":
    main()
