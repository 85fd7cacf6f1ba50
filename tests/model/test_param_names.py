"""HF key <-> NNX path: both directions come from PARAM_TABLE, and they cover exactly what transformers writes.

`nnx_to_hf` is derived from the table's rows (nothing else is hand-kept), so these tests pin that the
derivation inverts every row, that every parameter of every family survives NNX -> HF -> NNX and
HF -> NNX -> HF, and that the names are the ones transformers itself saves and loads.
"""

from __future__ import annotations

import re

import pytest
from flax import nnx
from safetensors import safe_open

from arcstream.model import ModelConfig, init_random, save_hf_checkpoint
from arcstream.model.params import PARAM_TABLE, _inverse, hf_to_nnx, nnx_to_hf
from arcstream.model.testing import ALL_FAMILIES, make_tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")

# Every family's tiny checkpoint, plus Llama with every optional bias (o_proj and MLP biases too).
CASES = [(f, {}) for f in ALL_FAMILIES] + [("llama", dict(attention_bias=True, mlp_bias=True))]


def _keys(ckpt) -> set[str]:
    keys: set[str] = set()
    for fp in ckpt.glob("*.safetensors"):
        with safe_open(fp, framework="flax") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("family,overrides", CASES, ids=[f + ("+biases" if o else "") for f, o in CASES])
def test_every_parameter_name_round_trips_and_is_what_transformers_writes(tmp_path, family, overrides):
    ref = make_tiny_hf_checkpoint(tmp_path / "hf", family, **overrides)  # written by save_pretrained
    hf_keys = _keys(ref)
    config = ModelConfig.from_json_file(ref / "config.json")
    model = init_random(config)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    for path in paths:  # NNX -> HF -> NNX
        key, transpose = nnx_to_hf(path)
        assert hf_to_nnx(key) == (path, transpose)
        assert transpose == path.endswith(".kernel"), path
    for key in hf_keys:  # HF -> NNX -> HF
        mapped = hf_to_nnx(key)
        assert mapped is not None, key
        assert nnx_to_hf(mapped[0]) == (key, mapped[1])

    ours = save_hf_checkpoint(model, config, tmp_path / "ours")
    assert {nnx_to_hf(p)[0] for p in paths} == _keys(ours) == hf_keys
    # transformers loads our export (our config.json too: Gemma's query_pre_attn_scalar once went out as 24.0,
    # which transformers refuses) with nothing missing or unexpected.
    _, info = transformers.AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
    assert {k: v for k, v in info.items() if v and k != "error_msgs"} == {}, info


def test_a_new_row_needs_no_inverse_written_by_hand():
    """Any row of the table's form inverts, whatever order its template uses the groups in."""
    nnx_rx, hf_tpl = _inverse(r"model\.layers\.(\d+)\.mlp\.(router|gate)\.weight", r"moe.\2.layers.\1.kernel")
    m = re.fullmatch(nnx_rx, "moe.router.layers.12.kernel")
    assert m is not None and m.expand(hf_tpl) == "model.layers.12.mlp.router.weight"
    assert re.fullmatch(nnx_rx, "moe.other.layers.12.kernel") is None
    assert [_inverse(rx, tpl)[1] for rx, tpl, _ in PARAM_TABLE][0] == "model.embed_tokens.weight"


@pytest.mark.parametrize("row,match", [
    ((r"model\..*\.weight", "x"), "not literal text"),
    ((r"model\.(?P<n>\d+)\.weight", r"\1"), "not a plain capturing group"),
    ((r"model\.layers\.(\d+)\.(q|k)\.weight", r"layers.\1.kernel"), "each of the 2 groups exactly once"),
])
def test_a_row_that_cannot_be_read_backwards_is_refused(row, match):
    with pytest.raises(ValueError, match=match):
        _inverse(*row)
