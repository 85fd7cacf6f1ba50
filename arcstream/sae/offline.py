"""The offline SAE trainer: stored activations -> Grain batches -> the shared step -> exports.

`train_offline(config, source)` trains one SAE (or a sweep) per site on a
`run_dir`'s stored activations, checkpointing with Orbax (state + Grain iterator)
every `checkpoint_every` steps, and resumes from the latest checkpoint if one
exists: a run killed after a checkpoint and restarted ends with exactly the
parameters of an uninterrupted run. Exports go to `run_dir/saes/<site>/`
(a sweep adds `<member>/`), metrics to `run_dir/saes/metrics.jsonl`.

`run_dir` is a local path or a kvstore URL (`file://`, `memory://`, `gs://`):
exports and metrics go through `RunLocation` (never `Path(run_dir)`, which
turns `gs://b/run` into the relative path `gs:/b/run`). Orbax checkpoints go to
`checkpoint_dir` (default `run_dir/saes/checkpoints`; required for URLs Orbax
cannot write, e.g. `memory://`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from arcstream.sae.architectures import SWEEPABLE, SAEConfig, member_names
from arcstream.sae.checkpoint import SAECheckpointer
from arcstream.sae.data import ActivationSource, batch_dataset
from arcstream.sae.export import export_sae
from arcstream.sae.train import TrainConfig, TrainState, batch_sites, init_train_state, make_train_step, member_state
from arcstream.io import JsonlLog, checkpoint_dir, join_location, truncate_metrics


def parse_sweep(sweep: str) -> dict[str, list[Any]]:
    """`"k=16,32;l1_coefficient=1,5"` -> {"k": [16, 32], "l1_coefficient": [1.0, 5.0]} (zipped, equal lengths)."""
    out: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in sweep.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in SWEEPABLE or not values:
            raise ValueError(f"sae.sweep entry {part!r}: expected NAME=V1,V2,... with NAME in {SWEEPABLE}")
        cast = int if name == "k" else float
        out[name] = [cast(v) for v in values.split(",")]
    lengths = {n: len(v) for n, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sae.sweep lists differ in length {lengths}; members are zipped, so they must match")
    return out


def parse_widths(value: Any) -> tuple[int, ...]:
    """`sae.matryoshka_widths`: "" (none), "256,1024,4096" or a sequence of ints -> a tuple of ints."""
    if value is None or value == "":
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except ValueError:
        raise ValueError(f"sae.matryoshka_widths={value!r}: expected comma-separated integers, e.g. "
                         "'256,1024,4096' (strictly increasing, the last = d_sae)") from None


def site_specs(sae_cfg: Mapping[str, Any], d_in_by_site: Mapping[str, int]) -> dict[str, list[SAEConfig]]:
    """The SAE configs from the `sae.*` config keys: one spec per site (an SAE or a sweep on it) or,
    for a transcoder architecture, the one spec `sae.input_site` -> `sae.target_site`
    (keyed `transcoder_key(input, target)`); `d_in_by_site` gives every available site's width."""
    from arcstream.sae.architectures import get_architecture
    from arcstream.sae.transcoder import transcoder_key

    arch = str(sae_cfg["architecture"])
    input_site = str(sae_cfg.get("input_site", "") or "")
    target_site = str(sae_cfg.get("target_site", "") or "")
    if get_architecture(arch).transcoder:
        for flag, s in (("sae.input_site", input_site), ("sae.target_site", target_site)):
            if s not in d_in_by_site:
                raise ValueError(f"--config.{flag}={s!r}: sae.architecture={arch!r} is a transcoder and needs an "
                                 f"input and a target site among {sorted(d_in_by_site)} (e.g. "
                                 "blocks.L.hook_resid_mid -> blocks.L.hook_mlp_out)")
        if input_site == target_site:
            raise ValueError(f"--config.sae.input_site and sae.target_site are both {input_site!r}; a transcoder "
                             "reconstructs another site (for the same site train an SAE)")
        routes = {transcoder_key(input_site, target_site): (d_in_by_site[input_site],
                                                            dict(d_out=d_in_by_site[target_site],
                                                                 input_site=input_site, target_site=target_site,
                                                                 apply_b_dec_to_input=False))}
    elif input_site or target_site:
        raise ValueError(f"--config.sae.input_site={input_site!r} / sae.target_site={target_site!r} are set but "
                         f"sae.architecture={arch!r} is an autoencoder; use a transcoder architecture "
                         "(batchtopk_transcoder, jumprelu_transcoder) or leave them empty")
    else:
        routes = {site: (d_in, {}) for site, d_in in d_in_by_site.items()}
    widths = parse_widths(sae_cfg.get("matryoshka_widths", ""))
    specs = {}
    sweep = parse_sweep(str(sae_cfg.get("sweep", "") or ""))
    n = len(next(iter(sweep.values()))) if sweep else 1
    for site, (d_in, route) in routes.items():
        d_sae = int(sae_cfg.get("d_sae", 0) or 0) or int(sae_cfg["expansion_factor"]) * d_in
        base = dict(
            architecture=arch, d_in=d_in, d_sae=d_sae, k=int(sae_cfg["k"]),
            l1_coefficient=float(sae_cfg["l1_coefficient"]), l0_coefficient=float(sae_cfg["l0_coefficient"]),
            aux_coefficient=float(sae_cfg["aux_coefficient"]), lr=float(sae_cfg["lr"]),
            dead_steps=int(sae_cfg["dead_steps"]), b_dec_init=str(sae_cfg["b_dec_init"]),
            jumprelu_bandwidth=float(sae_cfg["jumprelu_bandwidth"]),
            jumprelu_init_threshold=float(sae_cfg["jumprelu_init_threshold"]),
            matryoshka_widths=widths,
            use_matryoshka_aux_loss=bool(sae_cfg.get("use_matryoshka_aux_loss", False)),
            **route,
        )
        try:
            specs[site] = [SAEConfig(**{**base, **{f: v[i] for f, v in sweep.items()}}) for i in range(n)]
        except ValueError as e:
            raise ValueError(f"sae.* for {site!r} (d_in {d_in}, d_sae {d_sae}): {e}") from None
    return specs


