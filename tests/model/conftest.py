"""Shared fixtures for the model tests: tiny HF checkpoints and an HF reference runner."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from arcstream.model.testing import FAMILIES, make_tiny_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Any]:
    """family -> path of a tiny float32 checkpoint saved by transformers."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {f: make_tiny_hf_checkpoint(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


def load_hf(path, dtype: str = "float32"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def hf_reference(hf_model, tokens_bt: np.ndarray) -> dict[str, np.ndarray]:
    """Every capture site and the logits of the HF model, as float32 NumPy.

    Forward hooks rather than `output_hidden_states`: the last entry of
    hidden_states is after the final norm, and attn/mlp outputs are not in it.
    """
    out: dict[str, np.ndarray] = {}
    handles = []

    def as_np(t):
        t = t[0] if isinstance(t, tuple) else t
        return t.detach().float().numpy()

    for i, layer in enumerate(hf_model.model.layers):
        def pre(mod, args, kwargs, i=i):
            hs = args[0] if args else kwargs["hidden_states"]
            out[f"blocks.{i}.hook_resid_pre"] = as_np(hs)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"blocks.{i}.hook_resid_post", as_np(o))))
        # attn_out / mlp_out are what each branch adds to the residual stream (TransformerLens): for
        # Gemma that is after the branch's post-norm, elsewhere the attention / MLP module output.
        if getattr(layer, "post_feedforward_layernorm", None) is not None:
            attn_mod, mlp_mod = layer.post_attention_layernorm, layer.post_feedforward_layernorm
        else:
            attn_mod, mlp_mod = layer.self_attn, layer.mlp
        handles.append(attn_mod.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"blocks.{i}.hook_attn_out", as_np(o))))
        handles.append(mlp_mod.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"blocks.{i}.hook_mlp_out", as_np(o))))
    try:
        with torch.no_grad():
            res = hf_model(torch.as_tensor(tokens_bt, dtype=torch.long), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    out["logits"] = res.logits.float().numpy()
    # Cross-check the hooks against HF's own hidden_states (all but the last, post-norm one).
    for layer in range(len(hf_model.model.layers) - 1):
        np.testing.assert_array_equal(out[f"blocks.{layer}.hook_resid_post"],
                                      res.hidden_states[layer + 1].float().numpy())
    return out


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (a scale-free error every element must meet)."""
    got = np.asarray(got, np.float32)
    ref = np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())
