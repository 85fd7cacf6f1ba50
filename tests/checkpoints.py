"""Checkpoints the tests build: one place for what several test files need."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from arcstream.data.tokenizer import build_arc_tokenizer
from arcstream.model.testing import make_tiny_hf_checkpoint


def tiny_arc_checkpoint(path: str | os.PathLike, family: str = "qwen2", **overrides: Any) -> Path:
    """A tiny random `family` checkpoint with arcstream's `digits` tokenizer saved beside it, the model's
    vocabulary and special-token ids those of the tokenizer (what train_lm exports look like)."""
    tok = build_arc_tokenizer("digits")
    make_tiny_hf_checkpoint(path, family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **overrides)
    tok.save_pretrained(path)
    return Path(path)