def export_all(state: TrainState, specs: Mapping[str, list[SAEConfig]], saes_dir: str | Path,
               model_name: str | None = None) -> list[Path | str]:
    """Export every member: `saes_dir/<site>/` or, for a sweep, `saes_dir/<site>/<member>/`.

    `saes_dir`: a local path (folders come back as `Path`s) or a kvstore URL (URL strings).
    """
    out = []
    for site, members in specs.items():
        names = member_names(members)
        for i, cfg in enumerate(members):
            params, buffers = member_state(state, site, i)
            folder = join_location(saes_dir, site) if len(members) == 1 else join_location(saes_dir, site, names[i])
            out.append(export_sae(params, cfg, folder, hook_name=cfg.input_site or site, buffers=buffers,
                                  model_name=model_name))
    return out


def use_compilation_cache(directory: str) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (`~` expanded; "" = leave it off).

    Call before the first compilation (the entry point does, from `compilation_cache_dir`).
    Every program is kept, however fast it compiled, so a rerun with the same shapes
    compiles nothing. The directory is created private (mode 0700): JAX executes what it
    finds there. Returns the directory in use, or None.
    """
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(str(directory)))
    os.makedirs(path, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def train_offline(
    config: Any,
    source: ActivationSource,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train SAEs on `source` per `config` (see configs/train_sae.py); returns a summary dict."""
    run_dir = str(config.run_dir)
    sae_cfg = config.sae
    sites = [s.strip() for s in str(config.sites or "").split(",") if s.strip()] or list(source.sites)
    unknown = [s for s in sites if s not in set(source.sites)]
    if unknown:
        raise ValueError(f"--config.sites: {unknown} not in the run's stored sites {list(source.sites)}")
    d_in = {s: int(source.activations(s).shape[1]) for s in sites}
    specs = site_specs(sae_cfg, d_in)
    sites = batch_sites(specs)  # only what the specs read (a transcoder: its input and target sites)
    batch_size = int(sae_cfg.batch_size)
    total_steps = max(1, int(sae_cfg.train_tokens) // batch_size)
    tc = TrainConfig(
        total_steps=total_steps,
        warmup_steps=min(int(sae_cfg.warmup_steps), total_steps),
        decay_steps=min(int(round(float(sae_cfg.decay_fraction) * total_steps)),
                        total_steps - min(int(sae_cfg.warmup_steps), total_steps)),
        clip_norm=float(sae_cfg.clip_norm),
        seed=int(config.seed),
    )
    ds = batch_dataset(source, sites, batch_size, chunk_rows=int(sae_cfg.chunk_rows), seed=int(config.seed))
    # One reader thread, two batches ahead (a step takes seconds on a CPU, milliseconds to read).
    # Grain's default, 16 threads and 500 batches ahead, held ~7 GB of 4096 x 896 float32 batches
    # and read ahead of a short run on the very cores its steps need.
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    saes_dir = join_location(run_dir, "saes")
    ckpt = SAECheckpointer(checkpoint_dir(str(config.get("checkpoint_dir", "") or ""), run_dir, "saes", "checkpoints",
                                           flag="--config.checkpoint_dir", output_flag="--config.run_dir"),
                           flag="--config.checkpoint_dir")
    metrics_path = join_location(saes_dir, "metrics.jsonl")

    # The init batch is batch 0 read on its own (not from the training iterator), so the
    # training iterator's position depends only on the step (resume-safe).
    first = ds[0]
    state = init_train_state(specs, tc, first)
    start = 0
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, it)
        start = int(state.step)
        log(f"resumed SAE training from step {start} ({ckpt.directory})")
    # Lines past the restart step were logged by a killed attempt (one killed before its first
    # checkpoint restarts at 0): they are logged again.
    truncate_metrics(metrics_path, start)
    step = make_train_step(specs, tc)
    every = int(config.checkpoint_every)
    log_every = max(1, int(config.log_every))
    stop_after = int(config.get("stop_after_steps", 0) or 0)
    names = {site: member_names(m) for site, m in specs.items()}
    t0, last = time.perf_counter(), {}
    metrics_log = JsonlLog(metrics_path)
    for s in range(start, total_steps):
        state, metrics = step(state, next(it))
        done = s + 1
        if done % log_every == 0 or done == total_steps:
            host = jax.device_get(metrics)
            for site, m in host.items():
                for i, name in enumerate(names[site]):
                    rec = {"job": "train_sae", "step": done, "site": site, "member": name,
                           **{k: float(np.asarray(v)[i]) for k, v in m.items()}}
                    metrics_log.append(rec)
                    last[(site, name)] = rec
            if metrics_log.appends:
                metrics_log.flush()
        if (every and done % every == 0) or done == total_steps:
            metrics_log.flush()
            ckpt.save(state, it, wait=done < total_steps)  # the last one is written while the exports are
        if stop_after and done >= stop_after and done < total_steps:
            ckpt.close()
            return {"stopped_at": done, "total_steps": total_steps}
    metrics_log.flush()
    elapsed = time.perf_counter() - t0
    exports = export_all(state, specs, saes_dir, model_name=config.get("model_name") or None)
    ckpt.close()
    tokens = (total_steps - start) * batch_size
    return {
        "total_steps": total_steps,
        "resumed_from": start,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "exports": [str(p) for p in exports],
        "final": {f"{k[0]}/{k[1]}": v for k, v in last.items()},
        # "dead" in the summary: no fire on the window's tokens (the trainer's counter), said with its size
        "dead": {f"{site}/{name}": {"d_sae": cfg.d_sae, "window_tokens": min(total_steps, cfg.dead_steps) * batch_size}
                 for site, members in specs.items() for name, cfg in zip(names[site], members)},
        "state": state,
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A one-screen summary of a finished run."""
    lines = [f"SAE training: {summary['total_steps']} steps (resumed from {summary['resumed_from']}), "
             f"{summary['tokens_per_s']:.0f} tokens/s"]
    for key, rec in sorted(summary["final"].items()):
        d = summary["dead"][key]
        dead = int(round(rec["dead_fraction"] * d["d_sae"]))
        # "dead" means what it means in the analysis and the run summary: never fired on the tokens
        # named (here the trainer's window of its last sae.dead_steps steps, or all of a shorter run)
        lines.append(f"  {key}: loss {rec['loss']:.4g}  L0 {rec['l0']:.1f}  FVU {rec['fvu']:.3f}  "
                     f"dead {dead} of {d['d_sae']} ({dead / d['d_sae']:.1%}, never fired on the last "
                     f"{d['window_tokens']:,} training tokens)  dense {rec['dense_fraction']:.3f}")
    lines += [f"  export: {p}" for p in summary["exports"]]
    return lines


__all__ = ["export_all", "parse_sweep", "parse_widths", "site_specs", "summary_lines", "train_offline",
           "use_compilation_cache"]
