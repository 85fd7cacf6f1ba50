"""The LM trainer behind `python -m arcstream.train_lm`: a small Qwen2-architecture model learns ARC output grids.

One process or many (data parallel over the global mesh's 'data' axis, the
parameters replicated; `mesh.model` > 1 shards heads and MLP as in the run job).
The data is the run job's Grain pipeline over a `TaskMixture` (training
sources minus held-out sets), with `include_answer=True`, one freshly sampled
augmentation per test pair, and a new shuffle and augmentation seed each epoch
(`seed + epoch`), so epoch e sees different views of the same tasks. The loss
is next-token cross-entropy on the output grids (`arcstream.lm.data.loss_mask`).

Resumable: an Orbax checkpoint every `train.checkpoint_every` steps holds the
parameters, the optax state, the step, the epoch and every process's pipeline
state; the same command continues from the latest one, and the metrics file is
cut back to it (no duplicated records). At the end the model is exported in the
HF layout (config.json, model.safetensors, tokenizer files) under
`output_dir/export`, evaluated on the held-out set, and `output_dir/export/README.md`
(the model card: data, steps, loss curve, held-out loss and accuracy) is written.

`output_dir` is a local path or a kvstore URL (`file://`, `gs://`, `memory://`): metrics.jsonl goes through
`arcstream.io.JsonlLog`, the export is staged in a local folder and uploaded (`arcstream.io.local_folder`),
the held-out predictions go to `output_dir/eval_predictions` through the predict job's own URL support.
Checkpoints go to `train.checkpoint_dir` (default `output_dir/checkpoints`), which Orbax must be able to
write: a local path or gs:// / s3:// / az://; a `memory://` output_dir needs it set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arcstream import cli
from arcstream.data.pipeline import PipelineOptions, build_pipeline, make_prompter
from arcstream.data.tokenizer import build_arc_tokenizer
from arcstream.io import (
    JsonlLog,
    RunLocation,
    checkpoint_dir,
    checkpoint_path,
    is_url,
    join_location,
    local_folder,
    resume_fingerprint,
    resume_refusal,
)
from arcstream.lm.card import export_model, export_prompt_format, final_evaluation, read_metrics, write_model_card
from arcstream.lm.data import TaskMixture, targets
from arcstream.lm.evaluate import context_summary, context_use_of_run, describe_context
from arcstream.lm.heldout import UNIFORM_CELL_NATS, eval_pipeline, held_out_loss, make_nll_fn, token_nll
from arcstream.lm.options import LMShape, Schedule, TrainLMOptions
from arcstream.model import ModelConfig, attention_option, init_random, load_model
from arcstream.options import ConfigError, as_dict



def model_config(m: LMShape, tokenizer: Any, max_len: int) -> ModelConfig:
    """The ModelConfig of the `model` section, with the tokenizer's vocabulary and stop token; positions up to
    `max_len` (the training rows' `data.seq_len`)."""
    return ModelConfig(
        family=m.family, vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
        intermediate_size=m.intermediate_size, rope_theta=m.rope_theta, tie_word_embeddings=m.tie,
        qkv_bias=m.family == "qwen2", qk_norm=m.family == "qwen3", rms_norm_eps=1e-6,
        max_position_embeddings=int(max_len), eos_token_ids=(int(tokenizer.eos_token_id),),
        bos_token_id=int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None)


def training_source(options: TrainLMOptions | ml_collections.ConfigDict) -> TaskMixture:
    """`data.sources` minus `data.exclude` and `eval.probes` (held-out sets removed by id and content)."""
    opts = TrainLMOptions.from_config(options)
    return TaskMixture(_split(opts.data.sources), _split(opts.data.exclude) + opts.eval.probe_sources())


def _split(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def make_optimizer(t: Schedule) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr`, global-norm clipping,
    weight decay on matrices only (not norms, biases)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps,
                                                  end_value=t.lr * t.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    opt = optax.chain(
        optax.clip_by_global_norm(t.clip_norm) if t.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return opt, schedule


def make_train_step(graphdef: Any, optimizer: optax.GradientTransformation) -> Callable:
    def loss_fn(params, tokens, seg, pos, tgt, w):
        nll = token_nll(graphdef, params, tokens, seg, pos, tgt)
        n = jnp.maximum(w.sum(), 1.0)
        return (nll * w).sum() / n, n

    def step(params, opt_state, tokens, seg, pos, tgt, w):
        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, seg, pos, tgt, w)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "target_tokens": n, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


# --- the training pipeline (epochs) ----------------------------------------------------------------------


class EpochStream(grain.DatasetIterator):
    """Endless training batches: one Grain pipeline per epoch, epoch e shuffled and augmented with `seed + e`.

    A Grain iterator: `get_state()` / `set_state(state)` are JSON (the epoch, the
    pipeline's own state and the skip counts), so Grain's Orbax handler saves
    one file per process next to the parameters, and a resumed run yields
    exactly the batches an uninterrupted run would have.
    """

    def __init__(self, options: TrainLMOptions | ml_collections.ConfigDict, tokenizer: Any, source: TaskMixture):
        super().__init__()
        self._data, self._tokenizer, self._source = TrainLMOptions.from_config(options).data, tokenizer, source
        self.epoch = 0
        self.skips: dict[str, int] = {}
        self._pipe = self._open(0)

    def _open(self, epoch: int):
        data = self._data
        prompter = make_prompter(data, self._tokenizer)
        # Training never needs the unaugmented view first: every prompt is a fresh random view.
        prompter = dataclasses.replace(prompter, augment_config=dataclasses.replace(
            prompter.augment_config, include_identity=not data.augmentations))
        options = dataclasses.replace(PipelineOptions.from_config(data), seed=int(data.seed) + epoch, shuffle=True,
                                      n_augmentations=1, max_prompts=0)
        return build_pipeline(self._source, prompter, options, process_index=jax.process_index(),
                              process_count=jax.process_count())

    def __next__(self):
        for _ in range(2):
            try:
                return next(self._pipe)
            except StopIteration:
                for k, v in self._pipe.skip_counts.items():
                    self.skips[k] = self.skips.get(k, 0) + v
                self._pipe.close()
                self.epoch += 1
                self._pipe = self._open(self.epoch)
        raise RuntimeError(f"training source {self._source.spec} yields no batch in a whole epoch: every task "
                           f"was skipped (skips so far: {dict(sorted(self.skips.items()))}); check data.seq_len / "
                           "data.max_prompt_len")

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pipeline": self._pipe.get_state(), "skips": dict(self.skips)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._pipe.close()
        self.epoch = int(state["epoch"])
        self.skips = {k: int(v) for k, v in state.get("skips", {}).items()}
        self._pipe = self._open(self.epoch)
        self._pipe.set_state(state["pipeline"])

    def close(self) -> None:
        self._pipe.close()


# --- the job ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainLMResult:
    output_dir: str
    export_dir: str
    steps: int
    resumed_from: int | None
    params: int
    tokens_trained: int
    target_tokens: int
    epochs: float
    final_loss: float
    held_out: dict[str, Any]
    accuracy: dict[str, Any] | None
    train_tasks: int
    source_stats: dict[str, Any]
    seconds: float
    tokens_per_s: float
    total_steps: int = 0
    stopped_at: int | None = None  # set when train.stop_after ended the run early

    def summary_rows(self) -> list[tuple[str, str]]:
        h = self.held_out
        if self.stopped_at is not None:
            return [("stopped", f"at step {self.stopped_at} of {self.total_steps} (train.stop_after); the "
                                f"checkpoint is saved: rerun the same command to continue"),
                    ("tokens", f"{self.tokens_trained:,} seen"), ("output", self.output_dir)]
        rows = [
            ("export", self.export_dir),
            ("model", f"{self.params / 1e6:.2f}M parameters"),
            ("steps", f"{self.steps}" + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")),
            ("data", f"{self.train_tasks} training tasks; {self.source_stats.get('excluded', 0)} held-out tasks "
                     f"excluded, {self.source_stats.get('duplicates', 0)} duplicates dropped"),
            ("tokens", f"{self.tokens_trained:,} seen, {self.target_tokens:,} targets, {self.epochs:.0f} epochs completed"),
            ("speed", f"{self.tokens_per_s:,.0f} tokens/s ({self.tokens_trained / max(self.tokens_per_s, 1e-9):.0f} s of steps)"),
            ("train loss", f"{self.final_loss:.4f} (mean of the last log window)"),
        ]
        if h:
            rows.append(("held-out", f"answer cells {h['answer_cell']:.4f} nats vs uniform {UNIFORM_CELL_NATS:.4f} "
                                     f"({h['answer_cell_vs_uniform']:.2f}x), {h['prompts']} prompts"))
        if self.accuracy:
            a = self.accuracy
            rows.append(("accuracy", f"{a['score']:.4f} ({a['correct']:.1f}/{a['total']} test outputs, "
                                     f"{a['source']}, pass@2)"))
        return rows


def output_location(opts: TrainLMOptions) -> str:
    """`output_dir` as the job uses it: an absolute local path, or a kvstore URL as given."""
    out = opts.output_dir
    return out if is_url(out) else str(Path(out).expanduser().absolute())


def _metrics_log(path: str | Path, resume_step: int | None) -> JsonlLog | None:
    """metrics.jsonl of process 0 (None elsewhere): emptied on a fresh run, cut back to the step on a resume."""
    if jax.process_index() != 0:
        return None
    log = JsonlLog(path, fsync=True)
    if resume_step is None:
        log.location.delete(log.key)
    else:
        log.truncate(resume_step)
    return log


# What a resumed run may change (every other key must repeat; io.resume_fingerprint): where things go, how
# often to log, evaluate and save, how the mesh and attention kernel run, what the final evaluation does.
PROGRESS_KEYS = ("name", "output_dir", "export_dtype", "model_options", "mesh", "eval", "train.log_every",
                 "train.eval_every", "train.checkpoint_every", "train.stop_after", "train.checkpoint_dir",
                 "data.read_threads", "data.prefetch", "data.worker_count")


def fingerprint(opts: TrainLMOptions) -> dict[str, Any]:
    """What a resumed run must repeat: the options without `PROGRESS_KEYS`."""
    return resume_fingerprint(as_dict(opts), PROGRESS_KEYS)


@dataclasses.dataclass
class _Trainee:
    """The model, its optimizer and the jitted steps, laid out on the mesh."""

    tokenizer: Any
    mcfg: Any
    graphdef: Any
    params: Any
    opt_state: Any
    schedule: optax.Schedule
    step_fn: Callable
    nll_fn: Callable
    put: Callable  # process-local numpy arrays -> global arrays sharded over 'data'
    n_params: int


def _build(opts: TrainLMOptions) -> _Trainee:
    tokenizer = build_arc_tokenizer(opts.tokenizer)
    mcfg = model_config(opts.model, tokenizer, opts.data.seq_len)
    mesh = opts.mesh.make()
    B = int(opts.data.batch_size)
    if (B * jax.process_count()) % mesh.shape["data"]:
        raise ValueError(f"data.batch_size={B} x {jax.process_count()} processes is not divisible by the mesh's "
                         f"data axis ({mesh.shape['data']}); use a multiple of {mesh.shape['data']}")
    with jax.set_mesh(mesh):
        model = init_random(mcfg, seed=opts.seed, mesh=mesh, attention=attention_option(opts))
    graphdef, params = nnx.split(model)
    if opts.train.init_from:
        params = _initial_params(opts.train.init_from, params, mesh, attention_option(opts))
    optimizer, schedule = make_optimizer(opts.train)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(  # optax's step counters are born on one device; the mesh needs them replicated
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        jax.jit(optimizer.init)(params))
    batch_sharding = NamedSharding(mesh, P("data", None))

    def put(*arrays):
        return tuple(jax.make_array_from_process_local_data(batch_sharding, np.asarray(a)) for a in arrays)

    return _Trainee(tokenizer=tokenizer, mcfg=mcfg, graphdef=graphdef, params=params, opt_state=opt_state,
                    schedule=schedule, step_fn=make_train_step(graphdef, optimizer), nll_fn=make_nll_fn(graphdef),
                    put=put, n_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))))


def _initial_params(folder: str, like: nnx.State, mesh: Any, attention: str) -> nnx.State:
    """`train.init_from`: an HF export's parameters in place of the random ones `like` (same tree, shapes and
    shardings); refused with the differing parameters when the export's shapes are not the `model` section's."""
    flag = "--config.train.init_from"
    try:
        with jax.set_mesh(mesh):
            loaded, _ = load_model(folder, mesh=mesh, attention=attention)
    except (OSError, ValueError) as e:
        missing_export = Path(folder).name == "export" and not Path(folder).exists()
        hint = ("" if not missing_export else " (a train_lm run writes its export to OUTPUT_DIR/export when it "
                "finishes: run the stage it continues first; configs/train_lm.py lists arcstream-tiny's stages)")
        raise ConfigError(f"{flag}={folder!r}: {e}{hint}") from e
    got = dict(nnx.to_flat_state(nnx.split(loaded)[1]))
    want = dict(nnx.to_flat_state(like))
    shape = lambda v: tuple(v.get_value().shape)  # noqa: E731
    wrong = [f"{'.'.join(map(str, k))}: export {shape(got[k]) if k in got else '<absent>'}, "
             f"model section {shape(v)}" for k, v in want.items() if k not in got or shape(got[k]) != shape(v)]
    wrong += [f"{'.'.join(map(str, k))}: in the export only" for k in got if k not in want]
    if wrong:
        raise ConfigError(f"{flag}={folder!r} does not have the shapes of the configured model (--config.model.*, "
                          f"the tokenizer's vocabulary): " + "; ".join(wrong[:6])
                          + (f"; and {len(wrong) - 6} more" if len(wrong) > 6 else ""))
    for k, v in want.items():
        v.set_value(got[k].get_value().astype(v.get_value().dtype))
    return like


class _Checkpoints:
    """The run's Orbax checkpoints: parameters + optax state, the data stream (Grain's handler: one JSON file
    per process, no collective) and the meta (the config fingerprint and the token/time counters)."""

    def __init__(self, opts: TrainLMOptions, out: str):
        flag = "--config.train.checkpoint_dir"  # a memory:// output_dir needs it: Orbax writes files and gs://
        self.directory = checkpoint_path(checkpoint_dir(opts.train.checkpoint_dir, out, "checkpoints", flag=flag,
                                                        output_flag="--config.output_dir"), flag)
        self.fingerprint = fingerprint(opts)
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True))
        self.saved = self.latest = self._manager.latest_step()

    def restore(self, trainee: _Trainee, stream: EpochStream) -> dict[str, Any]:
        """Loads the latest checkpoint into `trainee` and `stream`; returns the counters."""
        step = self.latest
        state = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": trainee.params,
                                                               "opt_state": trainee.opt_state})
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        refusal = resume_refusal(self.directory, step, meta, self.fingerprint,
                                 "use a new --config.output_dir (or --config.train.checkpoint_dir)")
        if refusal:
            raise ConfigError(refusal)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), stream=grain.checkpoint.CheckpointRestore(stream)))
        trainee.params, trainee.opt_state = restored["state"]["params"], restored["state"]["opt_state"]
        return meta["counters"]

    def save(self, step: int, trainee: _Trainee, stream: EpochStream, counters: dict[str, Any]) -> None:
        if self.saved == step:
            return
        self.saved = step
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": trainee.params, "opt_state": trainee.opt_state}),
            stream=grain.checkpoint.CheckpointSave(stream),
            meta=ocp.args.JsonSave({"fingerprint": self.fingerprint, "counters": counters})), force=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def train(options: TrainLMOptions | ml_collections.ConfigDict, *,
          log: Callable[[str], None] = print) -> TrainLMResult:
    """Trains (or resumes), exports, evaluates and writes the model card; see the module docstring.

    `options`: the job's frozen options (a configs/train_lm.py ConfigDict is checked into them first)."""
    start = time.perf_counter()
    opts = TrainLMOptions.from_config(options)
    out = output_location(opts)
    ckpt = _Checkpoints(opts, out)
    trainee = _build(opts)
    source = training_source(opts)
    log(f"training tasks: {len(source)} from {source.per_source}; {source.stats}")
    stream = EpochStream(opts, trainee.tokenizer, source)

    # --- resume
    step, resumed_from = 0, None
    counters = {"tokens": 0, "targets": 0, "seconds": 0.0}  # over all sessions of the run
    if ckpt.latest is not None:
        counters = ckpt.restore(trainee, stream)
        step = resumed_from = int(ckpt.latest)
        log(f"resumed from step {step} (epoch {stream.epoch})")
    elif opts.train.init_from:
        log(f"weights from {opts.train.init_from} (train.init_from); optimiser and schedule from step 0")
    metrics_path = join_location(out, "metrics.jsonl")
    metrics = _metrics_log(metrics_path, resumed_from)

    # --- train
    loop = _Loop(opts, trainee, stream, metrics, counters, log)
    total, t = opts.train.steps, opts.train
    bar = cli.progress(range(step, total), total=total - step, desc="train_lm", unit="step")
    for step_i in bar:
        step = step_i + 1
        loop.step(step)
        if step % t.checkpoint_every == 0 and step != total:
            ckpt.save(step, trainee, stream, counters)
        if t.stop_after and step >= t.stop_after and step != total:
            break
    bar.close()  # a broken-off progress generator prints its final line now, not when collected
    ckpt.save(step, trainee, stream, counters)
    stream.close()
    ckpt.close()
    if not loop.window:  # resumed at the end: the last records of metrics.jsonl hold the final losses
        loop.window = [r["loss"] for r in read_metrics(metrics_path)]
    result = TrainLMResult(
        output_dir=out, export_dir="", steps=step, resumed_from=resumed_from, params=trainee.n_params,
        tokens_trained=int(counters["tokens"]), target_tokens=int(counters["targets"]), epochs=float(stream.epoch),
        final_loss=float(np.mean(loop.window[-5:])) if loop.window else float("nan"), held_out={}, accuracy=None,
        train_tasks=len(source), source_stats={**source.stats, "per_source": source.per_source,
                                               "skips": stream.skips},
        seconds=0.0, tokens_per_s=counters["tokens"] / max(counters["seconds"], 1e-9), total_steps=total)
    if step < total:  # stopped early on purpose (train.stop_after): the checkpoint is saved, rerun to go on
        return dataclasses.replace(result, stopped_at=step, seconds=time.perf_counter() - start)
    return _export_and_evaluate(opts, trainee, result, metrics_path, start, log)


class _Loop:
    """One training step at a time, with the metrics record (and held-out figures) every few steps."""

    def __init__(self, opts: TrainLMOptions, trainee: _Trainee, stream: EpochStream,
                 metrics: JsonlLog | None, counters: dict[str, Any], log: Callable[[str], None]):
        self.opts, self.trainee, self.stream, self.metrics, self.counters, self.log = (
            opts, trainee, stream, metrics, counters, log)
        self.window: list[float] = []  # the logged losses of this session
        self.eval_batches = None
        if opts.train.eval_every and opts.eval.source:
            with eval_pipeline(opts, trainee.tokenizer, opts.eval.source, opts.eval.prompts) as p:
                self.eval_batches = list(p)
        self._t_window, self._tok_window = time.perf_counter(), 0

    def step(self, step: int) -> None:
        """Trains step `step` (1-based) and logs when it falls on `train.log_every` / `eval_every` / the end."""
        tr, t = self.trainee, self.opts.train
        batch = next(self.stream)
        tgt, w = targets(batch)
        tr.params, tr.opt_state, m = tr.step_fn(tr.params, tr.opt_state, *tr.put(
            batch.tokens, batch.segment_ids, batch.positions, tgt, w))
        n_tok = int(batch.valid.sum()) * jax.process_count()
        self.counters["tokens"] += n_tok
        self.counters["targets"] += int(w.sum()) * jax.process_count()
        self._tok_window += n_tok
        last = step == t.steps
        evaluate = self.eval_batches is not None and (step % t.eval_every == 0 or last)
        if step % t.log_every == 0 or last or evaluate:
            self._record(step, m, evaluate)

    def _record(self, step: int, m: dict[str, Any], evaluate: bool) -> None:
        tr = self.trainee
        loss = float(m["loss"])
        self.window.append(loss)
        dt = time.perf_counter() - self._t_window
        self.counters["seconds"] += dt
        rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(tr.schedule(step - 1)),
               "epoch": self.stream.epoch, "tokens": self.counters["tokens"],
               "tokens_per_s": self._tok_window / max(dt, 1e-9)}
        if evaluate:
            rec["held_out"] = held_out_loss(tr.nll_fn, tr.params, self.eval_batches, tr.put).as_dict()
            self.log(f"step {step}: held-out answer-cell loss {rec['held_out']['answer_cell']:.4f}")
            e = self.opts.eval
            watched = ([(str(e.source), e.context_tasks_during)] if e.context_tasks_during else []) + [
                (spec, e.probe_tasks) for spec in e.probe_sources()]
            model = nnx.merge(tr.graphdef, tr.params) if watched else None
            for n, (spec, tasks) in enumerate(watched):
                ctx = context_summary(context_use_of_run(self.opts, model, tr.tokenizer, max_tasks=tasks, source=spec))
                if n == 0 and e.context_tasks_during:
                    rec["held_out"]["context"] = ctx
                else:
                    rec["held_out"].setdefault("probes", {})[spec] = ctx
                self.log(f"step {step}: " + describe_context(spec, ctx))
        if self.metrics is not None:
            self.metrics.append(rec)
            self.metrics.flush()
        self.log(f"step {step}/{self.opts.train.steps} loss {loss:.4f} lr {rec['lr']:.2e} "
                 f"{rec['tokens_per_s']:.0f} tok/s epoch {self.stream.epoch}")
        self._t_window, self._tok_window = time.perf_counter(), 0


def _export_and_evaluate(opts: TrainLMOptions, trainee: _Trainee, result: TrainLMResult,
                         metrics_path: str | Path, start: float, log: Callable[[str], None]) -> TrainLMResult:
    """The HF export, the held-out evaluation and the model card of a finished run.

    A kvstore URL output_dir: each process stages the export in a local folder (transformers, safetensors and
    matplotlib write files), process 0 uploads it at the end, README.md last.
    """
    out = result.output_dir
    export_at = join_location(out, "export")
    staged = RunLocation(out).local is None
    with local_folder(export_at, upload=jax.process_index() == 0, last=("README.md",)) as export_dir:
        export_model(trainee.graphdef, trainee.params, trainee.mcfg, trainee.tokenizer, export_dir,
                     dtype=opts.export_dtype, every_process=staged)
        if staged or jax.process_index() == 0:
            export_prompt_format(opts, export_dir)
        held, accuracy = final_evaluation(opts, export_dir, log=log, name=str(export_at),
                                          predictions_dir=join_location(out, "eval_predictions"))
        result = dataclasses.replace(result, export_dir=str(export_at), held_out=held, accuracy=accuracy,
                                     seconds=time.perf_counter() - start)
        if jax.process_index() == 0:
            write_model_card(opts, result, export_dir, metrics_path)
    return result
