"""After training: the HF-layout export, the final held-out evaluation, and the model card (README.md)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from arcstream.data.tokenizer import load_tokenizer
from arcstream.io import file_location, flat_keys, join_location
from arcstream.lm.evaluate import (GOAL_CONTEXT_GAIN, context_summary, context_use_of_run, describe_context,
                                   render_markdown)
from arcstream.lm.heldout import eval_pipeline, held_out_loss, make_nll_fn
from arcstream.lm.options import TrainLMOptions
from arcstream.options import as_dict, section_of
from arcstream.model import Decoder, attention_option, load_model, save_hf_checkpoint
from arcstream.models import write_prompt_format
from arcstream.predict.job import default_predict_section, run_predictions


def export_model(graphdef: Any, params: Any, mcfg: Any, tokenizer: Any, path: Path, *, dtype: str,
                 every_process: bool = False) -> Path:
    """config.json + model.safetensors (in `dtype`) + tokenizer files, loadable by transformers and `load_model`.

    Every process calls it; process 0 writes, or every process (into its own local `path`) with
    `every_process` (an export staged locally on each host on its way to a kvstore URL)."""
    cast = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    abstract = nnx.eval_shape(lambda: Decoder(mcfg, dtype=dtype, rngs=nnx.Rngs(0)))
    gdef, _ = nnx.split(abstract)
    del graphdef  # same structure; the exported graph carries the export dtype
    save_hf_checkpoint(nnx.merge(gdef, cast), mcfg, path, every_process=every_process)
    if every_process or jax.process_index() == 0:
        tokenizer.save_pretrained(path)
    return path


def export_prompt_format(config: TrainLMOptions, path: Path) -> Path:
    """arcstream_prompt.json: the prompt format the model was trained on (read by `arcstream.models.prompt_format`)."""
    return write_prompt_format(path, config.data)


def final_evaluation(config: TrainLMOptions, export_dir: Path, *, log: Callable[[str], None] = print,
                     name: str = "", predictions_dir: str | Path = "") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Held-out next-token losses and (when `eval.accuracy`) the pass@2 score on `eval.source`, of the export
    in the local folder `export_dir`; `name` is where the export lives for the record (default: the folder).
    The decoded answers go to `predictions_dir` (default `output_dir/eval_predictions`; a path or URL)."""
    e = config.eval
    if not e.source:
        return {}, None
    model, _ = load_model(str(export_dir), dtype="float32", attention=attention_option(config))
    graphdef, params = nnx.split(model)
    nll_fn = make_nll_fn(graphdef)
    tokenizer = _tokenizer(export_dir)
    put = lambda *a: tuple(jnp.asarray(x) for x in a)
    with eval_pipeline(config, tokenizer, str(e.source), int(e.final_prompts)) as pipe:
        held = held_out_loss(nll_fn, params, pipe, put).as_dict()
        held["skipped"] = dict(pipe.skip_counts)
    log(f"held-out ({e.source}): answer-cell loss {held['answer_cell']:.4f} nats vs uniform {math.log(10):.4f}")
    if e.context_tasks:
        held["context_use"] = cu = context_use_of_run(config, model, tokenizer, max_tasks=int(e.context_tasks))
        log(f"context use on {cu['test_outputs']} held-out test outputs: answer-cell loss {cu['model']['own']['loss']:.4f} "
            f"with the task's examples vs {cu['model']['other']['loss']:.4f} with another task's "
            f"(gain {100 * cu['context_gain']:.1f}%)")
    for spec in e.probe_sources():
        held.setdefault("probes", {})[spec] = ctx = context_summary(
            context_use_of_run(config, model, tokenizer, max_tasks=int(e.probe_tasks), source=spec))
        log("probe " + describe_context(spec, ctx))
    accuracy = None
    if e.accuracy:
        c = ml_collections.ConfigDict()
        c.model = name or str(export_dir)
        c.dtype = "float32"
        c.output_dir = str(predictions_dir or join_location(str(config.output_dir), "eval_predictions"))
        c.seed = 0
        c.data = ml_collections.ConfigDict(json.loads(config.data.to_json()))
        for k in ("sources", "exclude"):
            del c.data[k]
        c.data.source = str(e.source)
        c.data.include_answer = False
        c.data.n_augmentations = int(e.n_augmentations)
        c.data.max_tasks = int(e.accuracy_tasks)
        c.data.seed = 0
        c.predict = default_predict_section()
        c.predict.max_new_tokens = int(e.max_new_tokens)
        c.predict.batch_size = int(e.predict_batch_size)
        c.predict.tasks_per_chunk = int(e.predict_batch_size)
        c.predict.constrain_shape = e.constrain_shape
        result = run_predictions(c, model=model, tokenizer=tokenizer)
        s = result.score
        accuracy = {"source": str(e.source), "score": s.score if s else 0.0, "correct": float(s.solved if s else 0),
                    "total": int(s.total if s else 0), "tasks": result.tasks,
                    "n_augmentations": int(e.n_augmentations), "failures": dict(result.failures),
                    "skipped": dict(result.skipped), "predictions": c.output_dir,
                    "shape_right": int(result.shape_right), "constrain_shape": c.predict.constrain_shape,
                    "shape_sources": dict(result.shape_sources)}
        log(f"accuracy on {e.source}: {accuracy['correct']:.0f}/{accuracy['total']} test outputs")
    return held, accuracy


