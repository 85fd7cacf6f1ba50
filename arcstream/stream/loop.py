"""The run job's step loop: pipeline -> jitted forward + ring -> drain -> store (and online SAEs).

One process per host runs this same loop. Step `s` always consumes batch `s`
of this host's pipeline and appends the same rows, so a run resumed from its
last commit rewrites exactly what an uninterrupted run would have written
(DESIGN.md: deterministic, idempotent steps).

Commit protocol (every `commit_every` steps and at the end), in this order:
  1. the drain is joined: every captured row of steps < s is in the writer;
  2. the skips the committed pipeline state has passed are appended to this
     process's skipped log (skipped.jsonl; with several processes its own part,
     merged in step 5), so a commit never counts a line that is not on disk;
  3. online SAEs: the ring's owed draws are trained, then their state is
     checkpointed (Orbax, under its SAE step, waited for) before the ledger is
     written, and the commit records that SAE step;
  4. `writer.commit(s, extra={pipeline state, skipped lines, SAE step, ...})`:
     data durable, then this process's ledger (atomic); with one process the
     writer then replaces `manifest.json` itself (atomic), and the rows count;
  5. barrier; with several processes, process 0 replaces `manifest.json`
     (atomic): from now on the rows count, and a resume starts at step s; it
     then merges the processes' skipped logs into skipped.jsonl; barrier.
A kill before the manifest is replaced leaves the previous one in force; the
resumed run truncates its skipped log to its commit's line count, drops SAE
checkpoint steps newer than its commit's SAE step, redoes those steps and
overwrites the same rows.

Hosts must agree on the number of steps although their shards may yield
different numbers of batches: with several processes, every `sync_every` steps
(commit_every, or 16) a tiny all-gather asks "does any host still have data";
a host that has run out feeds empty (all-padding) batches until they agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import arcstream
from arcstream import cli
from arcstream.analysis import analyze
from arcstream.data.pipeline import Pipeline, make_pipeline
from arcstream.data.records import CELL_FIELDS, PackedBatch
from arcstream.data.tokenizer import build_arc_tokenizer, load_tokenizer
from arcstream.io import JsonlLog, RunLocation, checkpoint_dir, join_location, resume_fingerprint
from arcstream.model import (ModelConfig, attention_option, forward, init_random, load_model, parse_sites,
                             save_hf_checkpoint)
from arcstream.options import ConfigError
from arcstream.predict import predict_config_from_run, run_predictions
from arcstream.sae import SAECheckpointer, export_all, init_train_state, make_train_step
from arcstream.sae.pretrained import apply_pretrained, load_pretrained, parse_init_from
from arcstream.store import StoreWriter, open_run, write_manifest
from arcstream.data.skipped import SKIPPED_FILE, SkippedLog, merge_skipped, process_skipped_key
from arcstream.stream.options import TOKEN_POLICIES, RunOptions
from arcstream.stream.ring import (CompactRows, DrainQueue, RingSpec, RingState, compact_rows, due_uses, init_ring,
                                  make_sampler, ring_put)



# --- which tokens are stored -------------------------------------------------------------------


def store_mask(batch: PackedBatch, policy: str, fraction: float, seed: int) -> np.ndarray:
    """bool [B, T]: the tokens of this batch the writer stores.

    `policy`: "all" real tokens, "grid" cells only, "answer" the answer span only.
    `fraction` < 1 keeps a deterministic pseudo-random subset of those, chosen by
    a hash of (seed, prompt index, position) so that a resumed run and every
    process count keep exactly the same tokens.
    """
    mask = batch.valid.copy()
    if policy == "grid":
        mask &= batch.grid_kind > 0
    elif policy == "answer":
        mask &= batch.answer_mask
    elif policy != "all":
        raise ValueError(f"store.tokens={policy!r}: expected one of {TOKEN_POLICIES}")
    if fraction < 1.0:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"store.token_fraction={fraction!r}: expected a number in (0, 1]")
        h = (batch.prompt_index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + batch.positions.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(seed) * np.uint64(0x94D049BB133111EB))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xD6E8FEB86659FD93)
        h ^= h >> np.uint64(32)
        mask &= (h % np.uint64(1 << 24)).astype(np.float64) < fraction * (1 << 24)
    return mask


def empty_batch_like(batch_size: int, seq_len: int) -> PackedBatch:
    """An all-padding batch: what a host that ran out of data feeds while others finish."""
    z32 = np.zeros((batch_size, seq_len), np.int32)
    m8 = np.full((batch_size, seq_len), -1, np.int8)
    return PackedBatch(tokens=z32, segment_ids=z32.copy(), positions=z32.copy(),
                       prompt_index=np.full((batch_size, seq_len), -1, np.int32),
                       grid_kind=np.zeros((batch_size, seq_len), np.int8), pair_index=m8, row=m8.copy(),
                       col=m8.copy(), colour=m8.copy(), answer_mask=np.zeros((batch_size, seq_len), bool),
                       output_mask=np.zeros((batch_size, seq_len), bool), prompts=())


class StoreSink:
    """Runs on the drain thread: appends a drained batch's stored rows and their token records.

    `compact(captured, batch)` (producer thread, its result handed to `DrainQueue.put`) picks the stored
    tokens (`store_mask`) and gathers them on the device (`compact_rows`), so only those rows are copied to
    the host; the sink then gets them compacted, in token order, with the batch and the mask for the token
    records.
    """

    def __init__(self, writer: Any, sites: Sequence[str], policy: str, fraction: float, seed: int):
        self.writer = writer
        self.sites = tuple(sites)
        self.policy, self.fraction, self.seed = policy, fraction, seed
        self.rows = 0

    def compact(self, captured: Mapping[str, jax.Array], batch: PackedBatch
                ) -> tuple[dict[str, CompactRows], tuple[PackedBatch, np.ndarray]]:
        """(the stored sites gathered on the device, the sink's item): what `DrainQueue.put` takes."""
        mask = store_mask(batch, self.policy, self.fraction, self.seed).reshape(-1)
        keep = np.flatnonzero(mask)
        return {s: compact_rows(captured[s], keep) for s in self.sites}, (batch, mask)

    def __call__(self, host: Mapping[str, np.ndarray], item: tuple[PackedBatch, np.ndarray]) -> None:
        batch, mask = item
        rows = {s: host[s] for s in self.sites}
        if any(r.shape[0] != int(mask.sum()) for r in rows.values()):
            raise RuntimeError(f"StoreSink: {({s: r.shape[0] for s, r in rows.items()})} rows drained for "
                               f"{int(mask.sum())} stored tokens")
        tokens = {
            "prompt": batch.prompt_index.reshape(-1)[mask],
            "position": batch.positions.reshape(-1)[mask],
            "token_id": batch.tokens.reshape(-1)[mask],
            **{f: getattr(batch, f).reshape(-1)[mask] for f in CELL_FIELDS},
        }
        self.writer.append(rows, tokens, list(batch.prompts))
        self.rows += int(mask.sum())


# --- the jitted step ---------------------------------------------------------------------------


def make_step(model: Any, forward_fn: Callable, mesh: jax.sharding.Mesh, sites: Sequence[str],
              store_sites: Sequence[str], with_ring: bool, store_dtype: str | None = None,
              passes: int = 1) -> tuple[Callable, Any]:
    """Returns (step, model_state): `step(state, ring, slot, tokens, seg, pos, sae_mask)`.

    The forward stops after the deepest captured layer (no logits). Each token
    of `sae_mask` is owed `passes` online-SAE draws in the ring. The ring is
    donated, so writing the slot is in place; the stored sites are also
    returned as their own arrays for the drain (the ring slot may be
    overwritten `n_slots` steps later while the drain still reads them),
    already cast to `store_dtype` on the device: bf16 halves the
    device-to-host bytes and spares the host a cast (measured in
    benchmarks/bench_run.py).
    """
    graphdef, state = nnx.split(model)
    sites, store_sites = tuple(sites), tuple(store_sites)

    def _step(state, ring, slot, tokens, seg, pos, sae_mask):
        m = nnx.merge(graphdef, state)
        out = forward_fn(m, tokens, seg, pos, sites=sites, return_logits=False)
        if with_ring:
            ring = ring_put(ring, slot, out.captures, sae_mask, passes)
        cast = (lambda x: x.astype(store_dtype)) if store_dtype else (lambda x: x)
        return ring, {s: cast(out.captures[s]) for s in store_sites}

    return jax.jit(_step, donate_argnums=(1,)), state


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles this host's rows into the global batch array (rows over 'data')."""
    return jax.make_array_from_process_local_data(sharding, local)


def all_hosts(flag: bool) -> np.ndarray:
    """bool per process: every host's `flag` (a no-op on one process)."""
    if jax.process_count() == 1:
        return np.array([flag])
    return np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).reshape(-1).astype(bool)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@dataclasses.dataclass
