"""Writes a small BARC-shaped dataset (jsonl and parquet) with known good and bad rows.

The BARC sets on the hub (e.g. `barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems`)
are JSON lines with three columns: `examples`, a list of `[input_grid, output_grid]`
pairs with no train/test split; `source`, the generator's Python code whose
comments state the concept; `seeds`, the names of the ARC tasks the generator
was seeded with. This helper builds rows of that shape locally (no network),
mixes in one bad row of every kind the validation must name, and returns what
each row should become, so tests (here and in other packages) can check a
source or a transform against it.

Usage from another test:

    from tests.data.barc_fixture import write_barc_dataset
    fx = write_barc_dataset(tmp_path)            # fx.jsonl_path, fx.parquet_path
    good = fx.good_rows("jsonl")                 # {row index: (train, test, source, seeds)}
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

_SOURCE_TEMPLATE = '''from common import *

import numpy as np
from typing import *

# concepts:
# {concept}

# description:
# In the input you will see a small grid of coloured pixels on a black background.
# To make the output, {description}.

def main(input_grid):
    output_grid = np.copy(input_grid)
    {body}
    return output_grid


def generate_input():
    n, m = np.random.randint(1, 13, size=2)
    return random_sprite(n, m, density=0.5, color=Color.NOT_BLACK)
'''

_RULES = (
    ("mirroring", "flip the grid left to right", "output_grid = output_grid[:, ::-1]",
     lambda g: g[:, ::-1]),
    ("rotation", "rotate the grid by 90 degrees clockwise", "output_grid = np.rot90(output_grid, k=-1)",
     lambda g: np.rot90(g, k=-1)),
    ("colour mapping", "swap red and blue", "output_grid = swap_colors(output_grid, Color.RED, Color.BLUE)",
     lambda g: np.where(g == 2, 1, np.where(g == 1, 2, g))),
    ("transposition", "reflect the grid along its main diagonal", "output_grid = output_grid.T",
     lambda g: g.T),
)

_SEEDS = ("007bbfb7", "3c9b0459", "6150a2bd", "67a3c6ac", "74dd1130", "9dfd6313", "a416b8f3", "b1948b0a")

# Bad rows: (name, expected InvalidTask reason, expected `where` fragment in the message, whether a
# parquet file can hold it: parquet has one schema, so string/bool cells or a wrong JSON type cannot be written).
BAD_KINDS = (
    ("ragged_row", "ragged_grid", "train[1].input", True),
    ("colour_11", "bad_colour", "train[0].output", True),
    ("empty_grid", "empty_grid", "train[2].input", True),
    ("31_columns", "too_large", "test[0].input", True),
    ("missing_test_input", "missing_test_input", "test[0].input", True),
    ("too_few_examples", "missing_pairs", "examples", True),
    ("string_cells", "bad_colour", "train[0].input", False),
    ("bool_cells", "bad_colour", "train[1].output", False),
    ("examples_not_a_list", "wrong_type", "examples", False),
    ("example_not_a_pair", "wrong_type", "examples[2]", False),
    ("row_not_an_object", "bad_row", "", False),
    ("invalid_json_line", "bad_row", "", False),
)


@dataclasses.dataclass(frozen=True)
class BarcFixture:
    """What was written and what each row should become.

    `rows[fmt]` lists, per row index of that file, either `("good", example_list,
    source, seeds)` or `("bad", kind, reason, where)`.
    """

    root: pathlib.Path
    jsonl_path: pathlib.Path
    parquet_path: pathlib.Path
    rows: dict[str, list[tuple]]

    def good_rows(self, fmt: str) -> dict[int, tuple[list, str, list[str]]]:
        return {i: r[1:] for i, r in enumerate(self.rows[fmt]) if r[0] == "good"}

    def bad_rows(self, fmt: str) -> dict[int, tuple[str, str, str]]:
        return {i: r[1:] for i, r in enumerate(self.rows[fmt]) if r[0] == "bad"}


def _good_row(rng: np.random.Generator) -> dict[str, Any]:
    concept, description, body, fn = _RULES[int(rng.integers(len(_RULES)))]
    examples = []
    for _ in range(int(rng.integers(3, 7))):  # BARC rows usually hold 4 or more examples
        h, w = (int(v) for v in rng.integers(1, 13, size=2))
        grid = np.where(rng.random((h, w)) < 0.5, rng.integers(1, 10, size=(h, w)), 0)
        examples.append([grid.tolist(), fn(grid).tolist()])
    seeds = sorted(rng.choice(_SEEDS, size=int(rng.integers(1, 4)), replace=False).tolist())
    return {"examples": examples, "source": _SOURCE_TEMPLATE.format(concept=concept, description=description,
                                                                   body=body), "seeds": seeds}


def _bad_row(kind: str, rng: np.random.Generator) -> Any:
    row = _good_row(rng)
    while len(row["examples"]) < 4:
        row = _good_row(rng)
    ex = row["examples"]
    if kind == "ragged_row":
        ex[1][0] = [[1, 2, 3], [4, 5]]
    elif kind == "colour_11":
        ex[0][1] = [[0, 11], [3, 4]]
    elif kind == "empty_grid":
        ex[2][0] = []
    elif kind == "31_columns":
        ex[-1][0] = [[1] * 31]
    elif kind == "missing_test_input":
        ex[-1][0] = None
    elif kind == "too_few_examples":
        row["examples"] = ex[:1]
    elif kind == "string_cells":
        ex[0][0] = [["1", "2"], ["3", "4"]]
    elif kind == "bool_cells":
        ex[1][1] = [[True, False]]
    elif kind == "examples_not_a_list":
        row["examples"] = "[[1, 2], [3, 4]]"
    elif kind == "example_not_a_pair":
        ex[2] = {"input": ex[2][0], "output": ex[2][1]}
    elif kind == "row_not_an_object":
        return [row["examples"]]
    elif kind == "invalid_json_line":
        return _INVALID_JSON
    else:
        raise ValueError(f"unknown bad row kind {kind!r}; expected one of {[k[0] for k in BAD_KINDS]}")
    return row


_INVALID_JSON = object()  # marker: write a line that is not JSON


def write_barc_dataset(root: pathlib.Path | str, *, n_good: int = 12, seed: int = 0) -> BarcFixture:
    """Writes `root/barc.jsonl` (every bad kind) and `root/barc.parquet` (the kinds parquet can hold).

    Good rows and bad rows are interleaved (a bad row after every good one
    while bad kinds remain), so a source that loses count of rows gets the ids
    wrong. Deterministic for a seed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good = [_good_row(rng) for _ in range(n_good)]

    def layout(kinds: list[tuple]) -> list[tuple[str, Any, tuple]]:
        out, pending = [], list(kinds)
        for g in good:
            out.append(("good", g, ("good", g["examples"], g["source"], g["seeds"])))
            if pending:
                kind, reason, where, _ = pending.pop(0)
                out.append(("bad", _bad_row(kind, rng), ("bad", kind, reason, where)))
        for kind, reason, where, _ in pending:
            out.append(("bad", _bad_row(kind, rng), ("bad", kind, reason, where)))
        return out

    jsonl_rows = layout(list(BAD_KINDS))
    jsonl_path = root / "barc.jsonl"
    with open(jsonl_path, "w") as f:
        for _, row, _ in jsonl_rows:
            f.write('{"examples": [[[[1, 2]], [[3, 4' if row is _INVALID_JSON else json.dumps(row))
            f.write("\n")

    parquet_rows = layout([k for k in BAD_KINDS if k[3]])
    grid_t = pa.list_(pa.list_(pa.int64()))
    schema = pa.schema([("examples", pa.list_(pa.list_(grid_t))), ("source", pa.string()),
                        ("seeds", pa.list_(pa.string()))])
    table = pa.Table.from_pylist([r for _, r, _ in parquet_rows], schema=schema)
    parquet_path = root / "barc.parquet"
    pq.write_table(table, parquet_path, row_group_size=8)  # several row groups on purpose

    return BarcFixture(root, jsonl_path, parquet_path,
                       {"jsonl": [e for _, _, e in jsonl_rows], "parquet": [e for _, _, e in parquet_rows]})
