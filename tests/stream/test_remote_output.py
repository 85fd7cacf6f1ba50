"""A run whose output_dir is a kvstore URL (memory://, file://) writes what a local run writes.

gs:// itself cannot be reached offline and is not mocked: `memory://` goes
through the same code (RunLocation for small files, TensorStore for arrays),
and the one gs://-specific piece, the Orbax directory, is checked as a path
object without I/O.
- the rows, metrics.jsonl and SAE exports of a memory:// run equal a local run's;
- model="" with a memory:// output_dir builds the random model in a local cache;
- a file:// URL run writes the same files as the local path;
- memory:// with online SAEs and no sae.checkpoint_dir is refused naming the flag.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.stream import test_run as _run

_config = _run._config  # the same config and tiny checkpoint as tests/stream/test_run.py
tiny_ckpt = _run.tiny_ckpt  # a module-scoped fixture

SAE = {"sae.enabled": True, "sae.batch_size": 256, 
       "sae.expansion_factor": 2, "sae.k": 4, "sae.log_every": 1, "sae.warmup_steps": 2,
       "store.sites": "blocks.0.hook_resid_post,blocks.2.hook_resid_post", "max_prompts": 4}


def _url() -> str:
    return f"memory://arcstream-test-{uuid.uuid4().hex[:12]}"


def _assert_same_store(a: str, b: str) -> None:
    from arcstream.store import open_run

    ra, rb = open_run(a), open_run(b)
    assert list(ra.sites) == list(rb.sites) and ra.rows == rb.rows > 0 and ra.step == rb.step
    for s in ra.sites:
        np.testing.assert_array_equal(np.asarray(ra.activations(s)[:]), np.asarray(rb.activations(s)[:]))
    ta, tb = ra.tokens(), rb.tokens()
    assert ta.keys() == tb.keys()
    for f in ta:
        np.testing.assert_array_equal(ta[f], tb[f])
    pa, pb = ra.prompts(), rb.prompts()
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].task_id == pb[k].task_id
        np.testing.assert_array_equal(pa[k].token_ids, pb[k].token_ids)


def _metrics(run_dir: str) -> list[dict]:
    from arcstream.io import RunLocation

    data = RunLocation(run_dir).read_bytes("metrics.jsonl")
    assert data is not None, f"{run_dir}/metrics.jsonl is missing"
    return [json.loads(line) for line in data.decode().splitlines()]


def _assert_same_sae(a: str, b: str) -> None:
    from arcstream.sae import load_sae

    pa, ca, _, ja = load_sae(a)
    pb, cb, _, jb = load_sae(b)
    assert ca == cb and ja == jb
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


@pytest.mark.slow
def test_a_memory_url_run_writes_what_a_local_run_writes(tiny_ckpt, tmp_path):
    from arcstream.stream.loop import run

    local = tmp_path / "local"
    url = _url()
    a = run(_config(tiny_ckpt, local, **SAE))
    b = run(_config(tiny_ckpt, url, **{**SAE, "sae.checkpoint_dir": str(tmp_path / "ckpt")}))
    assert a.sae_steps == b.sae_steps > 0 and a.steps == b.steps
    _assert_same_store(str(local), url)
    # metrics.jsonl: one object in the URL, the same records as the local file (read the same way).
    records = _metrics(url)
    assert records == _metrics(str(local))
    assert records == [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == b.sae_steps * 3  # every SAE step, one record per captured site
    # SAE exports under url/saes/<site>/, loadable from the URL, equal to the local run's.
    assert b.exports == [f"{url}/saes/{s}" for s in _config(tiny_ckpt, url).sites.split(",")]
    for folder in b.exports:
        site = folder.rsplit("/", 1)[1]
        _assert_same_sae(folder, str(local / "saes" / site))
    # The checkpoints went to sae.checkpoint_dir; nothing local was written for the URL run.
    assert any((tmp_path / "ckpt").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "local"]


def test_random_model_of_a_memory_url_run_is_built_in_the_local_cache(tmp_path, monkeypatch):
    from arcstream.io import RunLocation
    from arcstream.stream.loop import _random_model_cache_dir, run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = _url()
    c = _config("", url, **{"random_model.hidden_size": 64, "random_model.num_layers": 3, "max_prompts": 2})
    result = run(c)
    cache = tmp_path / "cache" / "arcstream" / "random_model"
    built = _random_model_cache_dir(c)
    assert built.parent == cache and (built / "config.json").exists() and (built / "tokenizer.json").exists()
    assert result.model == str(built) and "local cache" in result.model_note
    assert result.rows_durable == result.tokens > 0
    assert not RunLocation(url).exists("random_model/config.json")
    # The same settings reuse the folder; a different seed gets its own.
    assert _random_model_cache_dir(_config("", _url(), **{"random_model.hidden_size": 64,
                                                          "random_model.num_layers": 3})) == built
    assert _random_model_cache_dir(_config("", url, seed=1, **{"random_model.hidden_size": 64,
                                                               "random_model.num_layers": 3})) != built


def test_a_file_url_run_writes_the_local_run_directory(tiny_ckpt, tmp_path):
    from arcstream.sae import load_sae
    from arcstream.stream.loop import run

    out = tmp_path / "run"
    result = run(_config(tiny_ckpt, f"file://{out}", **{**SAE, "max_prompts": 2}))
    assert (out / "manifest.json").exists() and (out / "metrics.jsonl").exists()
    assert any((out / "saes" / "checkpoints").iterdir())
    _assert_same_store(str(out), f"file://{out}")
    for folder in result.exports:
        assert folder.startswith(f"file://{out}/saes/")
        load_sae(folder)
        load_sae(out / "saes" / folder.rsplit("/", 1)[1])


def test_memory_url_with_online_saes_needs_a_checkpoint_dir(tiny_ckpt, tmp_path):
    from arcstream.stream.loop import run

    with pytest.raises(ValueError, match=r"--config\.sae\.checkpoint_dir"):
        run(_config(tiny_ckpt, _url(), **SAE))
    with pytest.raises(ValueError, match=r"--config\.sae\.checkpoint_dir='memory://"):
        run(_config(tiny_ckpt, tmp_path / "run", **{**SAE, "sae.checkpoint_dir": _url()}))
    # predict=True (the default run's) writes its files into the URL run directory too.
    from arcstream.io import RunLocation

    url = _url()
    result = run(_config(tiny_ckpt, url, predict=True))
    assert result.predictions is not None and not result.predict_skipped
    loc = RunLocation(url)
    predictions = loc.read_json("predictions/predictions.json")
    assert predictions and loc.read_json("predictions/score.json")["total"] == sum(len(v) for v in predictions.values())
    assert loc.read_bytes("predictions/details.jsonl").count(b"\n") == len(predictions)


def test_checkpoint_dirs_keep_gs_urls_whole_without_touching_gcs():
    """No mock_epath: the gs:// directory is only built as an epath.Path here, never opened."""
    from etils import epath

    from arcstream.io import checkpoint_path

    p = checkpoint_path("gs://bucket/run/saes/checkpoints")
    assert isinstance(p, epath.Path) and str(p) == "gs://bucket/run/saes/checkpoints"
    assert checkpoint_path("file:///abs/ck") == Path("/abs/ck")
    assert checkpoint_path("rel/ck") == Path("rel/ck").absolute()