class Timings:
    """Where the wall time went, for the summary (seconds, this process)."""

    input: float = 0.0  # waiting for the next batch from the Grain pipeline
    forward: float = 0.0  # the jitted step, until its outputs are ready
    sae: float = 0.0  # online SAE steps
    commit: float = 0.0  # joins + commits + checkpoints
    backpressure: float = 0.0  # producer blocked on a full drain queue
    d2h: float = 0.0  # drain thread: device-to-host copies
    disk: float = 0.0  # drain thread: host compaction + store appends
    finish: float = 0.0  # after the loop: SAE exports
    predict: float = 0.0  # after the loop: decoding, voting and scoring (predict=True)
    analysis: float = 0.0  # after the loop: arcstream.analyze on the run (analyze=True)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @contextlib.contextmanager
    def timing(self, field: str) -> Iterator[None]:
        """Adds the wall time of the `with` body to `field` (nothing when the body raises: no summary follows)."""
        t0 = time.perf_counter()
        yield
        setattr(self, field, getattr(self, field) + (time.perf_counter() - t0))


# --- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What a run did, for the summary and for tests (this process's view, plus global counts)."""

    output_dir: str
    model: str
    model_note: str
    sites: tuple[str, ...]
    stored_sites: tuple[str, ...]
    steps: int  # steps completed (global step count)
    resumed_from: int  # step the run started at (0 = fresh)
    prompts: int  # prompts consumed by this process in this invocation
    tokens: int  # real tokens forwarded by this process in this invocation
    rows_durable: int  # rows in the manifest (all processes)
    skips: dict[str, int]
    seconds: float
    timings: dict[str, float]
    backpressure_waits: int
    sae_steps: int
    sae_final: dict[str, dict[str, float]]
    exports: list[str]
    predictions: Any = None  # arcstream.predict PredictResult when predict=True
    predict_skipped: str = ""  # why predict=True did not run here (several processes, a URL output_dir)
    analysis: Any = None  # arcstream.analysis AnalyzeResult when analyze=True
    analysis_skipped: str = ""  # why analyze=True did not run here
    skipped_file: str = "skipped.jsonl"  # where the skipped tasks and prompts are named (row, task id, reason)
    # online SAEs, this invocation: tokens captured for them, drawn, drawn again, never drawn; draws owed each
    sae_tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    d2h_bytes: int = 0  # stored rows copied device -> host by this process (only the stored tokens: compact_rows)

    def summary_rows(self) -> list[tuple[str, str]]:
        tok_s = self.tokens / max(self.seconds, 1e-9)
        t = self.timings
        bound = max(("forward", t["forward"]), ("input", t["input"]), ("writer", t["backpressure"]),
                    ("sae", t["sae"]), ("commit", t["commit"]), ("predictions", t["predict"]),
                    ("SAE exports", t["finish"]), ("analysis", t["analysis"]), key=lambda kv: kv[1])[0]
        rows = [
            ("output_dir", self.output_dir),
            ("model", self.model),
            *([("  note", self.model_note)] if self.model_note else []),
            ("sites captured", ", ".join(s.removeprefix("blocks.") for s in self.sites)),
            ("sites stored", ", ".join(s.removeprefix("blocks.") for s in self.stored_sites) or "none"),
            ("steps", f"{self.steps}" + (f" (resumed at {self.resumed_from})" if self.resumed_from else "")),
            ("prompts / tokens", f"{self.prompts} / {self.tokens} this process ({tok_s:,.0f} tokens/s)"),
            ("rows durable", f"{self.rows_durable} (manifest.json)"),
            ("skipped", ", ".join(f"{k}: {v}" for k, v in sorted(self.skips.items())) + f" (each named in "
                        f"{self.skipped_file})" if self.skips else "none"),
            ("time", f"{self.seconds:.1f} s, bound by {bound}"),
            ("  forward / input", f"{t['forward']:.1f} s / {t['input']:.1f} s (forward includes compilation)"),
            ("  sae / commit", f"{t['sae']:.1f} s / {t['commit']:.1f} s"),
            ("  exports / predict / analysis", f"{t['finish']:.1f} s / {t['predict']:.1f} s / "
                                               f"{t['analysis']:.1f} s"),
            ("  writer", f"waited on {self.backpressure_waits}x ({t['backpressure']:.1f} s); "
                         f"d2h {t['d2h']:.1f} s ({self.d2h_bytes / 1e9:.3g} GB, stored tokens only), "
                         f"append {t['disk']:.1f} s"),
        ]
        if self.sae_steps:
            n = self.sae_tokens
            seen = (f"; {n['draws']:,} tokens drawn of {n['captured']:,} captured (each owed {n['passes']}; "
                    f"{n['reused']:,} drawn again, {n['lost']:,} never drawn)") if n else ""
            rows.append(("online SAEs", f"{self.sae_steps} steps{seen}"))
            for site, m in self.sae_final.items():
                # "dead" has one meaning in a summary, the analysis's (never fired on the rows analysed); the
                # trainer's windowed count (no fire in the last sae.dead_steps steps) stays in metrics.jsonl.
                shown = {k: v for k, v in m.items() if k != "dead_fraction"}
                rows.append((f"  {site.removeprefix('blocks.')}", ", ".join(f"{k} {v:.3g}" for k, v in shown.items())))
            rows.append(("SAE exports", f"{len(self.exports)} in saes/ (SAELens layout)"))
        if self.predictions is not None:
            p = self.predictions
            rows.append(("predictions", f"{p.tasks} tasks in predictions/predictions.json"))
            rows.extend((f"  {k}", v) for k, v in p.summary_rows() if k in ("failures", "score"))
        elif self.predict_skipped:
            rows.append(("predictions", f"skipped: {self.predict_skipped}"))
        if self.analysis is not None:
            a = self.analysis
            rows.append(("analysis", f"{a.rows} rows; {a.files['dashboard']}, {a.files['report']}"))
            for site in a.sites:
                dead = int(site.stats.dead_mask().sum())
                classes = [v["class"] for v in site.invariance]
                views = ", ".join(f"{c} {classes.count(c)}" for c in sorted(set(classes))) or "none"
                rows.append((f"  {site.site.removeprefix('blocks.')}",
                             f"dead {dead} of {site.d_sae} ({dead / max(site.d_sae, 1):.1%}, never fired on the "
                             f"{site.rows} rows analysed); held-out FVU {site.eval['fvu']:.3f}; across views: "
                             f"{views}"))
        elif self.analysis_skipped:
            rows.append(("analysis", f"skipped: {self.analysis_skipped}"))
        return rows


