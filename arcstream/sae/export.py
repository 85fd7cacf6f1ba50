"""SAELens-format export and import (DESIGN.md "SAE exports").

A folder per SAE with `cfg.json` and `sae_weights.safetensors`:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
(+ threshold [d_sae] for jumprelu). The input scale used in training is folded
in (W_enc * c, W_dec / c, b_dec / c; thresholds live in pre-activation space and
do not change), so `normalize_activations` is "none". BatchTopK is exported as
JumpReLU with its learned global threshold, as SAELens does, and so is
Matryoshka BatchTopK. `sae_lens_version` is written (>= 6.0.0): without it
SAELens rewrites the config and drops metadata.

Transcoders (transcoder.py) are written as SAELens's `jumprelu_transcoder`:
W_dec [d_sae, d_out], b_dec [d_out], `d_out` and `apply_b_dec_to_input: false`
in cfg.json, `metadata.hook_name` the input site and `metadata.hook_name_out` the
target site; the input scale is folded into W_enc and the target scale into
W_dec and b_dec. `export_circuit_tracer` turns a set of them (one per layer) into
circuit-tracer's per-layer transcoder layout.

A folder may be a local path or a TensorStore kvstore URL (`gs://...`,
`memory://...`): both files go through `arcstream.io.RunLocation`,
each replaced whole (a reader never sees half a file), weights before cfg.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from arcstream.sae.architectures import Buffers, Params, SAEConfig, get_architecture
from arcstream.sae.architectures import decode as decode_scaled
from arcstream.io import RunLocation, is_url

# The trainer's bookkeeping in a SiteState's buffers (sae/train.py), not part of an SAE once trained.
TRAINING_ONLY_BUFFERS = ("steps_since_fired_s", "encoder_step")


def _trained_buffers(buffers: Buffers | None) -> dict[str, Any]:
    """A copy of an SAE's buffers without the trainer's bookkeeping (TRAINING_ONLY_BUFFERS)."""
    return {k: v for k, v in (buffers or {}).items() if k not in TRAINING_ONLY_BUFFERS}

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

    `buffers` holds `scale` (default 1), for a transcoder `target_scale` (default: `scale`)
    and, for batchtopk-style SAEs, `threshold`. `hook_name` is the input site;
    a transcoder's `cfg.target_site` becomes `metadata.hook_name_out`.
    """
    buffers = _trained_buffers(buffers)
    scale = float(np.asarray(buffers.pop("scale", 1.0)))
    out_scale = float(np.asarray(buffers.pop("target_scale", scale)))  # the space W_dec and b_dec map into
    arch = get_architecture(cfg.architecture)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    for name, want in (("w_enc_sd", (cfg.d_sae, cfg.d_in)), ("w_dec_sd", (cfg.d_sae, cfg.d_target))):
        if tuple(params[name].shape) != want:
            raise ValueError(
                f"export_sae: params[{name!r}] has shape {tuple(params[name].shape)}, expected {want} "
                "(pass a single sweep member, e.g. from member_state)"
            )
    saelens_arch, weights, extra = arch.export(params, {k: jnp.asarray(v) for k, v in buffers.items()}, cfg,
                                              cfg.hparams())
    weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    weights["W_enc"] = weights["W_enc"] * scale
    weights["W_dec"] = weights["W_dec"] / out_scale
    weights["b_dec"] = weights["b_dec"] / out_scale
    metadata: dict[str, Any] = {"hook_name": hook_name, "arcstream_architecture": cfg.architecture}
    if cfg.target_site:
        metadata["hook_name_out"] = cfg.target_site
    if cfg.matryoshka_widths:
        metadata["matryoshka_widths"] = list(cfg.matryoshka_widths)
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


def hook_name(cfg_json: dict[str, Any]) -> str:
    """The site a SAELens cfg.json is for: `metadata.hook_name` (SAELens 6), else the top-level `hook_name`
    (older SAELens layouts); "" when neither is there."""
    meta = cfg_json.get("metadata") or {}
    return str(meta.get("hook_name") or cfg_json.get("hook_name") or "")


