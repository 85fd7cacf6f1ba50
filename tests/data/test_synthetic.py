"""synth: tasks: every rule checked against an independent NumPy statement of it, determinism, the
rule visible in the examples, spec errors named."""

import collections
import json

import numpy as np
import pytest

from arcstream.data.sources import open_source
from arcstream.data.synthetic import RULES, generate_task
from arcstream.data.task import Task

N = 450  # 50 tasks per rule on average


@pytest.fixture(scope="module")
def tasks():
    src = open_source(f"synth:all?tasks={N}&seed=3")
    items = list(src)
    assert all(isinstance(t, Task) for t in items), [t for t in items if not isinstance(t, Task)][:3]
    return items


def _pairs(t):
    return [(p.input, p.output) for p in t.train + t.test]


def _gravity_ref(x, direction):
    """Cell-by-cell statement of gravity: each line keeps its non-zero cells in order, packed at one end."""
    out = np.zeros_like(x)
    h, w = x.shape
    if direction in ("down", "up"):
        for c in range(w):
            vals = [x[r, c] for r in range(h) if x[r, c]]
            for i, v in enumerate(vals if direction == "up" else vals[::-1]):
                out[i if direction == "up" else h - 1 - i, c] = v
    else:
        for r in range(h):
            vals = [x[r, c] for c in range(w) if x[r, c]]
            for i, v in enumerate(vals if direction == "left" else vals[::-1]):
                out[r, i if direction == "left" else w - 1 - i] = v
    return out


def _d8_ref(x, k):
    """D8 element k written as index maps (k % 4 counter-clockwise quarter turns, then a left-right flip)."""
    g = x
    for _ in range(k % 4):
        h, w = g.shape
        g = np.array([[g[c, w - 1 - r] for c in range(h)] for r in range(w)], dtype=x.dtype).reshape(w, h)
    if k >= 4:
        g = g[:, ::-1]
    return g


def _recolour_ref(x, mapping):
    return np.vectorize(lambda v: mapping.get(str(int(v)), int(v)))(x).astype(x.dtype) if x.size else x


def _expected(t, x):
    m = t.metadata
    rule = m["rule"]
    if rule == "recolour":
        return _recolour_ref(x, m["mapping"])
    if rule == "symmetry":
        return _d8_ref(x, m["d8"])
    if rule == "symmetry_recolour":
        return _d8_ref(_recolour_ref(x, m["mapping"]), m["d8"])
    if rule == "scale":
        sy, sx = m["scale"]
        return np.array([[x[r // sy, c // sx] for c in range(x.shape[1] * sx)] for r in range(x.shape[0] * sy)])
    if rule == "tile":
        ry, rx = m["tile"]
        h, w = x.shape
        out = np.zeros((h * ry, w * rx), x.dtype)
        for r in range(h * ry):
            for c in range(w * rx):
                i, j = r // h, c // w
                rr, cc = r % h, c % w
                if m["mirror"] and i % 2:
                    rr = h - 1 - rr
                if m["mirror"] and j % 2:
                    cc = w - 1 - cc
                out[r, c] = x[rr, cc]
        return out
    if rule == "gravity":
        return _gravity_ref(x, m["direction"])
    if rule == "crop":
        nz = [(r, c) for r in range(x.shape[0]) for c in range(x.shape[1]) if x[r, c]]
        r0, r1 = min(r for r, _ in nz), max(r for r, _ in nz)
        c0, c1 = min(c for _, c in nz), max(c for _, c in nz)
        return x[r0:r1 + 1, c0:c1 + 1]
    if rule == "fill_background":
        return np.where(x == 0, m["colour"], x)
    if rule == "constant":
        return np.asarray(m["output"], x.dtype)
    raise AssertionError(rule)


def test_every_rule_appears_and_every_output_follows_its_rule(tasks):
    seen = collections.Counter(t.metadata["rule"] for t in tasks)
    assert set(seen) == set(RULES), seen
    for t in tasks:
        assert 3 <= len(t.train) <= 5 and len(t.test) == 1, t.id
        assert t.id.startswith("synth-3-") and t.id.endswith(t.metadata["rule"])
        for x, y in _pairs(t):
            assert max(x.shape + y.shape) <= 30
            np.testing.assert_array_equal(y, _expected(t, x), err_msg=t.id)


def test_the_examples_show_the_rule(tasks):
    """No example is a copy of its input, inputs do not repeat, and every colour a recolouring maps shows
    in every train input (so the examples determine the mapping)."""
    for t in tasks:
        inputs = [p.input.tobytes() + bytes(p.input.shape) for p in t.train + t.test]
        assert len(set(inputs)) == len(inputs), t.id
        for x, y in _pairs(t):
            assert x.shape != y.shape or not np.array_equal(x, y), t.id
        if "mapping" in t.metadata:
            for p in t.train:
                present = set(np.unique(p.input).tolist())
                assert {int(a) for a in t.metadata["mapping"]} <= present, t.id
        if t.metadata["rule"] == "crop":
            for p in t.train + t.test:
                assert p.output.shape != p.input.shape, t.id


def test_rules_differ_between_tasks(tasks):
    """Parameters are drawn per task: the same rule name comes with several parameter settings, so
    another task's examples do not tell this task's rule."""
    params = collections.defaultdict(set)
    for t in tasks:
        params[t.metadata["rule"]].add(json.dumps({k: v for k, v in t.metadata.items() if k != "rule"},
                                                  sort_keys=True))
    for rule, settings in params.items():
        if rule != "crop":  # a crop has no parameter
            assert len(settings) >= 3, (rule, settings)


def test_task_depends_only_on_seed_and_index():
    a = open_source("synth:all?tasks=50&seed=7")
    b = open_source("synth:all?seed=7&tasks=10000")  # length does not change the tasks
    assert a.spec == "synth:all?seed=7&tasks=50"
    for i in (0, 13, 49):
        assert a[i].equals(b[i]) and dict(a[i].metadata) == dict(b[i].metadata)
    assert a[-1].equals(a[49]) and len(a) == 50
    assert not a[0].equals(open_source("synth:all?tasks=50&seed=8")[0])
    assert generate_task(("gravity",), 7, 5).metadata["rule"] == "gravity"


def test_rule_subset_and_spec_errors():
    src = open_source("synth:recolour+gravity?tasks=40")
    assert {t.metadata["rule"] for t in src} == {"recolour", "gravity"}
    with pytest.raises(ValueError, match=r"synth:recolour\+spin.*unknown synthetic rule.*spin"):
        open_source("synth:recolour+spin")
    with pytest.raises(ValueError, match=r"option tasks=0; expected an integer >= 1"):
        open_source("synth:all?tasks=0")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['size'\] for synth sources"):
        open_source("synth:all?size=3")