def _resolve_model(opts: RunOptions) -> tuple[str, str]:
    """The checkpoint to load, and a note for the summary when it is not a trained model."""
    if opts.model:
        return opts.model, ""
    # No model given: a small random Qwen2 with arcstream's ARC tokenizer, built
    # deterministically (until a trained model ships). The loader needs a local
    # directory: output_dir/random_model when output_dir is local, else a local
    # cache folder named after the model's settings, built by every process that
    # lacks it (hosts of a pod do not share a disk).
    local = RunLocation(opts.output_dir).local
    note = "random weights (no --config.model given)"
    if local is not None:
        path = local / "random_model"
        if jax.process_index() == 0 and not (path / "config.json").exists():
            _build_random_model(opts, path)
        barrier("random_model")
        return str(path), note
    path = _random_model_cache_dir(opts)
    if not (path / "config.json").exists():
        _build_random_model(opts, path)
    logging.info("--config.output_dir=%s is not a local directory: the random model (no --config.model) "
                 "is built in the local cache %s", opts.output_dir, path)
    return str(path), f"{note}; built in the local cache {path}"


def _random_model_cache_dir(opts: RunOptions) -> Path:
    """`$XDG_CACHE_HOME/arcstream/random_model/<hash of the settings>` (default cache: ~/.cache).

    The settings are everything `_build_random_model` reads plus arcstream's
    version, so equal settings share one folder and any change gets a new one.
    """
    settings = {"family": "qwen2", "tokenizer": "digits", "hidden_size": opts.random_model.hidden_size,
                "num_layers": opts.random_model.num_layers, "seed": opts.seed,
                "arcstream": arcstream.__version__}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "arcstream" / "random_model" / digest


