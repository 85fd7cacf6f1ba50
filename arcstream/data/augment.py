"""Invertible augmentations of ARC tasks: rigid transforms, colour permutations, train-pair order.

An `Augmentation` is a small frozen record (JSON-serialisable with `to_json`)
made of three independent parts:

  - `transform`: one of the 8 rigid symmetries of the square (the dihedral
    group D8), named in `TRANSFORMS`;
  - `colours`: a permutation of the 10 colours, `new = colours[old]`;
  - `train_order`: a permutation of the task's train pairs (augmented
    `train[i]` is original `train[train_order[i]]`), or `None` to keep them.

Why these three: an ARC rule is (almost always) invariant under them, so they
multiply the prompts per task without changing what is asked, and each is
exactly invertible, so a grid the model predicts in the augmented frame maps
back to the original frame with `invert_grid`.

Invariants:
  - `invert_grid(apply_grid(g)) == g` for every grid and every augmentation;
  - the colour map is applied to cell values, the transform to positions; they
    commute, so the order does not matter;
  - test pairs keep their order (a prompt names its test pair by index);
  - `Augmentation.from_json(a.to_json()) == a`.

`sample_augmentations` draws distinct augmentations deterministically from a
seed, identity first by default, from the families an `AugmentConfig` turns on.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arcstream.data.task import NUM_COLOURS, Pair, Task

# The 8 elements of D8 as (name, function on a [h, w] array), written as
# strided views (no copy; np.rot90 costs several times more on ARC-sized grids).
# Rotations are counter-clockwise quarter turns, as np.rot90(g, k) (the tests
# check them against it). The identity is first: index 0 of the sampler's
# enumeration is the identity augmentation.
_TRANSFORM_FNS = {
    "identity": lambda g: g,
    "rot90": lambda g: g.T[::-1],
    "rot180": lambda g: g[::-1, ::-1],
    "rot270": lambda g: g.T[:, ::-1],
    "flip_lr": lambda g: g[:, ::-1],  # mirror left-right (reverse each row)
    "flip_ud": lambda g: g[::-1, :],  # mirror up-down (reverse the row order)
    "transpose": lambda g: g.T,  # mirror in the main diagonal
    "antitranspose": lambda g: g[::-1, ::-1].T,  # mirror in the anti-diagonal
}
TRANSFORMS: tuple[str, ...] = tuple(_TRANSFORM_FNS)


def _inverse_table() -> dict[str, str]:
    """Finds each transform's inverse by brute force on a grid whose cells are all distinct.

    Computed rather than written down so that a wrong entry in `_TRANSFORM_FNS`
    cannot be silently paired with a wrong inverse.
    """
    probe_hw = np.arange(6).reshape(2, 3)
    table = {}
    for name, fn in _TRANSFORM_FNS.items():
        moved = fn(probe_hw)
        inverses = [other for other, g in _TRANSFORM_FNS.items() if np.array_equal(g(moved), probe_hw)
                    and g(moved).shape == probe_hw.shape]
        assert len(inverses) == 1, (name, inverses)
        table[name] = inverses[0]
    return table


_INVERSE = _inverse_table()
_IDENTITY_COLOURS = tuple(range(NUM_COLOURS))


class _LutCache(dict):
    """colour permutation (tuple) -> int8 lookup array, built once per permutation."""

    def __missing__(self, colours: tuple[int, ...]) -> np.ndarray:
        lut = np.asarray(colours, dtype=np.int8)
        lut.setflags(write=False)
        if len(self) < 4096:  # bounded: a long run samples many permutations
            self[colours] = lut
        return lut


_COLOUR_LUT = _LutCache()


def _check_permutation(values: Any, size: int, field: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"Augmentation.{field} must be a list of ints, got {type(values).__name__} {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"Augmentation.{field} must hold ints, got {v!r} in {list(values)!r}")
        out.append(int(v))
    if sorted(out) != list(range(size)):
        raise ValueError(
            f"Augmentation.{field} must be a permutation of 0..{size - 1}, got {out!r}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One invertible augmentation; see the module docstring for the conventions.

    `colours[old] = new`. `train_order[i]` = the original index of augmented
    train pair i; `None` keeps the original order whatever the task.
    """

    transform: str = "identity"
    colours: tuple[int, ...] = _IDENTITY_COLOURS
    train_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.transform not in _TRANSFORM_FNS:
            raise ValueError(f"Augmentation.transform is {self.transform!r}; expected one of {TRANSFORMS}")
        object.__setattr__(self, "colours", _check_permutation(self.colours, NUM_COLOURS, "colours"))
        if self.train_order is not None:
            order = _check_permutation(self.train_order, len(self.train_order), "train_order")
            object.__setattr__(self, "train_order", order)

    # --- construction and serialisation -------------------------------------------
    @classmethod
    def identity(cls) -> "Augmentation":
        return cls()

    @property
    def is_identity(self) -> bool:
        order_id = self.train_order is None or self.train_order == tuple(range(len(self.train_order)))
        return self.transform == "identity" and self.colours == _IDENTITY_COLOURS and order_id

    def to_json(self) -> dict[str, Any]:
        """`{"transform": str, "colours": [10 ints], "train_order": [ints] | null}`."""
        return {
            "transform": self.transform,
            "colours": list(self.colours),
            "train_order": None if self.train_order is None else list(self.train_order),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Augmentation":
        """Inverse of `to_json`; raises ValueError naming the bad field."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"an augmentation record must be a JSON object, got {type(obj).__name__} {obj!r}")
        unknown = set(obj) - {"transform", "colours", "train_order"}
        if unknown:
            raise ValueError(f"augmentation record has unknown fields {sorted(unknown)}; "
                             "expected transform, colours, train_order")
        return cls(
            transform=obj.get("transform", "identity"),
            colours=obj.get("colours", _IDENTITY_COLOURS),
            train_order=obj.get("train_order"),
        )

    def inverse(self) -> "Augmentation":
        """The augmentation that undoes this one (on grids and on train order)."""
        inv_colours = tuple(int(i) for i in np.argsort(np.asarray(self.colours)))
        inv_order = None if self.train_order is None else tuple(int(i) for i in np.argsort(self.train_order))
        return Augmentation(_INVERSE[self.transform], inv_colours, inv_order)

    # --- grids -------------------------------------------------------------------
    def apply_grid(self, grid: np.ndarray) -> np.ndarray:
        """The grid as the augmented task shows it: cells moved by `transform`, recoloured by `colours`.

        Returns a new C-contiguous int8 array.
        """
        # Fancy indexing copies but keeps the view's (possibly Fortran) layout: make it C-ordered.
        return np.ascontiguousarray(_COLOUR_LUT[self.colours][_TRANSFORM_FNS[self.transform](np.asarray(grid))])

    def invert_grid(self, grid: np.ndarray) -> np.ndarray:
        """Maps a grid from the augmented frame (e.g. a model's prediction) back to the original frame."""
        inv = self.inverse()
        return np.ascontiguousarray(_COLOUR_LUT[inv.colours][_TRANSFORM_FNS[inv.transform](np.asarray(grid))])

    # --- tasks -------------------------------------------------------------------
    def _order_for(self, task: Task) -> tuple[int, ...]:
        if self.train_order is None:
            return tuple(range(len(task.train)))
        if len(self.train_order) != len(task.train):
            raise ValueError(
                f"task {task.id}: augmentation train_order has {len(self.train_order)} entries but the task has "
                f"{len(task.train)} train pairs; sample the augmentation for this task (or use train_order=None)")
        return self.train_order

    def apply_task(self, task: Task) -> Task:
        """Every grid augmented, train pairs reordered by `train_order`; test pairs keep their order."""

        def pair(p: Pair) -> Pair:
            return Pair(self.apply_grid(p.input), None if p.output is None else self.apply_grid(p.output))

        train = tuple(pair(task.train[i]) for i in self._order_for(task))
        return Task(task.id, train, tuple(pair(p) for p in task.test), task.metadata)

    def invert_task(self, task: Task) -> Task:
        """Undoes `apply_task`: `invert_task(apply_task(t))` equals `t`."""
        return self.inverse().apply_task(task)


# --- sampling ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentation families `sample_augmentations` draws from.

    transforms: the D8 elements allowed (all 8 by default; `("identity",)` turns
      geometry off).
    permute_colours: draw colour permutations.
    keep_background: with `permute_colours`, colour 0 stays 0 (ARC's background
      is nearly always black, and many rules treat it specially).
    permute_train: draw train-pair orders.
    include_identity: the first augmentation returned is the identity (so the
      unaugmented task is always among the prompts); when False the identity
      is never returned.
    """

    transforms: tuple[str, ...] = TRANSFORMS
    permute_colours: bool = True
    keep_background: bool = True
    permute_train: bool = True
    include_identity: bool = True

    def __post_init__(self) -> None:
        bad = [t for t in self.transforms if t not in _TRANSFORM_FNS]
        if bad or not self.transforms or len(set(self.transforms)) != len(self.transforms):
            raise ValueError(f"AugmentConfig.transforms is {self.transforms!r}; expected a non-empty list of "
                             f"distinct names from {TRANSFORMS}")
        # Canonical order (identity first) so the enumeration does not depend on how the list was written.
        object.__setattr__(self, "transforms", tuple(t for t in TRANSFORMS if t in self.transforms))


def _unrank_permutation(rank: int, size: int) -> list[int]:
    """The `rank`-th permutation of range(size) in lexicographic order (rank 0 = identity)."""
    items = list(range(size))
    out = []
    for k in range(size, 0, -1):
        f = math.factorial(k - 1)
        i, rank = divmod(rank, f)
        out.append(items.pop(i))
    return out


class _Space:
    """The augmentations an `AugmentConfig` allows for a task with `num_train` pairs, as ranks 0..size-1.

    A rank is a mixed-radix number (transform, colour permutation, train order);
    rank 0 is the identity when the identity transform is allowed. Sampling ranks
    without replacement gives distinct augmentations with no rejection loop.
    """

    def __init__(self, config: AugmentConfig, num_train: int):
        self.config = config
        self.num_train = num_train
        self.n_colour = (NUM_COLOURS - 1 if config.keep_background else NUM_COLOURS) if config.permute_colours else 0
        self.sizes = (
            len(config.transforms),
            math.factorial(self.n_colour),
            math.factorial(num_train) if config.permute_train else 1,
        )
        self.size = math.prod(self.sizes)

    def unrank(self, rank: int) -> Augmentation:
        rank, order_rank = divmod(rank, self.sizes[2])
        t_rank, colour_rank = divmod(rank, self.sizes[1])
        colours = list(range(NUM_COLOURS))
        if self.n_colour:
            offset = NUM_COLOURS - self.n_colour  # 1 when the background is kept
            colours[offset:] = [c + offset for c in _unrank_permutation(colour_rank, self.n_colour)]
        order = tuple(_unrank_permutation(order_rank, self.num_train)) if self.config.permute_train else None
        return Augmentation(self.config.transforms[t_rank], tuple(colours), order)


def sample_augmentations(
    task_or_num_train: Task | int,
    n: int,
    seed: int,
    config: AugmentConfig = AugmentConfig(),
) -> list[Augmentation]:
    """`n` distinct augmentations, deterministic for (task id or train count, n, seed, config).

    With a `Task`, the random stream is seeded with (seed, CRC32 of the task id),
    so different tasks get different augmentations from one run seed; with an
    int (the number of train pairs), only `seed` is used. The identity comes
    first when `config.include_identity`. When `permute_train` is on, every
    augmentation carries an explicit `train_order` (the identity's is
    `None`), so it applies only to tasks with that many train pairs.

    Raises ValueError if fewer than `n` distinct augmentations exist.
    """
    if isinstance(task_or_num_train, Task):
        num_train = len(task_or_num_train.train)
        seed_seq: list[int] = [seed, zlib.crc32(task_or_num_train.id.encode("utf-8"))]
    elif isinstance(task_or_num_train, (int, np.integer)) and not isinstance(task_or_num_train, bool):
        num_train = int(task_or_num_train)
        seed_seq = [seed]
    else:
        raise TypeError(f"sample_augmentations: task_or_num_train must be a Task or an int, "
                        f"got {type(task_or_num_train).__name__}")
    if num_train < 0 or n < 0 or seed < 0:
        raise ValueError(f"sample_augmentations: num_train ({num_train}), n ({n}) and seed ({seed}) "
                         "must be non-negative")
    if n == 0:
        return []
    space = _Space(config, num_train)
    out: list[Augmentation] = [Augmentation.identity()] if config.include_identity else []
    # Rank 0 is the identity exactly when the identity transform is allowed: it is never drawn (it is
    # either already first, or excluded).
    first_rank = 1 if config.transforms[0] == "identity" else 0
    need = n - len(out)
    available = space.size - first_rank
    if need > available:
        raise ValueError(
            f"sample_augmentations: asked for {n} distinct augmentations but config {config} allows only "
            f"{available + len(out)} for a task with {num_train} train pairs; lower n or enable more families")
    rng = np.random.default_rng(seed_seq)
    if available < 2**62:
        ranks = rng.choice(available, size=need, replace=False) + first_rank
    else:  # too many to index with int64: draw Python ints, rejecting repeats (practically never happens)
        chosen: set[int] = set()
        ranks = []
        while len(ranks) < need:
            r = first_rank + int.from_bytes(rng.bytes(16), "little") % available
            if r not in chosen:
                chosen.add(r)
                ranks.append(r)
    out.extend(space.unrank(int(r)) for r in ranks)
    return out
