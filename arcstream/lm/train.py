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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arcstream.io import JsonlLog, RunLocation, checkpoint_dir, checkpoint_path, is_url, join_location, local_folder
from arcstream.lm.data import TaskMixture, targets
from arcstream.lm.heldout import UNIFORM_CELL_NATS, eval_pipeline, held_out_loss, make_nll_fn, token_nll



def model_config(config: ml_collections.ConfigDict, tokenizer: Any):
    """The ModelConfig of the `model` section, with the tokenizer's vocabulary and stop token."""
    from arcstream.model import ModelConfig

    m = config.model
    return ModelConfig(
        family=str(m.family), vocab_size=len(tokenizer), hidden_size=int(m.hidden_size), num_layers=int(m.num_layers),
        num_heads=int(m.num_heads), num_kv_heads=int(m.num_kv_heads), head_dim=int(m.hidden_size) // int(m.num_heads),
        intermediate_size=int(m.intermediate_size), rope_theta=float(m.rope_theta), tie_word_embeddings=bool(m.tie),
        qkv_bias=str(m.family) == "qwen2", qk_norm=str(m.family) == "qwen3", rms_norm_eps=1e-6,
        max_position_embeddings=int(config.data.seq_len), eos_token_ids=(int(tokenizer.eos_token_id),),
        bos_token_id=int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None)


def training_source(config: ml_collections.ConfigDict) -> TaskMixture:
    return TaskMixture(_split(config.data.sources), _split(config.data.exclude))