def test_export_and_metrics_truncation_work_on_a_kvstore_url():
    from arcstream.sae import SAEConfig, TrainConfig, export_sae, init_train_state, load_sae, member_state
    from arcstream.io import truncate_metrics
    from arcstream.io import RunLocation

    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    cfg = SAEConfig("topk", 8, 16, k=2)
    params, buffers = member_state(init_train_state({"s": [cfg]}, TrainConfig(total_steps=1), {"s": x}), "s", 0)
    url = _url()
    assert export_sae(params, cfg, f"{url}/saes/s", hook_name="s", buffers=buffers) == f"{url}/saes/s"
    _, c2, _, cfg_json = load_sae(f"{url}/saes/s")
    assert c2.d_sae == 16 and cfg_json["metadata"]["hook_name"] == "s"
    with pytest.raises(FileNotFoundError, match=r"memory://.*/nothing/cfg\.json is missing"):
        load_sae(f"{url}/nothing")

    loc = RunLocation(url)
    loc.write_bytes_atomic("metrics.jsonl", b"".join(b'{"sae_step": %d}\n' % i for i in range(1, 6)))
    truncate_metrics(f"{url}/metrics.jsonl", 3, key="sae_step")
    assert loc.read_bytes("metrics.jsonl") == b'{"sae_step": 1}\n{"sae_step": 2}\n{"sae_step": 3}\n'


def test_random_model_of_a_local_run_is_built_in_the_run_directory(tmp_path, monkeypatch):
    from arcstream.stream.loop import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run(_config("", tmp_path / "run", **{"random_model.hidden_size": 64, "random_model.num_layers": 3,
                                                   "max_prompts": 2}))
    assert result.model == str(tmp_path / "run" / "random_model") and result.rows_durable > 0
    assert (tmp_path / "run" / "random_model" / "config.json").exists() and not (tmp_path / "cache").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".random_model.tmp")]