def _build_random_model(opts: RunOptions, path: Path) -> None:
    """Writes the random model to `path`: built in a temporary sibling, then renamed into place, so
    processes that share the disk never load (or collide on) a half-written folder."""
    tok = build_arc_tokenizer("digits")
    mcfg = ModelConfig.tiny("qwen2", vocab_size=len(tok), hidden_size=opts.random_model.hidden_size,
                            num_layers=opts.random_model.num_layers, intermediate_size=
                            opts.random_model.hidden_size * 3, max_position_embeddings=32768,
                            eos_token_ids=(int(tok.eos_token_id),))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_hf_checkpoint(init_random(mcfg, seed=opts.seed), mcfg, tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():  # not "another process won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _site_list(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def _model_sites(flag: str, spec: str, num_layers: int) -> tuple[str, ...]:
    """The sites of `spec` checked against the loaded model, a bad one refused as a config error naming
    `flag` (a site past the model's last layer can only be found once the checkpoint is read)."""
    try:
        return parse_sites(_site_list(spec), num_layers)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from e


def run(options: RunOptions | ml_collections.ConfigDict) -> RunResult:
    """The run job: capture `sites` over `data.source` into `output_dir`.

    `options`: the job's frozen options (a configs/default.py ConfigDict is checked into them first, so a
    bad key or value is refused before anything loads).

    One function in sections (mesh and model, data, store, online SAEs, the loop, after the loop), each
    a helper below; the commit protocol and the resume are the module docstring's.
    """
    start = time.perf_counter()
    opts = RunOptions.from_config(options)
    pidx, pcount = jax.process_index(), jax.process_count()
    predict_skipped = _check_before_loading(opts, pcount)

    # --- mesh and model
    mesh = opts.mesh.make()
    lm = _load_model(opts, mesh)

    # --- data
    pipeline = _make_pipeline(opts, mesh, lm.tokenizer, pidx, pcount)

    # --- store (resume from its manifest)
    store = _open_store(opts, lm, pipeline, pidx, pcount)

    # --- online SAEs
    sae = None
    if opts.sae_options().enabled:
        sae = _OnlineSAE(opts, mesh, {s: lm.cfg.hidden_size for s in lm.sites},
                         resume_sae_step=store.writer.last_commit.extra.get("sae_step") if store.step0 else None)

    # --- the step and the loop
    loop = _StepLoop(opts, mesh, lm, pipeline, store, sae, start)
    loop.run()

    # --- after the loop: SAE exports, predictions, analysis (each timed for the summary)
    tm = loop.tm
    exports, sae_final = [], {}
    with tm.timing("finish"):
        if sae is not None:
            exports, sae_final = sae.finish(opts.output_dir, lm.path)
    predictions = None
    with tm.timing("predict"):
        if opts.predict and not predict_skipped:
            predictions = _predict(opts, lm.path, lm.model, lm.tokenizer, mesh)
    with tm.timing("analysis"):
        analysis, analysis_skipped = _maybe_analyze(opts, lm.path, pcount, exports)
    rows_durable = open_run(opts.output_dir).rows if lm.stored else 0
    store.writer.close()
    drain = loop.drain
    tm.d2h, tm.disk = drain.stats.d2h_seconds, drain.stats.sink_seconds
    return RunResult(
        output_dir=opts.output_dir, model=opts.model or lm.path, model_note=lm.note,
        sites=tuple(lm.sites), stored_sites=tuple(lm.stored), steps=loop.step, resumed_from=store.step0,
        prompts=loop.prompts, tokens=loop.tokens, rows_durable=rows_durable, skips=dict(pipeline.skip_counts),
        seconds=time.perf_counter() - start, timings=tm.as_dict(), backpressure_waits=drain.stats.backpressure_waits,
        d2h_bytes=drain.stats.bytes,
        sae_steps=sae.steps if sae else 0, sae_tokens=sae.token_counts(loop.ring) if sae else {},
        sae_final=sae_final, exports=exports, predictions=predictions, predict_skipped=predict_skipped,
        analysis=analysis, analysis_skipped=analysis_skipped, skipped_file=store.skiplog.key)


def _check_before_loading(opts: RunOptions, pcount: int) -> str:
    """What can be refused before the model loads; returns why `predict=True` is skipped here ("" if not)."""
    predict_skipped = _why_no_predictions(opts, pcount)
    if predict_skipped:
        logging.warning("--config.predict=True: predictions skipped: %s", predict_skipped)
    if opts.sae_options().enabled:
        _sae_checkpoint_dir(opts)  # a bad checkpoint location fails now, not after the model has loaded
    return predict_skipped


@dataclasses.dataclass(frozen=True)
class _Model:
    """The mesh-and-model section's result: the loaded model and the sites it captures and stores."""

    path: str  # the checkpoint folder loaded: opts.model, or the random model built for the run
    note: str  # for the summary: "" for a given model, else why its weights are random
    model: Any  # the NNX decoder, sharded on the mesh
    cfg: Any  # its arcstream.model.ModelConfig
    tokenizer: Any
    sites: Sequence[str]  # captured (opts.sites), canonical order
    stored: Sequence[str]  # written to the store (opts.store.sites): a subset of `sites`, or none


def _load_model(opts: RunOptions, mesh: jax.sharding.Mesh) -> _Model:
    """Loads the model on the mesh and resolves the captured and stored sites (stored must be captured)."""
    model_path, model_note = _resolve_model(opts)
    with jax.set_mesh(mesh):
        model, mcfg = load_model(model_path, dtype=opts.dtype, mesh=mesh,
                                 attention=attention_option(opts))
    tokenizer = load_tokenizer(model_path)
    sites = _model_sites("--config.sites", opts.sites, mcfg.num_layers)
    stored = _model_sites("--config.store.sites", opts.store.sites, mcfg.num_layers) if opts.store.sites else sites
    if opts.store.sites == "none":
        stored = ()
    missing = sorted(set(stored) - set(sites))
    if missing:
        raise ConfigError(f"--config.store.sites names {missing}, which --config.sites does not capture "
                          f"({list(sites)})")
    return _Model(model_path, model_note, model, mcfg, tokenizer, sites, stored)


def _make_pipeline(opts: RunOptions, mesh: jax.sharding.Mesh, tokenizer: Any, pidx: int,
                   pcount: int) -> Pipeline:
    """This host's Grain pipeline; refuses a global batch that the mesh's 'data' axis does not divide."""
    B = int(opts.data.batch_size)
    pipeline = make_pipeline(opts.data, tokenizer, process_index=pidx, process_count=pcount)
    if (B * pcount) % mesh.shape["data"]:
        raise ValueError(f"data.batch_size={B} x {pcount} processes is not divisible by the mesh's data axis "
                         f"({mesh.shape['data']}): set --config.data.batch_size to a multiple of "
                         f"{mesh.shape['data'] // pcount or 1}")
    return pipeline


@dataclasses.dataclass(frozen=True)
class _Store:
    """The store section's result: the writer (new, or resumed from its manifest) and the skipped-task log."""

    writer: StoreWriter
    skiplog: SkippedLog  # skipped.jsonl, or with several processes this process's part of it
    step0: int  # the step the run starts at: its last commit's (0 = a fresh store)
    skip_from: int  # the pipeline's skip number of the log's first line


def _open_store(opts: RunOptions, lm: _Model, pipeline: Pipeline, pidx: int,
                pcount: int) -> _Store:
    """Creates the store, or reopens it at its last commit and puts the pipeline and skipped log there."""
    writer = StoreWriter.create_or_resume(
        opts.output_dir, sites={s: lm.cfg.hidden_size for s in lm.stored}, config=resume_fingerprint(opts.resolved, PROGRESS_KEYS),
        dtype=opts.store.dtype, process_index=pidx, process_count=pcount,
        rows_per_shard=opts.store.rows_per_shard)
    step0 = writer.resume_step
    skiplog = SkippedLog(opts.output_dir, SKIPPED_FILE if pcount == 1 else process_skipped_key(pidx))
    if step0:
        skip_from = _resume(opts, writer, step0, pipeline, skiplog)
    else:
        skiplog.replace([])  # a fresh store: no lines of an earlier run in this directory
        skip_from = 0  # the pipeline's skip number of the file's first line
    return _Store(writer, skiplog, step0, skip_from)


def _resume(opts: RunOptions, writer: StoreWriter, step0: int, pipeline: Pipeline,
            skiplog: SkippedLog) -> int:
    """Sets the pipeline to the state of the commit at `step0`, cuts the skipped log to that commit's lines,
    and returns the pipeline's skip number of the log's first line."""
    state = writer.last_commit.extra.get("pipeline")
    if state is None:
        raise RuntimeError(f"{opts.output_dir}: the commit at step {step0} has no pipeline state; cannot resume")
    pipeline.set_state(state)
    # Lines a killed attempt wrote after its last commit are met again: drop them (no duplicates).
    extra = writer.last_commit.extra
    if "skipped_lines" in extra:
        skiplog.truncate(int(extra["skipped_lines"]))
        skip_from = int(extra.get("skipped_from", 0))
    else:  # a store written before the run named its skips: name those from here on
        skip_from = Pipeline.skips_in_state(state)
        skiplog.replace([])
        logging.warning("%s: this store predates %s; the %d skips before step %d are counted in the summary "
                        "but not named", opts.output_dir, skiplog.key, skip_from, step0)
    logging.info("resuming at step %d (%d durable rows on this process)", step0, writer.durable_rows)
    return skip_from


class _StepLoop:
    """The step loop and its state: the ring, the step and token counters, the previous step's outputs.

    Builds the ring (online SAEs only), the jitted step, the store sink and its drain; `run()` steps until
    no host has data left, commits every `commit_every` steps and at the end (`commit`: the module
    docstring's protocol), and closes the drain however the loop ends.
    """

    def __init__(self, opts: RunOptions, mesh: jax.sharding.Mesh, lm: _Model,
                 pipeline: Pipeline, store: _Store, sae: _OnlineSAE | None, start: float):
        self.opts, self.mesh, self.pipeline, self.store, self.sae = opts, mesh, pipeline, store, sae
        self.start = start  # the run's start (perf_counter), for the tokens/s of the status line
        self.pidx, self.pcount = jax.process_index(), jax.process_count()
        self.B, self.T = int(opts.data.batch_size), int(opts.data.seq_len)
        self.n_slots = opts.ring.n_slots
        self.ring = init_ring(RingSpec({s: lm.cfg.hidden_size for s in lm.sites}, self.n_slots, self.B * self.pcount,
                                       self.T, opts.ring.dtype, seed=opts.seed), mesh,
                              puts=store.step0) if sae else None
        self.step_fn, self.mstate = make_step(lm.model, forward, mesh, lm.sites, lm.stored, with_ring=sae is not None,
                                              store_dtype=opts.store.dtype, passes=sae.passes if sae else 1)
        self.stored = lm.stored
        self.sink = StoreSink(store.writer, lm.stored, opts.store.tokens, opts.store.token_fraction, opts.seed)
        self.drain = DrainQueue(self.sink, max_in_flight=max(1, self.n_slots - 1))
        self.tm = Timings()
        self.batch_sharding = NamedSharding(mesh, P("data", None))
        self.commit_every = opts.commit_every
        self.exclude_first_token = opts.sae_options().exclude_first_token  # of the tokens the SAEs may draw
        self.step, self.prompts, self.tokens = store.step0, 0, 0
        self.bar = tqdm(desc="run", unit="step", initial=store.step0,
                        disable=self.pidx != 0 or not cli.progress_enabled(), dynamic_ncols=True)
        self.last_line = time.perf_counter()  # the last heartbeat line (logs without a bar)
        self.kill_at = int(os.environ.get("ARCSTREAM_FAULT_KILL_AT_STEP", "0") or 0)
        # Hosts agree on the end of the data every `sync_every` steps, not every step (a per-step all-gather is a
        # cross-host round trip that stalls dispatch); a host that runs dry feeds empty batches until then.
        self.sync_every = 1 if self.pcount == 1 else max(1, self.commit_every or 16)
        self.host_done = False
        self.prev = None  # the previous step's outputs: dispatch runs one step ahead of the device

    def run(self) -> None:
        """Every step, then the final commit; the drain is closed on every way out."""
        try:
            with jax.set_mesh(self.mesh):
                while (batch := self._next_batch()) is not None:
                    self._step(batch)
                self.commit()
        except BaseException as exc:
            # Shutting the drain down must not replace the error in flight (a drain failure is that error, or is
            # added to it as a note); the rows after the last commit are dropped, a resumed run rewrites them.
            self.drain.close(exc)
            raise
        else:
            self.drain.close()  # raises the drain's first failure, or a drain thread that does not stop
        finally:
            self.bar.close()

    def _next_batch(self) -> PackedBatch | None:
        """This host's next batch (all padding once it has run dry), or None when no host has data left."""
        with self.tm.timing("input"):
            batch = None if self.host_done else next(self.pipeline, None)
            self.host_done = batch is None
        if self.step % self.sync_every == 0:
            if not all_hosts(batch is not None).any():
                return None
        if batch is None:
            batch = empty_batch_like(self.B, self.T)
        return batch

    def _step(self, batch: PackedBatch) -> None:
        """One step: the forward (into the ring), the drain hand-off, the SAE steps it made due, maybe a commit."""
        captured = self._forward(batch)
        with self.tm.timing("backpressure"):
            if self.stored:
                self.drain.put(*self.sink.compact(captured, batch))
        self.step += 1
        self.prompts += len(batch.prompts)
        self.tokens += int(batch.valid.sum())
        if self.sae is not None:
            with self.tm.timing("sae"):
                self.ring = self.sae.train(self.ring, self.step)
        if self.kill_at == self.step:
            _die_for_test(self.step)
        if self.commit_every and self.step % self.commit_every == 0:
            self.commit()
        self._report()

    def _forward(self, batch: PackedBatch) -> dict[str, jax.Array]:
        """Dispatches the jitted step on `batch` and returns the stored sites' arrays (for the drain).

        Only the previous step is waited for, so the host assembles this batch while the device runs
        that one; the wait counts as forward time.
        """
        sae_mask = batch.valid & (batch.positions > 0) if self.exclude_first_token else batch.valid
        with self.tm.timing("forward"):
            args = [global_batch(a, self.batch_sharding) for a in (batch.tokens, batch.segment_ids, batch.positions,
                                                                    sae_mask)]
            slot = jnp.int32(self.step % self.n_slots)
            if self.prev is not None:
                jax.block_until_ready(self.prev)  # step s-1 done: its time counts as forward, as before
            self.ring, captured = self.step_fn(self.mstate, self.ring, slot, *args)
            self.prev = captured if captured else (self.ring.valid if self.ring is not None else None)
        return captured

    def _report(self) -> None:
        """The progress bar's status; where no bar is drawn (logs), a heartbeat line every 30 s on process 0."""
        status = (f"prompts {self.prompts}, {self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} "
                  f"tok/s, durable rows {self.store.writer.durable_rows}, drain {self.drain.in_flight}/"
                  f"{max(1, self.n_slots - 1)}")
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(1)
        if self.bar.disable and self.pidx == 0 and time.perf_counter() - self.last_line > 30:
            logging.info("step %d: %s", self.step, status)  # a heartbeat in logs, where no bar is drawn
            self.last_line = time.perf_counter()

    def commit(self) -> None:
        """Commits step `self.step`: steps 1-5 of the module docstring, in that order."""
        step, writer, skiplog, pipeline = self.step, self.store.writer, self.store.skiplog, self.pipeline
        with self.tm.timing("forward"):  # the last dispatched step's device time is forward, not commit time
            if self.prev is not None:
                jax.block_until_ready(self.prev)
        with self.tm.timing("commit"):
            self.drain.join()
            extra = {"pipeline": pipeline.get_state()}
            # skipped.jsonl names every skip the committed pipeline state has passed (written first, so the
            # commit never counts a line that is not on disk).
            done = Pipeline.skips_in_state(extra["pipeline"])
            extra["skipped_lines"] = skiplog.append(pipeline.skipped_between(self.store.skip_from + skiplog.lines,
                                                                             done))
            extra["skipped_from"] = self.store.skip_from
            if self.sae is not None:
                # Every use the ring still owes is drawn before the SAEs are saved: the commit's SAE state is then
                # a function of the committed batches alone, so a run resumed from it (with an empty ring) trains
                # exactly as an uninterrupted one (tests/stream/test_run.py compares their weights).
                with self.tm.timing("sae"):
                    self.ring = self.sae.train(self.ring, step, drain=True)
                extra["sae_step"] = self.sae.save()
            writer.commit(step, extra=extra)
            barrier(f"commit_{step}")
            if self.pidx == 0 and self.pcount > 1:
                manifest = write_manifest(self.opts.output_dir, self.pcount)
                merge_skipped(self.opts.output_dir, [int(p.extra.get("skipped_lines", 0))
                                                            for p in manifest.processes])
            barrier(f"manifest_{step}")


def _why_no_predictions(opts: RunOptions, pcount: int) -> str:
    """Why `predict=True` cannot run inside this run ("" when it can): it decodes in one process. The
    capture goes on either way; the summary says what to run instead."""
    if not opts.predict:
        return ""
    after = "run python -m arcstream.predict --config=configs/predict.py (same model and data) after the capture"
    if pcount > 1:
        return f"they run in one process and this run has {pcount}; {after}"
    return ""


def _predict(opts: RunOptions, model_path: str, model: Any, tokenizer: Any,
             mesh: jax.sharding.Mesh) -> Any:
    """`predict=True`: decode, vote and score the test answers of the run's tasks (arcstream.predict).

    Covers the first `predict_options.max_tasks` tasks (0 = no bound), and never more than about the
    ones the run captured (`max_prompts / n_augmentations`) when `max_prompts` bounds the run.
    """
    pc = predict_config_from_run(opts.config(), model_path)  # output_dir/predictions, a path or a URL alike
    if opts.max_prompts:  # about the tasks the run captured, and no more than predict_options.max_tasks
        captured = max(1, opts.max_prompts // max(1, int(pc.data.n_augmentations)))
        pc.data.max_tasks = min(int(pc.data.max_tasks), captured) if int(pc.data.max_tasks) else captured
    with jax.set_mesh(mesh):
        return run_predictions(pc, model=model, tokenizer=tokenizer)


def _why_no_analysis(opts: RunOptions, pcount: int, exports: list[str]) -> str:
    """Why `analyze=True` cannot run inside this run ("" when it can)."""
    if not exports:
        return "the run exported no SAEs (sae.enabled=False?); the analysis studies SAE features"
    if pcount > 1:
        return (f"it runs in one process and this run has {pcount}; run python -m arcstream.analyze "
                f"--config=configs/analyze.py --config.run_dir={opts.output_dir} after the capture")
    return ""


def _maybe_analyze(opts: RunOptions, model_path: str, pcount: int,
                   exports: list[str]) -> tuple[Any, str]:
    """`analyze=True`: (the analysis, "") when it can run here, else (None, why not); (None, "") when not asked."""
    if not opts.analyze:
        return None, ""
    why = _why_no_analysis(opts, pcount, exports)
    if why:
        logging.warning("--config.analyze=True: analysis skipped: %s", why)
        return None, why
    return _analyze(opts, model_path), ""


def _analyze(opts: RunOptions, model_path: str) -> Any:
    """`analyze=True`: arcstream.analyze on this run (dashboard/index.html, report.md), its SAEs, its model."""
    return analyze(opts.analysis_options(model_path))


def _die_for_test(step: int) -> None:
    """Fault injection for the resume tests: SIGKILL this process mid-run (after step `step`'s
    forward and drain hand-off, before its commit), exactly like `kill -9` at that moment."""
    logging.warning("ARCSTREAM_FAULT_KILL_AT_STEP=%d: killing this process with SIGKILL", step)
    os.kill(os.getpid(), signal.SIGKILL)


# The config a store is tied to is everything that changes what rows are written (io.resume_fingerprint);
# these progress-only keys (how often to commit, ring size, predictions after the run, where SAE checkpoints
# live) may change between a run and its resume without making the store a different store.
PROGRESS_KEYS = ("commit_every", "predict", "predict_options", "ring.n_slots", "sae.checkpoint_dir")


class _OnlineSAE:
    """The SAEs trained on the ring buffer: one per captured site (or a sweep per site), or one transcoder
    from `sae.input_site` to `sae.target_site` (both captured; the ring holds them at the same tokens)."""

    def __init__(self, run_opts: RunOptions, mesh: jax.sharding.Mesh, d_in: Mapping[str, int],
                 resume_sae_step: int | None):
        self.mesh = mesh
        self.opts = opts = run_opts.sae_options()
        self.specs = opts.site_specs(dict(d_in))
        # sae.init_from: checked now (before the model runs), applied to the fresh state of a new run
        self.pretrained = load_pretrained(parse_init_from(opts.init_from), self.specs)
        self.tc = opts.train_config(opts.total_steps, run_opts.seed)
        self.step_fn = make_train_step(self.specs, self.tc, mesh)
        self.passes = opts.passes
        self.batch_size = opts.batch_size
        self.sample = make_sampler(mesh, self.batch_size, self.passes)
        self.captured = 0  # tokens the ring was given for the SAEs (sae_mask), this invocation
        self.draws = 0  # rows the SAE steps took from the ring
        self.state = None
        self.steps = 0
        self.resume_sae_step = resume_sae_step
        self.ckpt = SAECheckpointer(_sae_checkpoint_dir(run_opts), flag="--config.sae.checkpoint_dir")
        # output_dir/metrics.jsonl (process 0), flushed and fsynced at each commit; a kill loses only
        # records after the last commit, which the resumed run logs again.
        self.metrics = JsonlLog(join_location(run_opts.output_dir, "metrics.jsonl"), fsync=True)
        orphans = self.ckpt.delete_newer_than(int(resume_sae_step or 0))
        if orphans:
            logging.info("deleted SAE checkpoint step(s) %s: newer than the store's last commit (SAE step %d), "
                         "left by a killed attempt", orphans, int(resume_sae_step or 0))
        if resume_sae_step is not None and jax.process_index() == 0:
            # metrics.jsonl lines of SAE steps past the checkpoint the run resumes from are logged again.
            self.metrics.truncate(int(resume_sae_step), key="sae_step")
        self.last: dict[str, dict[str, float]] = {}

    def train(self, ring: RingState, step: int, drain: bool = False) -> RingState:
        """The SAE steps the newest batch made due (every use left with `drain`); returns the ring.

        Steps per forward step = ceil(uses due / sae.batch_size): the SAEs keep pace with the
        capture and see each token `sae.passes` times (arcstream/stream/ring.py). Training
        starts with the first batch.
        """
        due, left, new = (int(v) for v in jax.device_get(due_uses(ring)))
        if not drain:
            self.captured += new
        for _ in range(8 if drain else 1):  # unbalanced shards may leave uses after one round
            owed = left if drain else due
            if owed <= 0 or self.steps >= self.tc.total_steps:
                break
            for _ in range(-(-owed // self.batch_size)):
                if self.steps >= self.tc.total_steps:
                    break
                batch, ring = self.sample(ring)
                if self.state is None:
                    self.state = init_train_state(self.specs, self.tc, batch, self.mesh)
                    if self.resume_sae_step:
                        # The SAE state saved with the store's last commit (ledger extra "sae_step").
                        self.state = self.ckpt.restore(self.state, step=int(self.resume_sae_step))
                        self.steps = int(self.state.step)
                    elif self.pretrained:
                        self.state = apply_pretrained(self.state, self.specs, self.pretrained)
                self.state, metrics = self.step_fn(self.state, batch)
                self.steps += 1
                self.draws += self.batch_size
                if self.steps % self.opts.log_every == 0 or self.steps == 1:
                    self._log(jax.device_get(metrics), step)
            if drain:
                left = int(jax.device_get(due_uses(ring))[1])
        return ring

    def token_counts(self, ring: RingState | None) -> dict[str, int]:
        """What the summary says the SAEs saw (this invocation)."""
        reused, lost = (int(v) for v in jax.device_get((ring.reused, ring.lost))) if ring is not None else (0, 0)
        return {"captured": self.captured, "draws": self.draws, "reused": reused, "lost": lost,
                "passes": self.passes}

    def _log(self, metrics: Mapping[str, Mapping[str, np.ndarray]], run_step: int) -> None:
        if jax.process_index() != 0:
            return
        for site, m in metrics.items():
            rec = {"job": "run", "run_step": run_step, "sae_step": self.steps, "site": site,
                   **{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()}}
            self.metrics.append(rec)
            self.last[site] = {k: rec[k] for k in ("loss", "l0", "fvu", "dead_fraction") if k in rec}

    def save(self) -> int:
        """Checkpoints the SAE state (once per SAE step), writes the metrics logged so far, and returns the
        SAE step for the store's commit record."""
        if self.state is None:
            return 0
        if self.ckpt.latest_step() != self.steps:
            self.ckpt.save(self.state)
        if jax.process_index() == 0:
            self.metrics.flush()
        return self.steps

    def finish(self, output_dir: str, model_name: str) -> tuple[list[str], dict[str, dict[str, float]]]:
        exports = []
        if self.state is not None and jax.process_index() == 0:
            self.metrics.flush()
            saes = join_location(output_dir, "saes")
            exports = [str(p) for p in export_all(self.state, self.specs, saes, model_name)]
        self.ckpt.close()
        return exports, self.last


def _sae_checkpoint_dir(opts: RunOptions) -> str:
    """Where the online SAEs' Orbax checkpoints go: `sae.checkpoint_dir`, else output_dir/saes/checkpoints.

    Raises when that is a URL Orbax cannot write (e.g. memory://), naming the flag to set.
    """
    return checkpoint_dir(opts.sae_options().checkpoint_dir, opts.output_dir, "saes",
                          "checkpoints", flag="--config.sae.checkpoint_dir", output_flag="--config.output_dir",
                          hint=" (or --config.sae.enabled=False)")


