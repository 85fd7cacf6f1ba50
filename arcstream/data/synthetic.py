"""Procedurally generated ARC-style tasks whose rule can only be read from the examples.

Why: ARC-AGI's training sets hold ~630 distinct tasks. A small model trained on
them alone learns local statistics of output grids (which colour follows which)
and ignores the train pairs: measured on arcstream-tiny, its answer loss was the
same with the task's own examples, with none, and with another task's. Every
task here draws one rule with random parameters (which colours map to which,
which of the eight symmetries, which scale, which direction things fall), so
the test output is predictable only by reading the train pairs; the model that
learns them has to learn to look back at the examples.

Source spec: `synth:RULES?tasks=N&seed=S` with RULES `all` or rule names joined
by `+` (`synth:recolour+gravity`). Task `i` is generated from
`numpy.random.default_rng([seed, i])` alone, so the source is random access,
the same on every host and run, and `tasks` only sets its length. Task ids are
`synth-{seed}-{i:06d}-{rule}`; `Task.metadata` holds the rule and its
parameters.

The rules (`RULES`; every grid at most 30 x 30, background colour 0, objects
are random 4-connected blobs in a per-task palette):
  recolour       1-3 colours map to other colours; every other cell is copied
  symmetry       one of the 7 non-identity rotations / reflections (D8)
  symmetry_recolour  both, one after the other
  scale          every cell becomes an sy x sx block (1-3 each, not both 1)
  tile           the grid repeated ry x rx times, each copy optionally mirrored
  gravity        every non-background cell slides to one side (down/up/left/right)
  crop           the output is the bounding box of the one object in the grid
  fill_background  background cells take one colour; objects are copied
  constant       every output is the same grid, whatever the input (copy it from the train outputs)
Each task has 3-5 train pairs and 1 test pair; every train input shows every
colour the rule maps, so the rule is determined by the examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from arcstream.data.task import Task, task_from_pairs

MAX_SIDE = 30


def _blob(rng: np.random.Generator, size: int) -> list[tuple[int, int]]:
    """A random 4-connected set of `size` cells, relative to (0, 0)."""
    cells = {(0, 0)}
    frontier = [(0, 0)]
    while len(cells) < size:
        r, c = frontier[rng.integers(len(frontier))]
        dr, dc = ((1, 0), (-1, 0), (0, 1), (0, -1))[rng.integers(4)]
        n = (r + dr, c + dc)
        if n not in cells:
            cells.add(n)
            frontier.append(n)
    return sorted(cells)


def _scene(rng: np.random.Generator, h: int, w: int, palette: Sequence[int], *, objects: int,
           must_show: Sequence[int] = ()) -> np.ndarray:
    """A background-0 grid with `objects` blobs; every colour of `must_show` appears at least once."""
    g = np.zeros((h, w), np.int8)
    colours = list(must_show) + [int(rng.choice(palette)) for _ in range(max(0, objects - len(must_show)))]
    for colour in colours:
        size = int(rng.integers(1, max(2, min(h * w // 4, 12)) + 1))
        cells = _blob(rng, size)
        rs = [r for r, _ in cells]
        cs = [c for _, c in cells]
        bh, bw = max(rs) - min(rs) + 1, max(cs) - min(cs) + 1
        if bh > h or bw > w:
            cells, bh, bw, rs, cs = [(0, 0)], 1, 1, [0], [0]
        r0 = int(rng.integers(0, h - bh + 1)) - min(rs)
        c0 = int(rng.integers(0, w - bw + 1)) - min(cs)
        for r, c in cells:
            g[r0 + r, c0 + c] = colour
    for colour in must_show:  # a later blob may have covered it: put one cell back on a background cell
        if not (g == colour).any():
            free = np.argwhere(g == 0)
            r, c = free[rng.integers(len(free))] if len(free) else (0, 0)
            g[r, c] = colour
    return g


def _sizes(rng: np.random.Generator, lo: int, hi: int) -> Callable[[], tuple[int, int]]:
    """A per-task grid-size sampler: every grid of the task has sides in [lo, hi] (fixed or varying)."""
    if rng.random() < 0.3:
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        return lambda: (h, w)
    return lambda: (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))


def _d8(g: np.ndarray, k: int) -> np.ndarray:
    """D8 element k in 0..7: k % 4 quarter turns, then a left-right flip when k >= 4."""
    out = np.rot90(g, k % 4)
    return np.fliplr(out) if k >= 4 else out


def _palette(rng: np.random.Generator, n: int) -> list[int]:
    return [int(c) for c in rng.choice(np.arange(1, 10), size=n, replace=False)]


# --- rules: each returns (params, make_input, apply) ----------------------------------------------


def _recolour(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(2, 5)))
    n_map = int(rng.integers(1, min(3, len(palette)) + 1))
    sources = palette[:n_map]
    targets = [int(c) for c in rng.choice([c for c in range(1, 10) if c not in sources], size=n_map, replace=False)]
    mapping = dict(zip(sources, targets))
    size = _sizes(rng, 3, 14)
    objects = int(rng.integers(n_map + 1, n_map + 6))

    def make() -> np.ndarray:
        return _scene(rng, *size(), palette, objects=objects, must_show=sources)

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        for a, b in mapping.items():
            out[g == a] = b
        return out

    return {"mapping": {str(a): b for a, b in mapping.items()}}, make, apply


def _symmetry(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    k = int(rng.integers(1, 8))
    palette = _palette(rng, int(rng.integers(1, 5)))
    size = _sizes(rng, 3, 12)
    objects = int(rng.integers(2, 7))
    return ({"d8": k}, lambda: _scene(rng, *size(), palette, objects=objects), lambda g: _d8(g, k))


def _symmetry_recolour(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    p1, make, recolour = _recolour(rng)
    k = int(rng.integers(1, 8))
    return {**p1, "d8": k}, make, lambda g: _d8(recolour(g), k)


def _scale(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    while True:
        sy, sx = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        if (sy, sx) != (1, 1):
            break
    palette = _palette(rng, int(rng.integers(1, 5)))
    size = _sizes(rng, 2, min(MAX_SIDE // max(sy, sx), 8))
    objects = int(rng.integers(1, 4))
    return ({"scale": [sy, sx]}, lambda: _scene(rng, *size(), palette, objects=objects),
            lambda g: np.kron(g, np.ones((sy, sx), np.int8)).astype(np.int8))


def _tile(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    while True:
        ry, rx = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        if (ry, rx) != (1, 1):
            break
    mirror = bool(rng.random() < 0.5)
    palette = _palette(rng, int(rng.integers(2, 5)))
    size = _sizes(rng, 2, min(MAX_SIDE // max(ry, rx), 6))
    objects = int(rng.integers(1, 4))

    def apply(g: np.ndarray) -> np.ndarray:
        rows = []
        for i in range(ry):
            row = []
            for j in range(rx):
                t = g
                if mirror and i % 2:
                    t = np.flipud(t)
                if mirror and j % 2:
                    t = np.fliplr(t)
                row.append(t)
            rows.append(np.concatenate(row, axis=1))
        return np.concatenate(rows, axis=0).astype(np.int8)

    return {"tile": [ry, rx], "mirror": mirror}, lambda: _scene(rng, *size(), palette, objects=objects), apply


def _gravity(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    direction = ("down", "up", "right", "left")[int(rng.integers(4))]
    palette = _palette(rng, int(rng.integers(1, 5)))
    size = _sizes(rng, 3, 12)
    objects = int(rng.integers(2, 7))
    turns = {"down": 0, "left": 1, "up": 2, "right": 3}[direction]  # quarter turns that make it fall "down"

    def apply(g: np.ndarray) -> np.ndarray:
        r = np.rot90(g, turns)
        out = np.zeros_like(r)
        for c in range(r.shape[1]):
            col = r[:, c][r[:, c] != 0]
            if len(col):
                out[r.shape[0] - len(col):, c] = col
        return np.rot90(out, -turns).astype(np.int8)

    return {"direction": direction}, lambda: _scene(rng, *size(), palette, objects=objects), apply


def _crop(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 4)))
    size = _sizes(rng, 6, 16)

    def make() -> np.ndarray:
        h, w = size()
        g = np.zeros((h, w), np.int8)
        cells = _blob(rng, int(rng.integers(3, min(h * w // 3, 20) + 1)))
        rs, cs = [r for r, _ in cells], [c for _, c in cells]
        bh, bw = max(rs) - min(rs) + 1, max(cs) - min(cs) + 1
        if bh > h or bw > w:
            cells, rs, cs, bh, bw = [(0, 0), (0, 1), (1, 0)], [0, 0, 1], [0, 1, 0], 2, 2
        r0 = int(rng.integers(0, h - bh + 1)) - min(rs)
        c0 = int(rng.integers(0, w - bw + 1)) - min(cs)
        for r, c in cells:
            g[r0 + r, c0 + c] = int(rng.choice(palette))
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero(g)
        return g[rows.min():rows.max() + 1, cols.min():cols.max() + 1].copy()

    return {}, make, apply


def _fill_background(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 4)))
    colour = int(rng.choice([c for c in range(1, 10) if c not in palette]))
    size = _sizes(rng, 3, 12)
    objects = int(rng.integers(1, 6))

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        out[g == 0] = colour
        return out

    return {"colour": colour}, lambda: _scene(rng, *size(), palette, objects=objects), apply


def _constant(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 5)))
    h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    out = _scene(rng, h, w, palette, objects=int(rng.integers(1, 5)))
    if not out.any():
        out[0, 0] = palette[0]
    size = _sizes(rng, 3, 12)
    in_palette = _palette(rng, int(rng.integers(1, 5)))
    objects = int(rng.integers(1, 6))
    return ({"output": out.tolist()}, lambda: _scene(rng, *size(), in_palette, objects=objects),
            lambda g: out.copy())


RULES: Mapping[str, Callable[[np.random.Generator], tuple[dict, Callable, Callable]]] = {
    "recolour": _recolour,
    "symmetry": _symmetry,
    "symmetry_recolour": _symmetry_recolour,
    "scale": _scale,
    "tile": _tile,
    "gravity": _gravity,
    "crop": _crop,
    "fill_background": _fill_background,
    "constant": _constant,
}


def parse_rules(spec: str, rules: str) -> tuple[str, ...]:
    """`all` or `a+b+...` -> rule names; an unknown name is a ValueError naming the spec and the choices."""
    if rules in ("", "all"):
        return tuple(RULES)
    names = tuple(r for r in rules.split("+") if r)
    unknown = [r for r in names if r not in RULES]
    if unknown or not names:
        raise ValueError(f"source {spec!r}: unknown synthetic rule(s) {unknown or [rules]}; expected 'all' or "
                         f"names joined by '+' from {sorted(RULES)}")
    return names


def generate_task(rules: Sequence[str], seed: int, index: int, *, source: str = "synth") -> Task:
    """Task `index` of the synthetic source (`numpy.random.default_rng([seed, index])` alone decides it)."""
    rng = np.random.default_rng([seed, index])
    rule = rules[int(rng.integers(len(rules)))]
    params, make, apply = RULES[rule](rng)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    n_pairs = int(rng.integers(4, 7))  # 3-5 train pairs + 1 test pair
    attempts = 0
    while len(pairs) < n_pairs:
        attempts += 1
        x = make()
        y = apply(x)
        # An example must show the rule at work (not output == input), and no input may repeat.
        if attempts < 50 and (np.array_equal(x, y) or any(np.array_equal(x, p) for p, _ in pairs)):
            continue
        pairs.append((x, y))
    as_lists = [(x.tolist(), y.tolist()) for x, y in pairs]
    return task_from_pairs(f"synth-{seed}-{index:06d}-{rule}", as_lists[:-1], as_lists[-1:],
                           metadata={"rule": rule, **params}, source=source, location=f"task {index}")