def load_sae(folder: str | Path) -> tuple[Params, SAEConfig, Buffers, dict[str, Any]]:
    """Read a SAELens folder (ours or SAELens's own `save_model` output; a local path or a kvstore
    URL) as arcstream params.

    Returns (params, cfg, buffers, cfg_json). Supported: standard, topk, jumprelu
    (a BatchTopK or Matryoshka export comes back as jumprelu) and jumprelu_transcoder.
    `buffers["scale"]` is 1: the folder's weights already work on raw activations.
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
    if arch not in _LOADABLE:
        raise ValueError(f"load_sae: {cfg_path} has architecture={arch!r}; expected one of {_LOADABLE}")
    norm = cfg_json.get("normalize_activations") or "none"
    if norm not in NORMALIZATIONS:
        raise ValueError(
            f"load_sae: {cfg_path} has normalize_activations={norm!r}; arcstream applies {NORMALIZATIONS} as "
            "SAELens does at run time (fold any other normalisation into the weights first)"
        )
    w = load_safetensors(data[WEIGHTS_FILE])
    d_in, d_sae = int(cfg_json["d_in"]), int(cfg_json["d_sae"])
    d_out = int(cfg_json.get("d_out", d_in)) if arch == "jumprelu_transcoder" else d_in
    for name, want in (("W_enc", (d_in, d_sae)), ("W_dec", (d_sae, d_out)), ("b_enc", (d_sae,)), ("b_dec", (d_out,))):
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
    if arch == "jumprelu_transcoder":
        meta = cfg_json.get("metadata") or {}
        kw.update(d_out=d_out, input_site=str(meta.get("hook_name") or ""),
                  target_site=str(meta.get("hook_name_out") or ""))
    if arch in ("jumprelu", "jumprelu_transcoder"):
        if "threshold" not in w:
            raise ValueError(f"load_sae: {w_path} has no 'threshold' tensor, which a jumprelu SAE needs")
        params["log_threshold_s"] = jnp.log(jnp.asarray(w["threshold"], jnp.float32))
    if arch == "topk":
        kw["k"] = int(cfg_json.get("k", 100))  # SAELens's default when k is absent
        if cfg_json.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"load_sae: {cfg_path} has rescale_acts_by_decoder_norm=true; not supported")
    # SAELens folds expected_average_only_in's factor into the weights when it saves; at run time it is identity.
    kw["normalize_activations"] = "none" if norm == "expected_average_only_in" else norm
    cfg = SAEConfig(arch, d_in, d_sae, apply_b_dec_to_input=bool(cfg_json.get("apply_b_dec_to_input", True)), **kw)
    buffers = {"scale": jnp.ones((), jnp.float32)}
    return params, cfg, buffers, cfg_json


# SAELens's run-time input normalisations (`normalize_activations` in cfg.json) that load_sae accepts.
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def _normalise(cfg: SAEConfig, x_bd):
    """(x as the SAE's encoder sees it, the map of a reconstruction back to x's space), as SAELens's
    `run_time_activation_norm_fn_in/out`: constant_norm_rescale scales each token to norm sqrt(d_in);
    layer_norm subtracts each token's mean and divides by its (unbiased, as torch's) std + 1e-5."""
    if cfg.normalize_activations == "constant_norm_rescale":
        norm = jnp.linalg.norm(x_bd, axis=-1, keepdims=True)
        coeff = cfg.d_in ** 0.5 / jnp.where(norm > 0, norm, 1.0)  # all-zero padding rows stay finite
        return x_bd * coeff, lambda y: y / coeff
    if cfg.normalize_activations == "layer_norm":
        mu = x_bd.mean(axis=-1, keepdims=True)
        centred = x_bd - mu
        std = jnp.std(centred, axis=-1, keepdims=True, ddof=1)
        return centred / (std + 1e-5), lambda y: y * std + mu
    return x_bd, lambda y: y


def _encode_normalised(params: Params, cfg: SAEConfig, x_bd, buffers: Buffers | None):
    buffers = _trained_buffers(buffers)
    scale = buffers.pop("scale", 1.0)
    return get_architecture(cfg.architecture).encode(params, buffers, x_bd * scale, cfg, cfg.hparams())


def encode(params: Params, cfg: SAEConfig, x_bd, buffers: Buffers | None = None):
    """Inference encoding of raw activations (scale and input normalisation applied) -> acts [B, d_sae]."""
    x_bd, _ = _normalise(cfg, jnp.asarray(x_bd, jnp.float32))
    return _encode_normalised(params, cfg, x_bd, buffers)


def reconstruct(params: Params, cfg: SAEConfig, x_bd, buffers: Buffers | None = None):
    """(acts [B, d_sae], reconstruction [B, d_out] in x's raw space): encode, decode, and undo the input
    normalisation of `cfg` (what every consumer of a reconstruction should call)."""
    x_bd, back = _normalise(cfg, jnp.asarray(x_bd, jnp.float32))
    acts = _encode_normalised(params, cfg, x_bd, buffers)
    return acts, back(decode(params, acts, buffers))


def decode(params: Params, acts_bs, buffers: Buffers | None = None):
    """Decode to raw activation space (scale undone; a transcoder's target scale). An SAE with an input
    normalisation needs the input to map back: use `reconstruct`."""
    buffers = buffers or {}
    scale = buffers.get("target_scale", buffers.get("scale", 1.0))
    return decode_scaled(params, jnp.asarray(acts_bs)) / scale


_LOADABLE = ("standard", "topk", "jumprelu", "jumprelu_transcoder")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
CIRCUIT_TRACER_CONFIG = "config.yaml"


@dataclass(frozen=True)
class _TracerLayer:
    """One transcoder folder read for circuit-tracer: its layer, hooks (without `blocks.L.`), width, weights."""

    layer: int
    hook_in: str
    hook_out: str
    d_sae: int
    model_name: str | None
    architecture: str
    weights: dict[str, np.ndarray]  # SAELens's tensors as stored


def _read_tracer_layer(folder: str | Path) -> _TracerLayer:
    """A SAELens transcoder folder as circuit-tracer's layer tensors, refusing what circuit-tracer cannot load."""
    location = RunLocation(folder)
    raw_cfg, raw_w = location.read_bytes(CFG_FILE), location.read_bytes(WEIGHTS_FILE)
    if raw_cfg is None or raw_w is None:
        raise FileNotFoundError(f"export_circuit_tracer: {folder} lacks {CFG_FILE} or {WEIGHTS_FILE}")
    cfg_json, w = json.loads(raw_cfg), load_safetensors(raw_w)
    arch = cfg_json.get("architecture")
    if arch not in ("jumprelu_transcoder", "transcoder"):
        raise ValueError(f"export_circuit_tracer: {folder} has architecture={arch!r}; expected a transcoder "
                         "(jumprelu_transcoder or transcoder: train sae.architecture=batchtopk_transcoder)")
    meta = cfg_json.get("metadata") or {}
    m_in, m_out = _HOOK_RE.match(str(meta.get("hook_name") or "")), _HOOK_RE.match(str(meta.get("hook_name_out")
                                                                                         or ""))
    if not m_in or not m_out or m_in.group(1) != m_out.group(1):
        raise ValueError(f"export_circuit_tracer: {folder} has hook_name={meta.get('hook_name')!r}, "
                         f"hook_name_out={meta.get('hook_name_out')!r}; circuit-tracer needs blocks.L.X -> "
                         "blocks.L.Y of one layer L")
    d_in, d_out = int(cfg_json["d_in"]), int(cfg_json.get("d_out", cfg_json["d_in"]))
    if d_in != d_out:
        raise ValueError(f"export_circuit_tracer: {folder} maps d_in={d_in} to d_out={d_out}; circuit-tracer's "
                         "per-layer transcoders have one width d_model for both")
    if cfg_json.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"export_circuit_tracer: {folder} has normalize_activations="
                         f"{cfg_json['normalize_activations']!r}; circuit-tracer applies none")
    return _TracerLayer(int(m_in.group(1)), m_in.group(2), m_out.group(2), int(cfg_json["d_sae"]),
                        meta.get("model_name"), arch, w)


def _tracer_tensors(t: _TracerLayer) -> dict[str, np.ndarray]:
    """circuit-tracer's names and layout of one layer: W_enc transposed, JumpReLU's threshold renamed."""
    w = t.weights
    tensors = {"W_enc": np.ascontiguousarray(w["W_enc"].T), "W_dec": w["W_dec"], "b_enc": w["b_enc"],
               "b_dec": w["b_dec"]}
    if t.architecture == "jumprelu_transcoder":
        tensors["activation_function.threshold"] = w["threshold"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def _check_tracer_set(layers: dict[int, _TracerLayer]) -> None:
    """circuit-tracer's replacement model swaps every MLP: a transcoder for every layer 0..max, one hook pair
    and one d_sae."""
    if not layers:
        raise ValueError("export_circuit_tracer: no transcoder folders given")
    if sorted(layers) != list(range(max(layers) + 1)):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise ValueError(f"export_circuit_tracer: layers {sorted(layers)} leave out {missing}; circuit-tracer needs a "
                         "transcoder for every layer from 0 to the last")
    hooks_in, hooks_out = {t.hook_in for t in layers.values()}, {t.hook_out for t in layers.values()}
    widths = {t.d_sae for t in layers.values()}
    if len(hooks_in) > 1 or len(hooks_out) > 1 or len(widths) > 1:
        raise ValueError(f"export_circuit_tracer: the layers differ in input hooks {sorted(hooks_in)}, output hooks "
                         f"{sorted(hooks_out)} or d_sae {sorted(widths)}; circuit-tracer needs one of each")


def export_circuit_tracer(
    folders: Sequence[str | Path], out_dir: str | Path, *, model_name: str | None = None, scan: str | None = None
) -> Path | str:
    """Write transcoder exports (SAELens `jumprelu_transcoder` / `transcoder` folders, one per layer) as a
    circuit-tracer transcoder set; returns `out_dir`.

    circuit-tracer's per-layer transcoder set (`model_kind: transcoder_set`) is a folder of
    `layer_{L}.safetensors` with W_enc [d_sae, d_model] (the transpose of SAELens's), W_dec
    [d_sae, d_model], b_enc [d_sae], b_dec [d_model] and, for JumpReLU,
    `activation_function.threshold` [d_sae], beside a `config.yaml` naming `model_name`,
    `feature_input_hook` and `feature_output_hook` (TransformerLens hook names without the
    `blocks.L.` prefix, e.g. hook_resid_mid -> hook_mlp_out). What it requires, checked here:
    one transcoder for every layer 0..max (its replacement model swaps every MLP), the same
    input and output hook and d_sae in every layer, and d_in == d_out (one d_model); the
    model itself must be one circuit-tracer runs (TransformerLens or nnsight).
    Local folder: load with `circuit_tracer.transcoder.single_layer_transcoder.load_transcoder_set`
    ({L: path}); uploaded to the hub: `ReplacementModel.from_pretrained(model_name, "user/repo")`.
    """
    layers: dict[int, _TracerLayer] = {}
    tensors: dict[int, dict[str, np.ndarray]] = {}
    for folder in folders:
        t = _read_tracer_layer(folder)
        if t.layer in layers:
            raise ValueError(f"export_circuit_tracer: two transcoders for layer {t.layer} ({folder})")
        layers[t.layer], tensors[t.layer] = t, _tracer_tensors(t)
        model_name = model_name or t.model_name
    _check_tracer_set(layers)
    location = RunLocation(out_dir)
    for layer in sorted(layers):
        location.write_bytes_atomic(f"layer_{layer}.safetensors", save_safetensors(tensors[layer]))
    first = layers[0]
    fields = {"model_kind": "transcoder_set", "model_name": model_name or "",
              "feature_input_hook": first.hook_in, "feature_output_hook": first.hook_out}
    if scan:
        fields["scan"] = scan
    # JSON-quoted scalars are valid YAML (no YAML library needed to write it).
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())
    location.write_bytes_atomic(CIRCUIT_TRACER_CONFIG, text.encode())
    return str(out_dir) if is_url(out_dir) else Path(out_dir)
