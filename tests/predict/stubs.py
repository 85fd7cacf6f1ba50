"""Stub generators for the predictions tests: they stand in for a model behind the `Generator` interface."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from arcstream.data.augment import Augmentation
from arcstream.data.encoders import get_encoder
from arcstream.data.records import GRID_TEST_OUTPUT, EncodedPrompt
from arcstream.data.task import Task
from arcstream.predict import Generation


def _truth_in_frame(tasks: Mapping[str, Task], p: EncodedPrompt) -> np.ndarray:
    """The true answer of prompt `p`, in the prompt's augmented frame."""
    truth = tasks[p.task_id].test[p.test_index].output
    return Augmentation.from_json(p.augmentation).apply_grid(truth)


def _answer_grid(p: EncodedPrompt) -> np.ndarray:
    """The answer grid a scoring prompt holds, read back from its per-token cell alignment (one token per cell)."""
    sel = p.grid_kind == GRID_TEST_OUTPUT
    h, w = int(p.row[sel].max()) + 1, int(p.col[sel].max()) + 1
    g = np.full((h, w), -1, np.int8)
    g[p.row[sel], p.col[sel]] = p.colour[sel]
    return g


class OracleGenerator:
    """Emits the true answer encoded with the prompt's encoder, in the augmented frame."""

    def __init__(self, tasks: Mapping[str, Task]):
        self.tasks = tasks
        self.generated = 0
        self.scored = 0
        self.score_calls = 0

    def generate(self, prompts: Sequence[EncodedPrompt], shapes=None) -> list[Generation]:  # shapes: ignored
        self.generated += len(prompts)
        out = []
        for p in prompts:
            text = get_encoder(p.metadata["encoder"]).encode(_truth_in_frame(self.tasks, p))
            out.append(Generation(text, True, -1.0, len(text) + 1))
        return out

    def score(self, prompts: Sequence[EncodedPrompt]) -> list[float]:
        self.scored += len(prompts)
        self.score_calls += 1
        return [0.0 if np.array_equal(_answer_grid(p), _truth_in_frame(self.tasks, p)) else -50.0 for p in prompts]


# Garbage kinds, each with the failure reason the job must count for it.
GARBAGE = (("hello", "bad_character"), ("", "empty_row"), ("12\n123", "ragged"), ("1" * 31, "too_large"),
           ("0", "no_stop"))


class GarbageGenerator:
    """Emits malformed answers, cycling through `GARBAGE`; remembers the reason it meant for each prompt."""

    def __init__(self) -> None:
        self.intended: list[str] = []

    def generate(self, prompts: Sequence[EncodedPrompt], shapes=None) -> list[Generation]:  # shapes: ignored
        out = []
        for _ in prompts:
            text, reason = GARBAGE[len(self.intended) % len(GARBAGE)]
            self.intended.append(reason)
            out.append(Generation(text, reason != "no_stop", -2.0, 7))
        return out

    def score(self, prompts: Sequence[EncodedPrompt]) -> list[float]:
        raise AssertionError("nothing decodes, so nothing should be re-scored")


class NoisyGenerator(OracleGenerator):
    """Right under some prompts, a wrong grid (with a prompt-dependent log-prob) under others.

    Deterministic in the prompt's tokens, so two runs agree; used to make the votes non-trivial.
    """

    def __init__(self, tasks: Mapping[str, Task], fail_after: int | None = None):
        super().__init__(tasks)
        self.fail_after = fail_after

    def generate(self, prompts: Sequence[EncodedPrompt], shapes=None) -> list[Generation]:  # shapes: ignored
        if self.fail_after is not None and self.generated + len(prompts) > self.fail_after:
            raise RuntimeError("simulated crash")
        self.generated += len(prompts)
        out = []
        for p in prompts:
            h = int(np.asarray(p.token_ids, np.int64).sum() % 7)
            g = _truth_in_frame(self.tasks, p)
            if h < 3:
                g = np.full((1 + h, 2), h, np.int8)
            text = get_encoder(p.metadata["encoder"]).encode(g)
            out.append(Generation(text, True, -float(h) / 3, len(text) + 1))
        return out


class MajorityWrongGenerator(OracleGenerator):
    """Right under the first of every 4 prompts, the grid [[0]] under the other 3: voting ranks the wrong grid
    first; the oracle's likelihoods (0 for the truth, -50 for anything else) rank the truth first."""

    def generate(self, prompts: Sequence[EncodedPrompt], shapes=None) -> list[Generation]:  # shapes: ignored
        gens = super().generate(prompts)
        return [g if i % 4 == 0 else Generation("0", True, -1.0, 2) for i, g in enumerate(gens)]