def _split(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr`, global-norm clipping,
    weight decay on matrices only (not norms, biases)."""
    if int(t.steps) < 1 or not 0 <= int(t.warmup_steps) < int(t.steps):
        raise ValueError(f"--config.train.steps={t.steps} and --config.train.warmup_steps={t.warmup_steps}: "
                         "need steps >= 1 and 0 <= warmup_steps < steps")
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(t.lr), int(t.warmup_steps), max(int(t.steps), 1),
                                                  end_value=float(t.lr) * float(t.min_lr_ratio))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    opt = optax.chain(
        optax.clip_by_global_norm(float(t.clip_norm)) if t.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay), mask=decay_mask),
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


class EpochStream:
    """Endless training batches: one Grain pipeline per epoch, epoch e shuffled and augmented with `seed + e`.

    `state()` / `restore(state)` are JSON: the epoch and the pipeline's own state,
    so a resumed run yields exactly the batches an uninterrupted run would have.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, source: TaskMixture):
        self._config, self._tokenizer, self._source = config, tokenizer, source
        self.epoch = 0
        self.skips: dict[str, int] = {}
        self._pipe = self._open(0)

    def _open(self, epoch: int):
        from arcstream.data.pipeline import (
            PipelineOptions,
            build_pipeline,
            make_prompter,
        )

        data = self._config.data
        prompter = make_prompter(data, self._tokenizer)
        # Training never needs the unaugmented view first: every prompt is a fresh random view.
        prompter = dataclasses.replace(prompter, augment_config=dataclasses.replace(
            prompter.augment_config, include_identity=not data.augmentations))
        options = dataclasses.replace(PipelineOptions.from_config(data), seed=int(data.seed) + epoch, shuffle=True,
                                      n_augmentations=1, max_prompts=0)
        return build_pipeline(self._source, prompter, options, process_index=jax.process_index(),
                              process_count=jax.process_count())

    def __iter__(self) -> EpochStream:
        return self

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

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pipeline": self._pipe.get_state(), "skips": dict(self.skips)}

    def restore(self, state: dict[str, Any]) -> None:
        self._pipe.close()
        self.epoch = int(state["epoch"])
        self.skips = {k: int(v) for k, v in state.get("skips", {}).items()}
        self._pipe = self._open(self.epoch)
        self._pipe.set_state(state["pipeline"])

    def close(self) -> None:
        self._pipe.close()


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (one collective)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
    padded = np.zeros(n, np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


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


def output_location(config: ml_collections.ConfigDict) -> str:
    """`output_dir` as the job uses it: an absolute local path, or a kvstore URL as given."""
    out = str(config.output_dir)
    if not out:
        raise ValueError("--config.output_dir is empty: give a local directory or a kvstore URL (gs://bucket/run)")
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


def train(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print) -> TrainLMResult:
    """Trains (or resumes), exports, evaluates and writes the model card; see the module docstring."""
    from arcstream import cli
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model import attention_option, init_random, make_mesh

    start = time.perf_counter()
    out = output_location(config)
    t = config.train
    flag = "--config.train.checkpoint_dir"  # a memory:// output_dir needs it: Orbax writes files and gs://
    ckpt_dir = checkpoint_path(checkpoint_dir(str(t.get("checkpoint_dir", "") or ""), out, "checkpoints", flag=flag,
                                              output_flag="--config.output_dir"), flag)
    tokenizer = build_arc_tokenizer(str(config.tokenizer))
    mcfg = model_config(config, tokenizer)
    mesh = make_mesh(data=int(config.mesh.data), model=int(config.mesh.model))
    B = int(config.data.batch_size)
    if (B * jax.process_count()) % mesh.shape["data"]:
        raise ValueError(f"data.batch_size={B} x {jax.process_count()} processes is not divisible by the mesh's "
                         f"data axis ({mesh.shape['data']}); use a multiple of {mesh.shape['data']}")
    with jax.set_mesh(mesh):
        model = init_random(mcfg, seed=int(config.seed), mesh=mesh, attention=attention_option(config))
    graphdef, params = nnx.split(model)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    optimizer, schedule = make_optimizer(t)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(  # optax's step counters are born on one device; the mesh needs them replicated
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        jax.jit(optimizer.init)(params))
    step_fn = make_train_step(graphdef, optimizer)
    nll_fn = make_nll_fn(graphdef)
    batch_sharding = NamedSharding(mesh, P("data", None))

    def put(*arrays):
        return tuple(jax.make_array_from_process_local_data(batch_sharding, np.asarray(a)) for a in arrays)

    source = training_source(config)
    log(f"training tasks: {len(source)} from {source.per_source}; {source.stats}")
    stream = EpochStream(config, tokenizer, source)

    # --- resume
    ckpt = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    step, resumed_from = 0, None
    counters = {"tokens": 0, "targets": 0, "seconds": 0.0}  # over all sessions of the run
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = ckpt.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
        meta = restored["meta"]
        if meta["fingerprint"] != _fingerprint(config):
            raise ValueError(f"{ckpt_dir} was written by another configuration; use a new "
                             f"--config.output_dir or the same config (saved: {meta['fingerprint']})")
        stream.restore(meta["streams"][jax.process_index()])
        counters = meta["counters"]
        step = resumed_from = int(latest)
        log(f"resumed from step {step} (epoch {stream.epoch})")
    metrics_path = join_location(out, "metrics.jsonl")
    metrics = _metrics_log(metrics_path, resumed_from)

    saved = {"step": latest}

    def save(at: int) -> None:
        if saved["step"] == at:
            return
        saved["step"] = at
        meta = {"fingerprint": _fingerprint(config), "streams": _allgather_json(stream.state()),
                "counters": counters}
        ckpt.save(at, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                                              meta=ocp.args.JsonSave(meta)), force=True)
        ckpt.wait_until_finished()

    eval_batches = None
    if t.eval_every and config.eval.source:
        with eval_pipeline(config, tokenizer, str(config.eval.source), int(config.eval.prompts)) as pipe:
            eval_batches = list(pipe)

    total = int(t.steps)
    window: list[float] = []
    last_loss = float("nan")
    t_window, tok_window = time.perf_counter(), 0
    bar = cli.progress(range(step, total), total=total - step, desc="train_lm", unit="step")
    for step_i in bar:
        batch = next(stream)
        tgt, w = targets(batch)
        params, opt_state, m = step_fn(params, opt_state, *put(batch.tokens, batch.segment_ids, batch.positions,
                                                               tgt, w))
        step = step_i + 1
        n_tok = int(batch.valid.sum()) * jax.process_count()
        counters["tokens"] += n_tok
        counters["targets"] += int(w.sum()) * jax.process_count()
        tok_window += n_tok
        evaluate = eval_batches is not None and (step % int(t.eval_every) == 0 or step == total)
        if step % int(t.log_every) == 0 or step == total or evaluate:
            loss = float(m["loss"])
            window.append(loss)
            dt = time.perf_counter() - t_window
            counters["seconds"] += dt
            rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step - 1)),
                   "epoch": stream.epoch, "tokens": counters["tokens"], "tokens_per_s": tok_window / max(dt, 1e-9)}
            if evaluate:
                rec["held_out"] = held_out_loss(nll_fn, params, eval_batches, put).as_dict()
                log(f"step {step}: held-out answer-cell loss {rec['held_out']['answer_cell']:.4f}")
                if int(config.eval.get("context_tasks_during", 0)):
                    rec["held_out"]["context"] = _context_gain(config, nnx.merge(graphdef, params), tokenizer)
                    log(f"step {step}: context gain {rec['held_out']['context']['gain']:.1%} on "
                        f"{rec['held_out']['context']['test_outputs']} held-out test outputs")
            if metrics is not None:
                metrics.append(rec)
                metrics.flush()
            last_loss = float(np.mean(window[-5:]))
            log(f"step {step}/{total} loss {loss:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s "
                f"epoch {stream.epoch}")
            t_window, tok_window = time.perf_counter(), 0
        if step % int(t.checkpoint_every) == 0 and step != total:
            save(step)
        if int(t.stop_after) and step >= int(t.stop_after) and step != total:
            break
    bar.close()  # a broken-off progress generator prints its final line now, not when collected
    save(step)
    stream.close()
    ckpt.close()
    if not window:  # resumed at the end: the last records of metrics.jsonl hold the final losses
        from arcstream.lm.card import read_metrics

        window = [r["loss"] for r in read_metrics(metrics_path)]
        last_loss = float(np.mean(window[-5:])) if window else float("nan")
    stats = {**source.stats, "per_source": source.per_source, "skips": stream.skips}
    if step < total:  # stopped early on purpose (train.stop_after): the checkpoint is saved, rerun to go on
        return TrainLMResult(
            output_dir=out, export_dir="", steps=step, resumed_from=resumed_from, params=n_params,
            tokens_trained=int(counters["tokens"]), target_tokens=int(counters["targets"]), epochs=float(stream.epoch),
            final_loss=last_loss, held_out={}, accuracy=None, train_tasks=len(source), source_stats=stats,
            seconds=time.perf_counter() - start, tokens_per_s=counters["tokens"] / max(counters["seconds"], 1e-9),
            stopped_at=step, total_steps=total)

    # --- export, evaluate, card
    from arcstream.lm.card import export_model, export_prompt_format, final_evaluation, write_model_card

    # A kvstore URL output_dir: each process stages the export in a local folder (transformers, safetensors and
    # matplotlib write files), process 0 uploads it at the end, README.md last.
    export_at = join_location(out, "export")
    staged = RunLocation(out).local is None
    with local_folder(export_at, upload=jax.process_index() == 0, last=("README.md",)) as export_dir:
        export_model(graphdef, params, mcfg, tokenizer, export_dir, dtype=str(config.export_dtype),
                     every_process=staged)
        if staged or jax.process_index() == 0:
            export_prompt_format(config, export_dir)
        held, accuracy = final_evaluation(config, export_dir, log=log, name=str(export_at),
                                          predictions_dir=join_location(out, "eval_predictions"))
        result = TrainLMResult(
            output_dir=out, export_dir=str(export_at), steps=step, resumed_from=resumed_from, params=n_params,
            tokens_trained=int(counters["tokens"]), target_tokens=int(counters["targets"]),
            epochs=float(stream.epoch), final_loss=last_loss, held_out=held, accuracy=accuracy,
            train_tasks=len(source), source_stats=stats, total_steps=total, seconds=time.perf_counter() - start,
            tokens_per_s=counters["tokens"] / max(counters["seconds"], 1e-9))
        if jax.process_index() == 0:
            write_model_card(config, result, export_dir, metrics_path)
    return result


def _context_gain(config: ml_collections.ConfigDict, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The context-use figure of the model card on the first `eval.context_tasks_during` held-out tasks: answer-
    cell loss with the task's own train pairs, none and another task's, and the gain 1 - own / another."""
    from arcstream.lm.evaluate import context_use_of_run

    cu = context_use_of_run(config, model, tokenizer, max_tasks=int(config.eval.context_tasks_during))
    own, other = cu["model"]["own"]["loss"], cu["model"]["other"]["loss"]
    return {"own": own, "none": cu["model"]["none"]["loss"], "other": other, "gain": 1.0 - own / other,
            "test_outputs": cu["test_outputs"]}


def _fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must not change across a resume (the rest, e.g. eval and export keys, may)."""
    d = json.loads(config.to_json_best_effort())
    keep = {k: d[k] for k in ("model", "tokenizer", "seed", "data") if k in d}
    keep["train"] = {k: v for k, v in d.get("train", {}).items() if k not in ("log_every", "eval_every",
                                                                            "checkpoint_every", "stop_after",
                                                                            "checkpoint_dir")}
    keep["data"] = {k: v for k, v in keep.get("data", {}).items() if k not in ("read_threads", "prefetch",
                                                                             "worker_count")}
    return keep
