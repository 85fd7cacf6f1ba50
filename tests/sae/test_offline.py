"""The offline trainer: batches mix the store, a killed-and-restarted run equals an uninterrupted one."""

import json

import numpy as np
import pytest
from ml_collections import config_dict

from arcstream.sae import InMemorySource, batch_dataset, parse_sweep
from configs.train_sae import get_config


def _source(n=2048, seed=0):
    r = np.random.default_rng(seed)
    # two sites, rows aligned; row i encodes its own index in column 0 (to check mixing)
    a = r.standard_normal((n, 16)).astype(np.float32)
    a[:, 0] = np.arange(n)
    b = r.standard_normal((n, 8)).astype(np.float32)
    b[:, 0] = np.arange(n)
    return InMemorySource({"blocks.0.hook_resid_post": a, "blocks.1.hook_mlp_out": b})


def test_batches_mix_chunks_from_across_the_store_and_align_sites():
    src = _source()
    ds = batch_dataset(src, list(src.sites), 256, chunk_rows=16, seed=1)
    batch = ds[0]
    rows_a = batch["blocks.0.hook_resid_post"][:, 0]
    np.testing.assert_array_equal(rows_a, batch["blocks.1.hook_mlp_out"][:, 0])  # same tokens
    chunks = set((rows_a // 16).astype(int))
    assert len(chunks) == 16  # 256 / 16 distinct chunks...
    assert max(chunks) - min(chunks) > 32  # ...from all over the store, not consecutive
    assert not np.all(np.diff(rows_a) == 1)  # rows permuted within the batch
    with pytest.raises(ValueError, match="multiple of chunk_rows"):
        batch_dataset(src, list(src.sites), 100, chunk_rows=16)


def _config(run_dir, **over):
    c = get_config()
    c.run_dir = str(run_dir)
    c.sae.architecture = "topk"
    c.sae.expansion_factor = 2
    c.sae.k = 4
    c.sae.batch_size = 128
    c.sae.chunk_rows = 16
    c.sae.train_tokens = 128 * 8
    c.sae.warmup_steps = 2
    c.sae.dead_steps = 2
    c.sae.sweep = "k=2,4"
    c.checkpoint_every = 3
    c.log_every = 1
    for k, v in over.items():
        c[k] = v
    return c


@pytest.mark.slow
@pytest.mark.parametrize("stop", [6, 5])  # right after the step-6 checkpoint; between checkpoints (5, every 3)
def test_killed_and_restarted_run_equals_uninterrupted(tmp_path, stop):
    """stop_after_steps saves where it stops, whatever checkpoint_every is (it once saved only on multiples:
    a stop at 5 left the step-3 checkpoint while it said "checkpoint saved")."""
    src = _source()
    full = _config(tmp_path / "full")
    from arcstream.sae import train_offline

    ref = train_offline(full, src, log=lambda s: None)
    part = _config(tmp_path / "part", stop_after_steps=stop)
    stopped = train_offline(part, src, log=lambda s: None)
    assert stopped == {"stopped_at": stop, "total_steps": 8}
    resumed = train_offline(_config(tmp_path / "part"), src, log=lambda s: None)
    assert resumed["resumed_from"] == stop
    for site in src.sites:
        for member in ("m0_k2", "m1_k4"):
            a = (tmp_path / "full/saes" / site / member / "sae_weights.safetensors").read_bytes()
            b = (tmp_path / "part/saes" / site / member / "sae_weights.safetensors").read_bytes()
            assert a == b, (site, member)
    lines = [json.loads(x) for x in (tmp_path / "part/saes/metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in lines}) == list(range(1, 9))
    assert len(lines) == 8 * 2 * 2  # steps x sites x members, none duplicated by the resume


def test_sweep_parsing_errors():
    assert parse_sweep("k=16,32;lr=1e-4,3e-4") == {"k": [16, 32], "lr": [1e-4, 3e-4]}
    with pytest.raises(ValueError, match="d_sae"):
        parse_sweep("d_sae=1,2")
    with pytest.raises(ValueError, match="differ in length"):
        parse_sweep("k=1,2;lr=1e-3")
    assert isinstance(get_config(), config_dict.ConfigDict)


def test_a_resume_under_another_configuration_is_refused_naming_the_keys(tmp_path):
    """The checkpoints record what the SAEs were trained with: a rerun that changes it (a learning rate, the
    sites) is refused with the differing keys before any step; one that changes only how often it saves
    resumes."""
    from arcstream.options import ConfigError
    from arcstream.sae import train_offline

    src = _source()
    run = tmp_path / "run"
    assert train_offline(_config(run, stop_after_steps=3), src, log=lambda s: None)["stopped_at"] == 3
    c = _config(run)
    c.sae.lr = 1e-3
    with pytest.raises(ConfigError, match=r"(?s)another configuration.*sites\.blocks\.0\.hook_resid_post\.m0_k2\.lr: "
                                          r"stored=0\.0003, requested=0\.001"):
        train_offline(c, src, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"sites\.blocks\.1\.hook_mlp_out\.m0_k2\.lr: stored=0\.0003, requested=<absent>"):
        train_offline(_config(run, sites="blocks.0.hook_resid_post"), src, log=lambda s: None)
    assert train_offline(_config(run, checkpoint_every=2), src, log=lambda s: None)["resumed_from"] == 3


def test_train_sae_starts_without_torch_or_transformers():
    """What train_sae's job imports (the trainer, the store reader, the cache) pulls in neither torch
    nor transformers: arcstream.data's names load on first use (they cost ~1.9 s of start-up on a
    2-core CPU)."""
    import subprocess
    import sys

    code = ("import sys\nfrom arcstream.train_sae import job, check\n"
            "from arcstream.sae import train_offline\nfrom arcstream.sae.offline import use_compilation_cache\n"
            "from arcstream.store import open_run\nimport arcstream.data.skipped\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # the lazy names still resolve, from the module that defines them
    import arcstream.data as data
    from arcstream.data.prompts import build_prompt
    assert data.build_prompt is build_prompt and "build_prompt" in dir(data)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope  # noqa: B018


def test_train_sae_on_a_run_leaves_the_run_jobs_sae_checkpoints_alone(tmp_path):
    """A run job's online SAEs checkpoint into run_dir/saes/checkpoints; train_sae on that run's store used
    the same folder and refused to start (found on the default run: 'does not record the configuration it
    was trained with'). Here that folder holds checkpoints of another configuration: train_sae trains
    afresh in its own folder and leaves them as they were."""
    from arcstream.sae import train_offline

    src = _source()
    run = tmp_path / "run"
    theirs = run / "saes" / "checkpoints"
    other = _config(run, checkpoint_dir=str(theirs), stop_after_steps=3)
    other.sae.lr = 1e-3
    assert train_offline(other, src, log=lambda s: None)["stopped_at"] == 3
    before = sorted(p.relative_to(theirs) for p in theirs.rglob("*"))
    result = train_offline(_config(run), src, log=lambda s: None)
    assert result["resumed_from"] == 0 and result["total_steps"] == 8  # a fresh start
    assert (run / "saes" / "train_sae_checkpoints").is_dir()
    assert sorted(p.relative_to(theirs) for p in theirs.rglob("*")) == before
