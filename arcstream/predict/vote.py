"""Choosing two attempts from the answers a model gave under several augmentations.

Each augmentation of a (task, test input) yields at most one candidate grid,
already mapped back to the original frame. Two selections:

  - `vote`: the distinct grids ranked by how many augmentations produced them;
    ties broken by the summed log-probability of the generated answers (higher
    first), then by first appearance (the augmentation order, identity first),
    so the ranking is a pure function of the candidates.
  - `rank_by_product` (the ARC Prize 2024 winners' selection): every distinct
    candidate is re-scored under every augmentation, and ranked by the product
    of its likelihoods, i.e. the sum of its log-likelihoods. A candidate's
    score depends only on the model and the prompts, not on which augmentation
    happened to generate it; ties fall back to the vote order.

`attempt_1` / `attempt_2` are the first two grids of the ranking; with fewer
than two distinct grids, the missing attempts are the caller's fallback grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np


def grid_key(grid: np.ndarray) -> tuple[tuple[int, int], bytes]:
    """A hashable identity for a grid: its shape and its int8 cells (equal keys <=> equal grids)."""
    g = np.ascontiguousarray(np.asarray(grid, dtype=np.int8))
    if g.ndim != 2:
        raise ValueError(f"grid_key: expected a 2-D grid, got shape {g.shape}")
    return (int(g.shape[0]), int(g.shape[1])), g.tobytes()


@dataclasses.dataclass(frozen=True, eq=False)
class Answer:
    """One augmentation's decoded answer, in the original frame.

    augmentation: the augmentation's index among the prompts of this test input.
    grid: int8 [h, w], or None when nothing decoded (then `failure` says why).
    logprob: summed log-probability of the generated answer tokens.
    """

    augmentation: int
    grid: np.ndarray | None
    logprob: float = 0.0
    failure: str | None = None  # a stable reason code when grid is None
    detail: str = ""  # the decoder's message, for the detail file


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
    """A distinct grid and the answers that voted for it.

    Invariant: `votes == len(augmentations)`; `logprob_sum` is the sum of those
    answers' log-probabilities; `product_logprob` is set only by
    `rank_by_product` (sum over *all* augmentations of the re-scored
    log-likelihood of this grid).
    """

    grid: np.ndarray
    votes: int
    logprob_sum: float
    augmentations: tuple[int, ...]
    first_seen: int  # position of its first answer in the input order
    product_logprob: float | None = None

    def to_json(self) -> dict:
        return {
            "grid": self.grid.tolist(),
            "votes": self.votes,
            "logprob_sum": _finite_or_none(self.logprob_sum),
            "augmentations": list(self.augmentations),
            "product_logprob": _finite_or_none(self.product_logprob),
        }


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def vote(answers: Sequence[Answer]) -> list[Candidate]:
    """The distinct decoded grids, most votes first (see the module docstring for ties).

    Answers without a grid are ignored here (the caller counts them).
    """
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(answers):
        if a.grid is None:
            continue
        groups.setdefault(grid_key(a.grid), []).append(i)
    cands = [
        Candidate(
            grid=np.asarray(answers[idx[0]].grid, dtype=np.int8),
            votes=len(idx),
            logprob_sum=float(sum(answers[i].logprob for i in idx)),
            augmentations=tuple(answers[i].augmentation for i in idx),
            first_seen=idx[0],
        )
        for idx in groups.values()
    ]
    cands.sort(key=lambda c: (-c.votes, -c.logprob_sum, c.first_seen))
    return cands


def rank_by_product(candidates: Sequence[Candidate], scores: Mapping[int, Sequence[float]]) -> list[Candidate]:
    """Candidates re-ranked by the summed log-likelihood over every augmentation.

    `scores[i]` holds candidate i's log-likelihoods (index in `candidates`),
    one per augmentation, over the same augmentations for every candidate (an
    augmentation whose prompt cannot be built for some candidate is left out
    for all of them, so the sums compare). Ties keep the vote order (the sort
    is stable).
    """
    out = []
    for i, c in enumerate(candidates):
        if i not in scores:
            raise ValueError(f"rank_by_product: no scores for candidate {i} (of {len(candidates)}); "
                             "score every candidate under the augmentations")
        out.append(dataclasses.replace(c, product_logprob=float(sum(scores[i]))))
    order = sorted(range(len(out)), key=lambda i: -out[i].product_logprob)  # stable: vote order on ties
    return [out[i] for i in order]


def attempts(ranked: Sequence[Candidate], fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attempt_1, attempt_2): the top two grids, the fallback where there are fewer."""
    grids = [c.grid for c in ranked[:2]]
    while len(grids) < 2:
        grids.append(np.asarray(fallback, dtype=np.int8))
    return grids[0], grids[1]