def _tokenizer(path: Path) -> Any:
    return load_tokenizer(str(path))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a local path or a file in a kvstore URL); [] when it does not exist."""
    location, key = file_location(path)
    data = location.read_bytes(key)
    return [json.loads(line) for line in (data or b"").decode("utf-8").splitlines() if line.strip()]


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """loss_curve.png: training loss per logged step and the held-out answer-cell loss, with ln 10 for reference."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train (output-grid tokens)")
    held = [r for r in records if "held_out" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["held_out"]["answer_cell"] for r in held], "o-", ms=3,
                label="held-out answer cells")
    ax.axhline(math.log(10), color="grey", ls="--", lw=1, label="uniform over 10 colours (ln 10)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_model_card(config: TrainLMOptions, result: Any, export_dir: Path, metrics: str | Path) -> Path:
    """export_dir/README.md (HF model card front matter + what, how, how well, how to reproduce).

    Also writes, beside it, the per-step records (training_metrics.jsonl) and, when there are any, their loss
    curve (loss_curve.png), which the card links to."""
    records = read_metrics(metrics)
    plot = plot_loss_curve(records, export_dir / "loss_curve.png")
    (export_dir / "training_metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = _model_lines(config, result, export_dir) + _data_lines(config, result) + _training_lines(config, result)
    if plot:
        lines += ["![loss curve](loss_curve.png)", "", "Per-step records: `training_metrics.jsonl`.", ""]
    lines += evaluation_lines(config, result.held_out, result.accuracy)
    lines += _use_lines(config)
    path = export_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _model_lines(config: TrainLMOptions, result: Any, export_dir: Path) -> list[str]:
    """The card's front matter, title and Model section (architecture, tokenizer, prompt format)."""
    m, d = config.model, config.data
    return [
        "---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [arc-agi, arcstream, qwen2]", "---", "",
        f"# {config.name}", "",
        "A small Qwen2-architecture language model trained by arcstream (`python -m arcstream.train_lm`) to write "
        "ARC output grids. It is the model of arcstream's embedded default run: small enough to run on a CPU, "
        "trained enough that its activations reflect ARC grids rather than noise.", "",
        "## Model", "",
        f"- Architecture: {m.family}, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads "
        f"({m.num_kv_heads} KV heads), MLP {m.intermediate_size}, tied embeddings, RoPE theta {m.rope_theta:g}; "
        f"{result.params / 1e6:.2f}M parameters, stored in {config.export_dtype}.",
        f"- Tokenizer: arcstream `{config.tokenizer}` ({_vocab(export_dir)} tokens): one token per colour digit, "
        "per character of the structural text, plus special tokens.",
        f"- Prompt format: template `{d.template}`, encoder `{d.encoder}`, chat template "
        f"{'on' if d.use_chat_template else 'off'}; arcstream's `configs/default.py` uses the same.", "",
    ]


def _data_lines(config: TrainLMOptions, result: Any) -> list[str]:
    """The card's Data section: training and held-out tasks, augmentation, packing, the loss's targets."""
    d = config.data
    return [
        "## Data", "",
        f"- Training tasks: {result.train_tasks} ({', '.join(f'{k}: {v}' for k, v in result.source_stats['per_source'].items())}).",
        f"- Held out: every task of `{d.exclude}`"
        + "".join(f" and of `{p}`" for p in config.eval.probe_sources())
        + f" ({result.source_stats['held_out_tasks']} tasks), matched by id "
        f"and by content; {result.source_stats['excluded']} training-set copies of them were removed "
        f"(ARC-AGI-2's training set contains ARC-AGI-1 evaluation tasks), and "
        f"{result.source_stats['duplicates']} duplicates between the training sets dropped.",
        f"- Each prompt is a fresh random augmentation ({d.augmentations}; background colour kept), "
        f"one per test pair, a new shuffle and augmentation seed per epoch; rows of {d.seq_len} tokens packed "
        f"with several prompts; prompts over {d.max_prompt_len} tokens drop train pairs ({d.drop_policy}).",
        "- Loss: next-token cross-entropy on the output grids only (`arcstream.lm.data`): every token of every "
        "train output grid and of the answer (shape header when the encoder writes one, cells, line breaks, and "
        "the stop token after the grid when the template writes one).", "",
    ]


def _training_lines(config: TrainLMOptions, result: Any) -> list[str]:
    """The card's Training section: steps, tokens, optimiser, speed, final loss."""
    t, d = config.train, config.data
    start = ([f"- Started from the weights of `{t.init_from}` (`train.init_from`; its own card gives how it was "
              "trained), with a fresh optimiser and schedule."] if t.init_from else [])
    return [
        "## Training", "", *start,
        f"- {result.steps} steps of {d.batch_size} rows x {d.seq_len} tokens; {result.tokens_trained:,} tokens "
        f"seen, {result.target_tokens:,} of them targets; {result.epochs:.0f} full epochs completed.",
        f"- AdamW (b1 {t.b1}, b2 {t.b2}, weight decay {t.weight_decay} on matrices), peak lr {t.lr:g}, "
        f"{t.warmup_steps} warm-up steps then cosine to {t.min_lr_ratio:g} x peak, clip {t.clip_norm}.",
        f"- {result.tokens_per_s:,.0f} tokens/s: {result.tokens_trained / max(result.tokens_per_s, 1e-9) / 60:.0f} "
        "min of training steps on the machine that trained it (2 CPU cores), plus the final evaluation.",
        f"- Final training loss (last log window): {result.final_loss:.4f} nats/token.", "",
    ]


# How the card's Reproduce section opens: `_use_lines` writes it, `reproduce_commands` reads a parent card's.
_REPRODUCE = "## Reproduce\n\n```bash\n"


def reproduce_commands(config: TrainLMOptions) -> list[str]:
    """The commands that train this model from scratch: configs/train_lm.py with a flag for every key whose value
    differs from its defaults (the base recipe), preceded, when `train.init_from` is an arcstream export, by the
    commands of its own card (so a continued model's card gives the whole chain)."""
    base, ours = flat_keys(as_dict(section_of(TrainLMOptions))), flat_keys(as_dict(config))
    flags = [f"--config.{k}={shlex.quote(str(v))}" for k, v in ours.items() if k in base and base[k] != v]
    chain: list[str] = []
    if config.train.init_from:
        parent = Path(config.train.init_from) / "README.md"
        text = parent.read_text(encoding="utf-8") if parent.is_file() else ""
        if _REPRODUCE in text:
            block = text.split(_REPRODUCE, 1)[1].split("```", 1)[0]
            chain = [line for line in block.splitlines() if line.strip()] + [
                f"# then, from that export ({config.train.init_from}):"]
    return chain + [" ".join(["python -m arcstream.train_lm --config=configs/train_lm.py", *flags])]


def _use_lines(config: TrainLMOptions) -> list[str]:
    """The card's Use and Reproduce sections."""
    out = config.output_dir.rstrip("/")
    return [
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)  # this folder",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```", "",
        "In arcstream: `python -m arcstream.run --config=configs/default.py` (it uses this model), or "
        "`--config.model=PATH` in any job.", "",
        *_REPRODUCE.splitlines(), *reproduce_commands(config), "```", "",
        f"A run resumes from its latest checkpoint if stopped; the export, this card and the loss curve are "
        f"written to `{out}/export/`. Training is deterministic for a given seed on one machine; "
        "numbers move slightly with the device count and XLA version.", "",
    ]


def _vocab(export_dir: Path) -> int:
    try:
        return int(json.loads((export_dir / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError):
        return -1


def evaluation_lines(config: TrainLMOptions, h: dict[str, Any], a: dict[str, Any] | None) -> list[str]:
    """The card's evaluation sections (held-out losses, context use against baselines, accuracy)."""
    lines = ["## Evaluation (held-out)", ""]
    if h:
        lines += [
            f"On `{config.eval.source}` ({h['prompts']} prompts, identity augmentation, {h['answer_cells']:,} "
            "answer cells), next-token loss of the exported weights:", "",
            "| target tokens | loss (nats) |", "|---|---|",
            f"| answer cells | {h['answer_cell']:.4f} |",
            f"| all answer tokens (cells, line breaks, stop) | {h['answer_token']:.4f} |",
            f"| cells of train outputs in the prompt | {h['train_output_cell']:.4f} |",
            f"| uniform over 10 colours (baseline) | {math.log(10):.4f} |", "",
            f"The answer-cell loss is {h['answer_cell_vs_uniform']:.2f}x the uniform baseline.", "",
        ]
    if h and h.get("context_use"):
        lines += ["## Does it read the examples?", ""] + render_markdown(h["context_use"])
    if h and h.get("probes"):
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        lines += ["Probes (`eval.probes`, held out of training; same teacher-forced measure, first "
                  f"{config.eval.probe_tasks} tasks each):", "",
                  "| source | test outputs | loss own / another task's | context gain | same-shape accuracy "
                  "| copy the test input |", "|---|---|---|---|---|---|"]
        for spec, p in h["probes"].items():
            gain = "—" if p["gain"] is None else f"{100 * p['gain']:.1f}%"
            lines.append(f"| `{spec}` | {p['test_outputs']} | {f(p['own'])} / {f(p['other'])} | {gain} | "
                         f"{f(p['same_shape_accuracy'])} | {f(p['copy_test_input'])} |")
        lines.append("")
    if a:
        constrained = ""
        if a["constrain_shape"]:
            constrained = ("; shape-constrained (the answer's shape from the train pairs' rules, else the model's own "
                           "header; `arcstream/predict/shape.py`), shapes from: "
                           + ", ".join(f"{k} {v}" for k, v in a["shape_sources"].items()))
        lines += [
            f"Accuracy on `{a['source']}` ({a['tasks']} tasks, {a['total']} test outputs; greedy decoding"
            f"{constrained}; {a['n_augmentations']} augmentation(s) per test input, two attempts, exact match): "
            f"**{a['correct']:.0f}/{a['total']} = {100 * a['score']:.2f}%**. First attempt of the right shape: "
            f"{a['shape_right']}/{a['total']}. Failures by reason: "
            f"{', '.join(f'{k} {v}' for k, v in a['failures'].items()) or 'none'}.", "",
        ]
    lines += goal_lines(h, a)
    return lines


def goal_lines(h: dict[str, Any] | None, a: dict[str, Any] | None) -> list[str]:
    """The card's goals table: each goal of arcstream-tiny, what was measured, met or not (never hidden)."""
    cu = (h or {}).get("context_use")
    rows = []
    if cu:
        gain = cu.get("context_gain")
        rows.append(("answer-cell loss with its own examples at least 30% below another task's",
                     "—" if gain is None else f"{100 * gain:.1f}% below", gain is not None and gain >= GOAL_CONTEXT_GAIN))
        own = cu["model"]["own"].get("same_shape_accuracy")
        copy = cu["baselines"]["copy_test_input"].get("same_shape_accuracy")
        if own is not None and copy is not None:
            rows.append(("per-cell accuracy above copy-the-test-input on same-shape outputs",
                         f"{own:.3f} vs {copy:.3f}", own > copy))
    if a and a.get("total"):
        right = a["shape_right"] / a["total"]
        rows.append(("the right output shape on at least half the test outputs (first attempt)",
                     f"{a['shape_right']}/{a['total']} = {100 * right:.0f}%", right >= 0.5))
        rows.append(("exact-match pass@2, reported whatever it is", f"{a['correct']:.0f}/{a['total']}", None))
    if not rows:
        return []
    mark = {True: "met", False: "**not met**", None: "—"}
    return ["## Goals", "", "| goal | measured | |", "|---|---|---|",
            *[f"| {g} | {m} | {mark[ok]} |" for g, m, ok in rows], ""]


def reevaluate_card(config: TrainLMOptions | ml_collections.ConfigDict, export_dir: Path, *, note: str = "",
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run `final_evaluation` on an existing export and replace its card's evaluation sections (from
    "## Evaluation (held-out)" up to "## Use") with the new figures; the rest of the card is kept. For a card
    whose figures were computed wrongly (the shipped arcstream-tiny's were, on prompts without line breaks)."""
    export_dir = Path(export_dir)
    config = TrainLMOptions.from_config(config)
    held, accuracy = final_evaluation(config, export_dir, log=log)
    card = (export_dir / "README.md").read_text(encoding="utf-8")
    head, rest = card.split("## Evaluation (held-out)", 1)
    tail = "## Use" + rest.split("## Use", 1)[1]
    lines = evaluation_lines(config, held, accuracy)
    if note:
        lines[1:1] = ["", note]
    (export_dir / "README.md").write_text(head + "\n".join(lines) + "\n" + tail, encoding="utf-8")
    return {"held_out": held, "accuracy": accuracy}
