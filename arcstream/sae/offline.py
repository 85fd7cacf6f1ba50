"""The offline SAE trainer: stored activations -> Grain batches -> the shared step -> exports.

`train_offline(options, source)` trains one SAE (or a sweep) per site on a
`run_dir`'s stored activations, checkpointing with Orbax (state + Grain iterator)
every `checkpoint_every` steps, and resumes from the latest checkpoint if one
exists: a run killed after a checkpoint and restarted ends with exactly the
parameters of an uninterrupted run. Exports go to `run_dir/saes/<site>/`
(a sweep adds `<member>/`), metrics to `run_dir/saes/metrics.jsonl`.

`run_dir` is a local path or a kvstore URL (`file://`, `memory://`, `gs://`):
exports and metrics go through `RunLocation` (never `Path(run_dir)`, which
turns `gs://b/run` into the relative path `gs:/b/run`). Orbax checkpoints go to
`checkpoint_dir` (default `run_dir/saes/train_sae_checkpoints`; required for URLs Orbax
cannot write, e.g. `memory://`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from arcstream.sae.architectures import SAEConfig, member_names
from arcstream.sae.checkpoint import SAECheckpointer
from arcstream.sae.data import ActivationSource, batch_dataset
from arcstream.sae.export import export_sae
from arcstream.sae.options import SAEOptions, TrainSAEOptions
from arcstream.sae.pretrained import apply_pretrained, load_pretrained, parse_init_from
from arcstream.sae.train import TrainConfig, TrainState, batch_sites, init_train_state, make_train_step, member_state
from arcstream.io import JsonlLog, checkpoint_dir, join_location, resume_fingerprint, truncate_metrics


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


def _offline_specs(job: TrainSAEOptions, opts: SAEOptions, source: ActivationSource) -> dict[str, list[SAEConfig]]:
    """The specs to train: `sites` (default: every stored site), each site's width from the store."""
    sites = job.site_list or list(source.sites)
    unknown = [s for s in sites if s not in set(source.sites)]
    if unknown:
        raise ValueError(f"--config.sites: {unknown} not in the run's stored sites {list(source.sites)}")
    d_in = {s: int(source.activations(s).shape[1]) for s in sites}
    return opts.site_specs(d_in)


def _start_state(state: TrainState, ckpt: SAECheckpointer, it, specs, pretrained, init_from: str,
                 log: Callable[[str], None]) -> tuple[TrainState, int]:
    """(state, first step): the latest checkpoint if there is one (the iterator restored with it), else the
    pretrained SAEs of `sae.init_from` if any, else the fresh `state`."""
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, it)
        log(f"resumed SAE training from step {int(state.step)} ({ckpt.directory})")
        return state, int(state.step)
    if pretrained:
        state = apply_pretrained(state, specs, pretrained)
        log(f"SAEs start from {init_from} ({', '.join(pretrained)})")
    return state, 0


def _log_step(metrics_log: JsonlLog, metrics, names: Mapping[str, list[str]], done: int,
              last: dict[tuple[str, str], dict[str, Any]]) -> None:
    """One metrics line per member (`last` keeps each member's latest line for the summary)."""
    host = jax.device_get(metrics)
    for site, m in host.items():
        for i, name in enumerate(names[site]):
            rec = {"job": "train_sae", "step": done, "site": site, "member": name,
                   **{k: float(np.asarray(v)[i]) for k, v in m.items()}}
            metrics_log.append(rec)
            last[(site, name)] = rec
    if metrics_log.appends:
        metrics_log.flush()


def _checkpointer(job: TrainSAEOptions, run_dir: str, fingerprint: dict[str, Any]) -> SAECheckpointer:
    """Orbax checkpoints in `checkpoint_dir`, default `run_dir/saes/train_sae_checkpoints`, tied to `fingerprint`.

    Not the run job's `saes/checkpoints` (its online SAEs' resume state): train_sae on a run's
    store found those and refused to start (they record no train_sae configuration)."""
    return SAECheckpointer(checkpoint_dir(job.checkpoint_dir, run_dir, "saes", "train_sae_checkpoints",
                                          flag="--config.checkpoint_dir", output_flag="--config.run_dir"),
                           flag="--config.checkpoint_dir", fingerprint=fingerprint)


def _fingerprint(specs: Mapping[str, list[SAEConfig]], tc: TrainConfig, opts: SAEOptions) -> dict[str, Any]:
    """What a resumed train_sae must repeat: each site's SAEs, the schedule and optimiser, the batches (how
    often to log or save, where checkpoints go and the stop step may change)."""
    return resume_fingerprint({
        "sites": {site: {name: dataclasses.asdict(c) for name, c in zip(member_names(members), members)}
                  for site, members in sorted(specs.items())},
        "train": dataclasses.asdict(tc), "batch_size": opts.batch_size, "chunk_rows": opts.chunk_rows,
    }, ())


