"""Pretrained SAEs as the start of training (`sae.init_from`, both the online and the offline trainer).

`sae.init_from=PATH[,PATH]` names SAELens folders (arcstream's exports or SAELens's own `save_model`
output; local paths or kvstore URLs) or releases of SAELens's pretrained table, `sae_lens:RELEASE@SAE_ID`
(`resolve_folder`; the analysis's `--config.saes` takes the same). Each folder's cfg.json names its site
(`metadata.hook_name`, a transcoder's `hook_name_out` too); its weights replace the fresh initialisation of the spec that trains
that site, every sweep member alike. A resumed run restores its checkpoint instead: init_from only starts
a run.

Checked, each refused with a message that names the folder and the setting to change: the site is one the
job trains; d_in, d_sae (and a transcoder's d_out) are the spec's; the folder's parameters are exactly the
ones `sae.architecture` trains (a JumpReLU folder, e.g. a Gemma Scope SAE or a BatchTopK export, starts a
`jumprelu` run; a TopK folder a `topk` or `batchtopk` run); `apply_b_dec_to_input` agrees; no run-time
input normalisation (a `normalize_activations` SAE would be trained on inputs it never sees that way).

Units: the trainer sees inputs scaled by the run's `scale` buffer (E||x|| = sqrt(d_in) on its first batch)
and exports by folding the scale back (`export_sae`). The loaded weights are mapped into those units
(W_enc / scale, W_dec and b_dec x the output scale), so the SAE computes the same function on raw
activations as the folder's: exported again before any update, it gives back the folder's weights.
Architectures that keep decoder rows at unit norm (topk, batchtopk) take the output scale from the folder
instead (the one that makes its rows unit norm on average), which is exact when the rows share one norm (an
arcstream export, or any SAE trained with that constraint); rows of unequal norms are then normalised with
each norm folded into its latent's encoder row and bias: the same reconstruction for ReLU-style latents,
and for TopK a change only where the norms reorder which latents win.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from arcstream.sae.architectures import SAEConfig, get_architecture, unit_norm_decoder
from arcstream.sae.export import hook_name, load_sae
from arcstream.sae.train import SiteState, TrainState
from arcstream.sae.transcoder import transcoder_key

FLAG = "--config.sae.init_from"
RELEASE_PREFIX = "sae_lens:"  # sae_lens:RELEASE@SAE_ID, e.g. sae_lens:gemma-scope-2b-pt-res-canonical@layer_20/width_16k/canonical


def parse_init_from(value: str, *, flag: str = FLAG) -> list[str]:
    """The folders of a comma-separated list of SAELens folders and SAELens releases (`RELEASE_PREFIX`)."""
    return [resolve_folder(p.strip(), flag=flag) for p in str(value or "").split(",") if p.strip()]


def release_cache_dir() -> Path:
    """Where SAELens releases are saved as SAELens folders (`ARCSTREAM_SAE_CACHE`, else ~/.cache/arcstream/saes)."""
    return Path(os.environ.get("ARCSTREAM_SAE_CACHE", "~/.cache/arcstream/saes")).expanduser()


def resolve_folder(spec: str, *, flag: str = FLAG) -> str:
    """A SAELens folder for `spec`: a folder (path or URL) as given, or `sae_lens:RELEASE@SAE_ID`, a release of
    SAELens's pretrained table, downloaded once by SAELens (`SAE.from_pretrained`, needs the network and
    `sae_lens`) and saved with its `save_model` under `release_cache_dir()/RELEASE/SAE_ID`, which later runs
    read without the network. The release and id are checked against the table SAELens ships (offline)."""
    if not spec.startswith(RELEASE_PREFIX):
        return spec
    release, sep, sae_id = spec[len(RELEASE_PREFIX):].partition("@")
    if not sep or not release or not sae_id:
        raise ValueError(f"{flag}: {spec!r} is not {RELEASE_PREFIX}RELEASE@SAE_ID (e.g. "
                         f"{RELEASE_PREFIX}gemma-scope-2b-pt-res-canonical@layer_20/width_16k/canonical)")
    folder = release_cache_dir() / release / sae_id
    if (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file():
        return str(folder)
    try:
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise ValueError(f"{flag}: {spec!r} names a SAELens release; install sae_lens (pip install sae-lens) or "
                         "give the SAE's folder") from None
    table = get_pretrained_saes_directory()
    if release not in table:
        near = difflib.get_close_matches(release, list(table), n=5, cutoff=0.5)
        raise ValueError(f"{flag}: {release!r} is not a release in SAELens's pretrained table"
                         + (f"; close: {near}" if near else f" ({len(table)} releases, e.g. {sorted(table)[:3]})"))
    ids = list(table[release].saes_map)
    if sae_id not in ids:
        near = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5) or ids[:5]
        raise ValueError(f"{flag}: release {release!r} has no SAE {sae_id!r} ({len(ids)} ids, e.g. {near})")
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as err:  # the hub's errors are many (offline, auth, missing file); say which SAE and why
        raise ValueError(f"{flag}: downloading {release}@{sae_id} from the HF hub ({table[release].repo_id}) "
                         f"failed: {type(err).__name__}: {err}. Without the network, give a folder saved with "
                         f"SAELens's save_model, or put one at {folder}") from err
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    sae.save_model(str(tmp))
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return str(folder)


def load_pretrained(folders: Sequence[str], specs: Mapping[str, list[SAEConfig]], *,
                    flag: str = FLAG) -> dict[str, dict[str, jax.Array]]:
    """{spec key: the folder's params (raw-activation units)} for `folders`, each checked against `specs`."""
    out: dict[str, dict[str, jax.Array]] = {}
    for folder in folders:
        params, cfg, _, cfg_json = load_sae(folder)
        hook = hook_name(cfg_json)
        key = transcoder_key(hook, cfg.target_site) if cfg.target_site else hook
        if key not in specs:
            raise ValueError(f"{flag}: {folder} is an SAE of {key!r} (its cfg.json's hook name), which this job "
                             f"does not train (it trains {sorted(specs)}); capture that site or give an SAE of one "
                             "of these")
        if key in out:
            raise ValueError(f"{flag}: two folders for {key!r}; give one SAE per trained site")
        spec = specs[key][0]
        for name, got, want in (("d_in", cfg.d_in, spec.d_in), ("d_sae", cfg.d_sae, spec.d_sae),
                                ("d_out", cfg.d_target, spec.d_target)):
            if got != want:
                fix = f"set --config.sae.d_sae={got}" if name == "d_sae" else "the SAE is for another site or model"
                raise ValueError(f"{flag}: {folder} has {name}={got} but the {key!r} SAE this job trains has "
                                 f"{name}={want}; {fix}")
        if cfg.normalize_activations != "none":
            raise ValueError(f"{flag}: {folder} normalises its inputs at run time (normalize_activations="
                             f"{cfg.normalize_activations!r}); arcstream trains on raw activations: fold the "
                             "normalisation into the weights first")
        if cfg.apply_b_dec_to_input != spec.apply_b_dec_to_input:
            raise ValueError(f"{flag}: {folder} has apply_b_dec_to_input={cfg.apply_b_dec_to_input} but "
                             f"sae.architecture={spec.architecture!r} trains with {spec.apply_b_dec_to_input}")
        arch = get_architecture(spec.architecture)
        fresh = jax.eval_shape(lambda: arch.init(jax.random.PRNGKey(0), spec))
        want_keys = {k: tuple(v.shape) for k, v in fresh.items()}
        got_keys = {k: tuple(v.shape) for k, v in params.items()}
        if want_keys != got_keys:
            raise ValueError(f"{flag}: {folder} is a {cfg_json.get('architecture')!r} SAE (parameters "
                             f"{sorted(got_keys)}), which cannot start sae.architecture={spec.architecture!r} "
                             f"(parameters {sorted(want_keys)}); set --config.sae.architecture to "
                             f"{'jumprelu' if 'log_threshold_s' in got_keys else 'topk'}")
        out[key] = params
    return out


def apply_pretrained(state: TrainState, specs: Mapping[str, list[SAEConfig]],
                     pretrained: Mapping[str, Mapping[str, jax.Array]]) -> TrainState:
    """`state` with each pretrained site's params replaced (every member), in the trainer's units (module
    docstring); optimiser state and dead-latent counters stay fresh. Shardings are kept."""
    sites = dict(state.sites)
    for key, raw in pretrained.items():
        site = sites[key]
        spec = specs[key][0]
        members = len(specs[key])
        buffers = dict(site.buffers)
        p = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()}
        out_key = "target_scale" if "target_scale" in buffers else "scale"
        unit_norm = get_architecture(spec.architecture).constrain is unit_norm_decoder
        if unit_norm:
            # The decoder's units are the folder's: the output scale that makes its rows unit norm on average
            # (exactly, when they share one norm: an arcstream export, which folded its own scale into them).
            norm = jnp.linalg.norm(p["w_dec_sd"], axis=1).mean()
            buffers[out_key] = _like(buffers[out_key], jnp.full((members,), 1.0 / jnp.maximum(norm, 1e-12)))
        scale = jnp.asarray(buffers["scale"])[0]
        out_scale = jnp.asarray(buffers[out_key])[0]
        p["w_enc_sd"] = p["w_enc_sd"] / scale
        p["w_dec_sd"] = p["w_dec_sd"] * out_scale
        p["b_dec_d"] = p["b_dec_d"] * out_scale
        if unit_norm:  # rows of unequal norms: each row's norm folded into its latent's encoder row and bias
            norm_s = jnp.maximum(jnp.linalg.norm(p["w_dec_sd"], axis=1), 1e-8)
            p["w_dec_sd"] = p["w_dec_sd"] / norm_s[:, None]
            p["w_enc_sd"] = p["w_enc_sd"] * norm_s[:, None]
            p["b_enc_s"] = p["b_enc_s"] * norm_s
        params = {k: _like(site.params[k], jnp.broadcast_to(p[k], (members,) + p[k].shape)) for k in site.params}
        if "encoder_step" in buffers:  # the fresh init's fitted encoder scale (sae/train.py) is not these weights'
            buffers["encoder_step"] = _like(buffers["encoder_step"], jnp.ones((members,), jnp.float32))
        sites[key] = SiteState(params=params, opt_state=site.opt_state, buffers=buffers)
    return TrainState(sites=sites, step=state.step)


def _like(old: Any, new: jax.Array) -> jax.Array:
    """`new` with `old`'s dtype and (for a sharded jax.Array) sharding."""
    new = new.astype(old.dtype)
    return jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new


def init_from_pretrained(state: TrainState, specs: Mapping[str, list[SAEConfig]], value: str, *,
                         flag: str = FLAG, log: Any = None) -> TrainState:
    """`sae.init_from` applied to a fresh state (nothing to do when it is empty)."""
    folders = parse_init_from(value, flag=flag)
    if not folders:
        return state
    pretrained = load_pretrained(folders, specs, flag=flag)
    if log is not None:
        log(f"SAEs initialised from {', '.join(f'{k} <- {f}' for k, f in zip(pretrained, folders))}")
    return apply_pretrained(state, specs, pretrained)


__all__ = ["RELEASE_PREFIX", "apply_pretrained", "init_from_pretrained", "load_pretrained", "parse_init_from",
           "release_cache_dir", "resolve_folder"]
