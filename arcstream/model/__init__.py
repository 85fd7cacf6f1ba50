"""Flax NNX decoders (Qwen2/Qwen2.5, Qwen3, Llama 2/3/3.x, Mistral, Gemma 2, Gemma 3 text) from HF checkpoints.

Public API (shapes: B batch, T tokens, D width, V vocabulary):

- `load_model(path_or_hub_name, *, dtype, mesh, rules, attention) -> (Decoder, ModelConfig)`
- `attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, implementation, window, softcap, ...)`: packed
  causal attention (auto | dense | blocked | splash | gpu), `ATTENTION_IMPLEMENTATIONS`, `segment_mask`
- `forward(model, tokens_bt, segment_ids_bt, positions_bt, *, sites, return_logits, edits) -> ModelOutput`
  (`logits` [B,T,V] or None, `captures` {site: [B,T,D]}); segment id 0 = padding; `edits` replace sites.
  `forward_jit` is the same under `nnx.jit` (sites, return_logits static).
- `parse_sites(spec, num_layers) -> tuple[str, ...]`
- `generate(model, prompts, *, max_new_tokens, eos_id, pad_id, lengths=None) -> GenerateOutput`
- `make_mesh(data=-1, model=1)`, `LOGICAL_AXIS_RULES`, `logical_to_spec`, `logical_sharding`
- `save_hf_checkpoint(model, config, path)`, `init_random(config, seed, ...)`, `ModelConfig` presets
  (`PRESETS`, named after checkpoints: `ModelConfig.from_preset("gemma_2_2b")`).

Test helpers (need torch) live in `arcstream.model.testing`.
"""

from arcstream.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from arcstream.model.attention import attention, segment_mask
from arcstream.model.config import PRESETS, LinearRopeScaling, ModelConfig, RopeScaling
from arcstream.model.generate import GenerateOutput, generate
from arcstream.model.model import (HOOKS, Decoder, ModelOutput, attention_option, default_model_options, forward,
                                   forward_jit, parse_sites, rope_tables)
from arcstream.model.params import PARAM_TABLE, init_random, load_model, resolve_checkpoint, save_hf_checkpoint
from arcstream.model.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    constrain,
    logical_sharding,
    logical_to_spec,
    MeshOptions,
    make_mesh,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "HOOKS", "LOGICAL_AXIS_RULES", "MESH_AXES", "PARAM_TABLE", "PRESETS", "Decoder",
    "GenerateOutput", "LinearRopeScaling", "ModelConfig", "ModelOutput", "RopeScaling", "attention", "attention_option", "constrain", "default_model_options", "forward", "forward_jit", "generate", "init_random",
    "load_model", "logical_sharding", "logical_to_spec", "make_mesh", "MeshOptions", "parse_sites", "rope_tables", "segment_mask",
    "resolve_checkpoint", "save_hf_checkpoint",
]
