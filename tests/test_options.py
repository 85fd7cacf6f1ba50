"""arcstream.options: config sections into frozen options, with the wrong key or value named."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from arcstream.options import Section, as_dict, from_section, section_of


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    on: bool = True
    inner: Inner = Inner()
    data: Section = dataclasses.field(default_factory=lambda: ml_collections.FrozenConfigDict({"seq_len": 8}))


def test_a_section_becomes_frozen_options_with_defaults_for_missing_keys():
    c = section_of(Outer)
    c.inner.rate = 2  # an int where a float is wanted is a float
    c.data.seq_len = 16
    with c.unlocked():
        del c.name
    o = from_section(Outer, c, "--config")
    assert o == Outer(name="x", on=True, inner=Inner(width=4, rate=2.0),
                      data=ml_collections.FrozenConfigDict({"seq_len": 16}))
    assert isinstance(o.inner.rate, float) and isinstance(o.data, ml_collections.FrozenConfigDict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.name = "y"
    with pytest.raises((AttributeError, TypeError, ValueError)):
        o.data.seq_len = 3  # the free-form section is frozen too
    assert as_dict(o) == {"name": "x", "on": True, "inner": {"width": 4, "rate": 2.0}, "data": {"seq_len": 16}}


def test_field_references_are_resolved():
    c = section_of(Outer)
    with c.unlocked():
        c.seed = 3
    c.inner.width = c.get_ref("seed")
    with c.unlocked():
        del c.seed
    assert from_section(Outer, c, "--config").inner.width == 3


@pytest.mark.parametrize("key, value, message", [
    ("inner.width", "4", r"--config\.inner\.width='4' is not an int"),
    ("inner.width", 2.5, r"--config\.inner\.width=2\.5 is not an int"),
    ("on", 1, r"--config\.on=1 is not a bool"),
    ("name", 3, r"--config\.name=3 is not a str"),
    ("inner.rate", True, r"--config\.inner\.rate=True is not a float"),
])
def test_a_mistyped_value_is_named(key, value, message):
    given = as_dict(Outer())
    section, _, leaf = key.rpartition(".")
    (given[section] if section else given)[leaf] = value
    with pytest.raises(ValueError, match=message):
        from_section(Outer, given, "--config")


def test_an_unknown_key_is_named_with_the_keys_there_are():
    given = as_dict(Outer())
    given["inner"]["widht"] = 3
    with pytest.raises(ValueError, match=r"--config\.inner\.widht is not a key of this section .*\['rate', 'width'\]"):
        from_section(Outer, given, "--config")
    assert from_section(Inner, {"widht": 3}, "--x", ignore=("widht",)) == Inner()


def test_every_train_lm_variant_is_checked_and_a_bad_key_is_refused():
    from arcstream.lm.options import TrainLMOptions
    from configs.train_lm import get_config

    for variant in (None, "smoke", "synth", "copy", "copyphase", "readphase"):
        c = get_config(variant)
        opts = TrainLMOptions.from_config(c)
        assert opts.train.steps == c.train.steps and opts.data.seq_len == c.data.seq_len
        assert opts.model.hidden_size == c.model.hidden_size and opts.eval.source == c.eval.source
    c = get_config("smoke")
    c.seed = 7
    assert TrainLMOptions.from_config(c).data.seed == 7  # data.seed follows the top-level seed
    c.train.warmup_steps = c.train.steps
    with pytest.raises(ValueError, match=r"--config\.train\.steps=6 and --config\.train\.warmup_steps=6"):
        TrainLMOptions.from_config(c)
    c = get_config("smoke")
    with c.unlocked():
        c.eval.prompt = 3
    with pytest.raises(ValueError, match=r"--config\.eval\.prompt is not a key"):
        TrainLMOptions.from_config(c)


@pytest.mark.parametrize("module, options, key, value, message", [
    ("configs.default", "arcstream.stream.options:RunOptions", "store.token_fraction", "half",
     r"--config\.store\.token_fraction='half' is not a float"),
    ("configs.default", "arcstream.stream.options:RunOptions", "sae.train_tokens", 5,
     r"--config\.sae\.train_tokens is not an SAE key of the online job"),
    ("configs.default", "arcstream.stream.options:RunOptions", "ring.n_slots", 1, r"--config\.ring\.n_slots=1"),
    ("configs.default", "arcstream.stream.options:RunOptions", "store.tokns", "all",
     r"--config\.store\.tokns is not a key of this section"),
    ("configs.predict", "arcstream.predict.job:PredictJobOptions", "predict.batch_size", 2.5,
     r"--config\.predict\.batch_size=2\.5 is not an int"),
    ("configs.predict", "arcstream.predict.job:PredictJobOptions", "predict.selection", "best",
     r"predict\.selection is 'best'"),
    ("configs.train_sae", "arcstream.sae.options:TrainSAEOptions", "sae.passes", 2,
     r"--config\.sae\.passes is not an SAE key of the train_sae job"),
    ("configs.train_sae", "arcstream.sae.options:TrainSAEOptions", "log_every", "10",
     r"--config\.log_every='10' is not an int"),
])
def test_each_job_refuses_a_bad_key_or_value_naming_the_flag(module, options, key, value, message):
    """A config given as a mapping (ConfigDict itself refuses a mistyped override; a dict does not)."""
    import importlib
    import json

    cfg = importlib.import_module(module).get_config()
    if module == "configs.train_sae":
        cfg.run_dir = "/tmp/some-run"
    mod, name = options.split(":")
    cls = getattr(importlib.import_module(mod), name)
    cls.from_config(cfg)  # the shipped config itself is valid
    given = json.loads(cfg.to_json_best_effort())
    *path, leaf = key.split(".")
    section = given
    for p in path:
        section = section[p]
    section[leaf] = value
    with pytest.raises(ValueError, match=message):
        cls.from_config(given)


def test_the_default_run_config_is_the_run_options_defaults():
    from arcstream.stream.options import RunOptions
    from configs.default import get_config

    # The config file adds only field references (data.max_prompts, data.seed -> the top-level keys).
    given = RunOptions.from_config(get_config())
    assert dataclasses.replace(given, data=RunOptions().data) == RunOptions()
    assert given.data.max_prompts == given.max_prompts == 64 and given.resolved["data"]["max_prompts"] == 64


@pytest.mark.parametrize("job, args, message", [
    ("run", ["--config=configs/default.py", "--config.store.token_fraction=2.0"],
     "--config.store.token_fraction=2.0: expected a fraction in (0, 1]"),
    ("train_sae", ["--config=configs/train_sae.py", "--config.run_dir=RUN", "--config.checkpoint_every=-1"],
     "--config.checkpoint_every (-1) and --config.stop_after_steps (0) must be >= 0"),
])
def test_an_entry_point_refuses_a_config_in_one_line_without_a_traceback(job, args, message, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from arcstream.cli import EXIT_CONFIG

    repo = Path(__file__).resolve().parents[1]
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    if job == "run":
        args.append(f"--config.output_dir={tmp_path / 'out'}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", f"arcstream.{job}", *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == EXIT_CONFIG, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"error: {message}", p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()  # refused before the run lock


def test_a_checkpoint_resumes_only_under_its_own_fingerprint():
    """io.resume_refusal, which train_lm and train_sae raise as their config error: equal fingerprints resume,
    a checkpoint without one (an older arcstream) or with another names the way out and each differing key."""
    from arcstream.io import resume_refusal

    fp = {"train": {"lr": 3e-4, "steps": 10}, "sites": ["a"]}
    assert resume_refusal("ckpt", 5, {"fingerprint": fp, "counters": {}}, fp, "use another dir") is None
    for saved in (None, {"counters": {}}):
        msg = resume_refusal("ckpt", 5, saved, fp, "use another dir")
        assert msg.startswith("ckpt (step 5) does not record the configuration") and "use another dir" in msg
    msg = resume_refusal("ckpt", 5, {"fingerprint": {**fp, "train": {"lr": 1e-3, "steps": 10}}}, fp, "use another dir")
    assert "another configuration" in msg and "use another dir to start afresh" in msg
    assert msg.splitlines()[1:] == ["  train.lr: stored=0.001, requested=0.0003"]
