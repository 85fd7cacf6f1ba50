"""SAELens-format export and import (DESIGN.md "SAE exports").

A folder per SAE with `cfg.json` and `sae_weights.safetensors`:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
(+ threshold [d_sae] for jumprelu). The input scale used in training is folded
in (W_enc * c, W_dec / c, b_dec / c; thresholds live in pre-activation space and
do not change), so `normalize_activations` is "none". BatchTopK is exported as
JumpReLU with its learned global threshold, as SAELens does. `sae_lens_version`
is written (>= 6.0.0): without it SAELens rewrites the config and drops metadata.

A folder may be a local path or a TensorStore kvstore URL (`gs://...`,
`memory://...`): both files go through `arcstream.store.layout.RunLocation`,
each replaced whole (a reader never sees half a file), weights before cfg.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from arcstream.sae.architectures import Buffers, Params, SAEConfig, get_architecture
from arcstream.store.layout import RunLocation, is_url

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAE_LENS_FORMAT_VERSION = "6.0.0"  # the format version we write (SAELens >= 6 reads it as is)


def export_sae(
    params: Params,
    cfg: SAEConfig,
    folder: str | Path,
    *,
    hook_name: str,
    buffers: Buffers | None = None,
    model_name: str | None = None,
) -> Path | str:
    """Write one SAE (a single member: no leading sweep axis) in SAELens layout; returns the folder
    (a `Path` for a local folder, the URL string for a kvstore URL).

    `buffers` holds `scale` (default 1) and, for batchtopk, `threshold`.
    """
    buffers = dict(buffers or {})
    scale = float(np.asarray(buffers.pop("scale", 1.0)))
    buffers.pop("steps_since_fired_s", None)
    arch = get_architecture(cfg.architecture)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    for name, want in (("w_enc_sd", (cfg.d_sae, cfg.d_in)), ("w_dec_sd", (cfg.d_sae, cfg.d_in))):
        if tuple(params[name].shape) != want:
            raise ValueError(
                f"export_sae: params[{name!r}] has shape {tuple(params[name].shape)}, expected {want} "
                "(pass a single sweep member, e.g. from member_state)"
            )
    saelens_arch, weights, extra = arch.export(params, {k: jnp.asarray(v) for k, v in buffers.items()}, cfg,
                                              cfg.hparams())
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    weights["W_enc"] = weights["W_enc"] * scale
    weights["W_dec"] = weights["W_dec"] / scale
    weights["b_dec"] = weights["b_dec"] / scale
    metadata: dict[str, Any] = {"hook_name": hook_name, "arcstream_architecture": cfg.architecture}
    if model_name is not None:
        metadata["model_name"] = model_name
    cfg_json = {
        "architecture": saelens_arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        "metadata": metadata,
        **extra,
    }
    location = RunLocation(folder)
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    location.write_bytes_atomic(WEIGHTS_FILE, save_safetensors(tensors))
    location.write_bytes_atomic(CFG_FILE, json.dumps(cfg_json, indent=2).encode())
    return str(folder) if is_url(folder) else Path(folder)


def load_sae(folder: str | Path) -> tuple[Params, SAEConfig, Buffers, dict[str, Any]]:
    """Read a SAELens folder (ours or SAELens's own `save_model` output; a local path or a kvstore
    URL) as arcstream params.

    Returns (params, cfg, buffers, cfg_json). Supported: standard, topk, jumprelu
    (a BatchTopK export comes back as jumprelu). `buffers["scale"]` is 1: the
    folder's weights already work on raw activations.
    """
    location = RunLocation(folder)
    where = str(folder).rstrip("/")
    cfg_path, w_path = f"{where}/{CFG_FILE}", f"{where}/{WEIGHTS_FILE}"
    data = {}
    for name, p in ((CFG_FILE, cfg_path), (WEIGHTS_FILE, w_path)):
        data[name] = location.read_bytes(name)
        if data[name] is None:
            raise FileNotFoundError(f"load_sae: {p} is missing; a SAELens folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    cfg_json = json.loads(data[CFG_FILE])
    arch = cfg_json.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"load_sae: {cfg_path} has architecture={arch!r}; expected standard, topk or jumprelu")
    norm = cfg_json.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ValueError(
            f"load_sae: {cfg_path} has normalize_activations={norm!r}; only 'none' is supported "
            "(fold the normalisation into the weights first)"
        )
    w = load_safetensors(data[WEIGHTS_FILE])
    d_in, d_sae = int(cfg_json["d_in"]), int(cfg_json["d_sae"])
    for name, want in (("W_enc", (d_in, d_sae)), ("W_dec", (d_sae, d_in)), ("b_enc", (d_sae,)), ("b_dec", (d_in,))):
        if name not in w or tuple(w[name].shape) != want:
            got = tuple(w[name].shape) if name in w else "missing"
            raise ValueError(f"load_sae: {w_path} tensor {name!r} is {got}, expected shape {want}")
    params = {
        "w_enc_sd": jnp.asarray(np.ascontiguousarray(w["W_enc"].T), jnp.float32),
        "b_enc_s": jnp.asarray(w["b_enc"], jnp.float32),
        "w_dec_sd": jnp.asarray(w["W_dec"], jnp.float32),
        "b_dec_d": jnp.asarray(w["b_dec"], jnp.float32),
    }
    kw: dict[str, Any] = {}
    if arch == "jumprelu":
        if "threshold" not in w:
            raise ValueError(f"load_sae: {w_path} has no 'threshold' tensor, which a jumprelu SAE needs")
        params["log_threshold_s"] = jnp.log(jnp.asarray(w["threshold"], jnp.float32))
    if arch == "topk":
        kw["k"] = int(cfg_json.get("k", 100))  # SAELens's default when k is absent
        if cfg_json.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"load_sae: {cfg_path} has rescale_acts_by_decoder_norm=true; not supported")
    cfg = SAEConfig(arch, d_in, d_sae, apply_b_dec_to_input=bool(cfg_json.get("apply_b_dec_to_input", True)), **kw)
    buffers = {"scale": jnp.ones((), jnp.float32)}
    return params, cfg, buffers, cfg_json


def encode(params: Params, cfg: SAEConfig, x_bd, buffers: Buffers | None = None):
    """Inference encoding of raw activations (scale applied) -> acts [B, d_sae]."""
    buffers = dict(buffers or {})
    scale = buffers.pop("scale", 1.0)
    buffers.pop("steps_since_fired_s", None)
    arch = get_architecture(cfg.architecture)
    return arch.encode(params, buffers, jnp.asarray(x_bd, jnp.float32) * scale, cfg, cfg.hparams())


def decode(params: Params, acts_bs, buffers: Buffers | None = None):
    """Decode to raw activation space (scale undone)."""
    scale = (buffers or {}).get("scale", 1.0)
    return (jnp.asarray(acts_bs) @ params["w_dec_sd"] + params["b_dec_d"]) / scale
