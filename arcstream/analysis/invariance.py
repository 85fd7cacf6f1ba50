"""Invariance of features across augmentations of the same task.

When a run stores one task (and test pair) under several augmentations, every
cell token of every view can be mapped back to the original task: the
augmentation record says how (original train pair = `train_order[pair_index]`,
original cell = the inverse transform of the view cell; colours do not move
cells). For each feature and each two views of a task we compare the cells it
fires on, as Jaccard overlaps in two frames:

  - original frame: cells keyed by (grid kind, original pair, original row, original col).
    High overlap = the feature fires on the same original cells whatever the view: **invariant**.
  - view frame: cells keyed by (grid kind, original pair, row, col as the view shows them).
    High overlap there but not in the original frame = the firing stays put in
    the picture while the cells move under it (e.g. "first row"): it moves with
    the transform, **equivariant**.
  - neither above `threshold`: **view-dependent** (e.g. a colour feature under
    a colour permutation fires on other cells in each view).

A feature is only judged on view pairs where it fires in at least one of the
two; with no such pair it is "untested". When two views differ only by colour
permutation both frames coincide and the tie counts as invariant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from arcstream.data import Augmentation

CLASSES = ("invariant", "equivariant", "view-dependent", "untested")
_SIDE = 32  # keys pack (kind, pair, row, col) with row, col < 32 and pair < 128


def _original_coords(transform: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """For a view grid of shape (h, w) made with `transform`: original (row, col) of each view cell, [h, w] each.

    Found by moving a grid of cell indices with the inverse transform (through the public `apply_grid`,
    one base-10 digit at a time, since grids hold colours 0-9), so no coordinate formula can drift from
    the augmentation code.
    """
    inverse = Augmentation(Augmentation(transform).inverse().transform)
    index = np.arange(h * w).reshape(h, w)
    moved = sum(inverse.apply_grid((index // 10 ** k) % 10).astype(np.int64) * 10 ** k for k in range(3))
    rows = np.empty(h * w, np.int64)
    cols = np.empty(h * w, np.int64)
    r0, c0 = np.indices(moved.shape)
    rows[moved.ravel()] = r0.ravel()
    cols[moved.ravel()] = c0.ravel()
    return rows.reshape(h, w), cols.reshape(h, w)


def cell_keys(tokens: Mapping[str, np.ndarray],
              augmentation: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """int64 keys (original frame, view frame) for each row of one prompt's tokens; -1 on non-cell tokens.

    Grid shapes come from the tokens themselves (the largest row and column seen per grid), so the prompt's
    cell tokens must all be present (true when the store keeps every token of a digits tokenizer).
    """
    aug = Augmentation.from_json(augmentation) if augmentation else Augmentation.identity()
    kind = tokens["grid_kind"].astype(np.int64)
    pair = tokens["pair_index"].astype(np.int64)
    row = tokens["row"].astype(np.int64)
    col = tokens["col"].astype(np.int64)
    cell = (kind > 0) & (row >= 0) & (col >= 0)
    orig_pair = pair.copy()
    if aug.train_order is not None:
        train = cell & (kind <= 2) & (pair >= 0) & (pair < len(aug.train_order))
        orig_pair[train] = np.asarray(aug.train_order)[pair[train]]
    orig_row, orig_col = row.copy(), col.copy()
    if aug.transform != "identity":
        for k, p in set(zip(kind[cell].tolist(), pair[cell].tolist())):
            sel = cell & (kind == k) & (pair == p)
            h, w = int(row[sel].max()) + 1, int(col[sel].max()) + 1
            rows_hw, cols_hw = _original_coords(aug.transform, h, w)
            orig_row[sel], orig_col[sel] = rows_hw[row[sel], col[sel]], cols_hw[row[sel], col[sel]]

    def pack(r, c):
        return np.where(cell, ((kind * 128 + orig_pair) * _SIDE + r) * _SIDE + c, -1)

    return pack(orig_row, orig_col), pack(row, col)


@dataclasses.dataclass
class InvarianceAccumulator:
    """Sums of per-view-pair Jaccard overlaps per feature, in both frames; `add_group` per task."""

    d_sae: int
    threshold: float = 0.5

    def __post_init__(self) -> None:
        self.j_orig_s = np.zeros(self.d_sae, np.float64)
        self.j_view_s = np.zeros(self.d_sae, np.float64)
        self.pairs_s = np.zeros(self.d_sae, np.int64)
        self.groups = 0

    def add_group(self, views: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """`views`: per augmented prompt of one task, (orig_keys [n], view_keys [n], fires [n, d_sae] bool)."""
        if len(views) < 2:
            return
        self.groups += 1
        space = np.int64(1 << 40)

        def codes(keys, fires):
            r, s = np.nonzero(fires & (keys >= 0)[:, None])
            return np.unique(s.astype(np.int64) * space + keys[r])

        sets = [(codes(o, f), codes(v, f)) for o, v, f in views]
        for i in range(len(views)):
            for j in range(i + 1, len(views)):
                for frame, acc in ((0, self.j_orig_s), (1, self.j_view_s)):
                    a, b = sets[i][frame], sets[j][frame]
                    inter = np.bincount(np.intersect1d(a, b, assume_unique=True) // space, minlength=self.d_sae)  # codes() is unique
                    union = (np.bincount(a // space, minlength=self.d_sae) +
                             np.bincount(b // space, minlength=self.d_sae) - inter)
                    acc += np.where(union > 0, inter / np.maximum(union, 1), 0.0)
                    if frame == 0:
                        self.pairs_s += union > 0

    def result(self) -> list[dict[str, Any]]:
        """Per feature: class, mean Jaccard in each frame, and how many view pairs it was judged on."""
        out = []
        for s in range(self.d_sae):
            n = int(self.pairs_s[s])
            if n == 0:
                out.append({"class": "untested", "jaccard_original": None, "jaccard_view": None, "view_pairs": 0})
                continue
            jo, jv = self.j_orig_s[s] / n, self.j_view_s[s] / n
            cls = "view-dependent" if max(jo, jv) < self.threshold else ("invariant" if jo >= jv else "equivariant")
            out.append({"class": cls, "jaccard_original": float(jo), "jaccard_view": float(jv), "view_pairs": n})
        return out