def _summary(state: TrainState, specs, names, last, exports, start: int, total_steps: int, batch_size: int,
             elapsed: float) -> dict[str, Any]:
    """train_offline's summary dict (`summary_rows` prints it)."""
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


def train_offline(
    config: TrainSAEOptions | Any,
    source: ActivationSource,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train SAEs on `source` per the options (`TrainSAEOptions`; a configs/train_sae.py ConfigDict is
    checked into them first); returns a summary dict."""
    job = TrainSAEOptions.from_config(config)
    run_dir = job.run_dir
    opts = job.sae_options()
    specs = _offline_specs(job, opts, source)
    pretrained = load_pretrained(parse_init_from(opts.init_from), specs)  # checked before any data is read
    sites = batch_sites(specs)  # only what the specs read (a transcoder: its input and target sites)
    batch_size = opts.batch_size
    total_steps = max(1, opts.train_tokens // batch_size)
    tc = opts.train_config(total_steps, job.seed)
    ds = batch_dataset(source, sites, batch_size, chunk_rows=opts.chunk_rows, seed=job.seed)
    # One reader thread, two batches ahead (a step takes seconds on a CPU, milliseconds to read).
    # Grain's default, 16 threads and 500 batches ahead, held ~7 GB of 4096 x 896 float32 batches
    # and read ahead of a short run on the very cores its steps need.
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    saes_dir = join_location(run_dir, "saes")
    ckpt = _checkpointer(job, run_dir, _fingerprint(specs, tc, opts))
    metrics_path = join_location(saes_dir, "metrics.jsonl")

    # The init batch is batch 0 read on its own (not from the training iterator), so the
    # training iterator's position depends only on the step (resume-safe).
    state, start = _start_state(init_train_state(specs, tc, ds[0]), ckpt, it, specs, pretrained, opts.init_from, log)
    # Lines past the restart step were logged by a killed attempt (one killed before its first
    # checkpoint restarts at 0): they are logged again.
    truncate_metrics(metrics_path, start)
    step = make_train_step(specs, tc)
    every = job.checkpoint_every
    log_every = max(1, job.log_every)
    stop_after = job.stop_after_steps
    names = {site: member_names(m) for site, m in specs.items()}
    t0, last = time.perf_counter(), {}
    metrics_log = JsonlLog(metrics_path)
    for s in range(start, total_steps):
        state, metrics = step(state, next(it))
        done = s + 1
        if done % log_every == 0 or done == total_steps:
            _log_step(metrics_log, metrics, names, done, last)
        stopping = bool(stop_after) and done >= stop_after and done < total_steps
        if (every and done % every == 0) or done == total_steps or stopping:
            metrics_log.flush()
            ckpt.save(state, it, wait=done < total_steps)  # the last one is written while the exports are
        if stopping:  # saved just above, whatever checkpoint_every is: the rerun resumes from here
            ckpt.close()
            return {"stopped_at": done, "total_steps": total_steps}
    metrics_log.flush()
    elapsed = time.perf_counter() - t0  # training only, not the exports
    exports = export_all(state, specs, saes_dir, model_name=job.model_name or None)
    ckpt.close()
    return _summary(state, specs, names, last, exports, start, total_steps, batch_size, elapsed)


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary box of a finished run (`cli.print_summary` rows): steps, speed, each SAE, each export."""
    resumed = f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else ""
    rows = [("steps", f"{summary['total_steps']}{resumed}, {summary['tokens_per_s']:.0f} tokens/s")]
    for key, rec in sorted(summary["final"].items()):
        d = summary["dead"][key]
        dead = int(round(rec["dead_fraction"] * d["d_sae"]))
        # "dead" means what it means in the analysis and the run summary: never fired on the tokens
        # named (here the trainer's window of its last sae.dead_steps steps, or all of a shorter run)
        rows.append((key, f"loss {rec['loss']:.4g}, L0 {rec['l0']:.1f}, FVU {rec['fvu']:.3f}, dead {dead} of "
                          f"{d['d_sae']} ({dead / d['d_sae']:.1%}, never fired on the last "
                          f"{d['window_tokens']:,} training tokens), dense {rec['dense_fraction']:.3f}"))
    rows += [("export", str(p)) for p in summary["exports"]]
    return rows


__all__ = ["export_all", "summary_rows", "train_offline",
           "use_compilation_cache"]
