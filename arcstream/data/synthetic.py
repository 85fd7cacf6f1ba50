"""Procedurally generated ARC-style tasks whose rule can only be read from the examples.

Why: ARC-AGI's training sets hold ~630 distinct tasks. A small model trained on
them alone learns local statistics of output grids (which colour follows which)
and ignores the train pairs: measured on arcstream-tiny, its answer loss was the
same with the task's own examples, with none, and with another task's. Every
task here draws one rule with random parameters (which colours map to which,
which of the eight symmetries, which scale, which direction things fall), so
the test output is predictable only by reading the train pairs; the model that
learns them has to learn to look back at the examples.

Source spec: `synth:RULES?tasks=N&seed=S` with RULES a group (`all`, `basic`) or
rule names joined by `+` (`synth:recolour+gravity`). Task `i` is generated from
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
The object rules below act on objects, not on the whole grid: an object is a
4-connected set of non-background cells, and their inputs place objects so that
no two touch, not even diagonally (one blob is one object).
  fill_enclosed  background cells not 4-connected to the border take colour c (some frames leak: not filled)
  outline        background cells 8-adjacent to an object take colour c; objects are copied
  extend_lines   each single pixel of marker colour m shoots a line to the edge, in one direction or both
                 of a pair, over background only (it stops at the first non-background cell of the input)
  translate      everything moves by (dy, dx), each in -3..3, not both 0; what leaves the grid is lost
  denoise        isolated pixels of the noise colour become background; objects never use that colour
  recolour_largest  the largest object (unique by size) takes colour c; the others are copied
  count          the output is a 1 x n row (or n x 1 column) of one colour, n = the number of objects (1-9)
  largest_crop   the output is the largest object (unique by size) alone, cropped to its bounding box
  mirror_complete  one half (left/right/top/bottom) holds a pattern, the other is empty; the output
                 mirrors the pattern into the empty half
Each task has 3-5 train pairs and 1 test pair; every train input shows every
colour the rule maps and what the rule acts on (an enclosed region, a marker, a
noise pixel, ...), so the rule is determined by the examples.

Groups: `all` is every rule; `objects` the object rules; `basic` the original
nine rules (recolour to constant above) in their original order. Why `basic`:
`generate_task` picks the rule with `rules[rng.integers(len(rules))]`, so
adding rules changed which task `synth:all` gives at each index.
`synth:basic?tasks=N&seed=S` gives, byte for byte, the tasks `synth:all` gave
before the object rules were added, the data the arcstream-tiny recipe
(`synth:all?tasks=20000` then) was trained on.
The existing rules' functions and their draws from the generator must never
change, or `basic` stops reproducing that data (tests/data/test_synthetic.py
pins a digest of it).
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


_STEPS4 = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _near8(mask: np.ndarray) -> np.ndarray:
    """Cells of `mask` and cells 8-adjacent to one."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = np.zeros(mask.shape, bool)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            out |= p[dr:dr + h, dc:dc + w]
    return out


def _objects_of(g: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 4-connected components of non-background cells (of any colours), in scan order of their first cell."""
    h, w = g.shape
    seen = np.zeros(g.shape, bool)
    comps = []
    for r in range(h):
        for c in range(w):
            if not g[r, c] or seen[r, c]:
                continue
            seen[r, c] = True
            stack, comp = [(r, c)], []
            while stack:
                y, x = stack.pop()
                comp.append((y, x))
                for dy, dx in _STEPS4:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and g[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            comps.append(sorted(comp))
    return comps


def _outside(g: np.ndarray) -> np.ndarray:
    """Background cells 4-connected, through background, to the grid's border."""
    h, w = g.shape
    out = np.zeros(g.shape, bool)
    stack = [(r, c) for r in range(h) for c in range(w) if (r in (0, h - 1) or c in (0, w - 1)) and g[r, c] == 0]
    for r, c in stack:
        out[r, c] = True
    while stack:
        y, x = stack.pop()
        for dy, dx in _STEPS4:
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and g[ny, nx] == 0 and not out[ny, nx]:
                out[ny, nx] = True
                stack.append((ny, nx))
    return out


def _blob_patch(rng: np.random.Generator, size: int, colour: int) -> np.ndarray:
    """A random blob of `size` cells in `colour` on a 0 patch just big enough for it."""
    cells = _blob(rng, size)
    r0, c0 = min(r for r, _ in cells), min(c for _, c in cells)
    patch = np.zeros((max(r for r, _ in cells) - r0 + 1, max(c for _, c in cells) - c0 + 1), np.int8)
    for r, c in cells:
        patch[r - r0, c - c0] = colour
    return patch


def _frame(h: int, w: int, colour: int) -> np.ndarray:
    """A closed 1-cell-wide h x w rectangle outline."""
    patch = np.full((h, w), colour, np.int8)
    patch[1:-1, 1:-1] = 0
    return patch


def _put(rng: np.random.Generator, g: np.ndarray, patch: np.ndarray, *, tries: int = 30) -> bool:
    """Draws `patch` (0 = transparent) into `g` at a random spot where none of its cells covers or touches
    (8-adjacency) a non-background cell, so it stays a separate object. False, `g` unchanged, when `tries`
    random spots all fail."""
    (h, w), (ph, pw) = g.shape, patch.shape
    if ph > h or pw > w:
        return False
    blocked = _near8(g != 0)
    solid = patch != 0
    for _ in range(tries):
        r0, c0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if not (blocked[r0:r0 + ph, c0:c0 + pw] & solid).any():
            g[r0:r0 + ph, c0:c0 + pw][solid] = patch[solid]
            return True
    return False


def _dot(rng: np.random.Generator, g: np.ndarray, colour: int, allowed: np.ndarray | None = None) -> bool:
    """Sets one cell that touches no non-background cell (and is `allowed`) to `colour`; False if none is free."""
    free = ~_near8(g != 0) if allowed is None else ~_near8(g != 0) & allowed
    cells = np.argwhere(free)
    if not len(cells):
        return False
    r, c = cells[rng.integers(len(cells))]
    g[r, c] = colour
    return True


def _unique_largest(rng: np.random.Generator, size: Callable[[], tuple[int, int]], objects: int,
                    colour: Callable[[], int]) -> np.ndarray:
    """A grid of `objects` separate blobs (>= 2 placed) whose largest is unique by size; redrawn until it is."""
    for _ in range(100):
        h, w = size()
        g = np.zeros((h, w), np.int8)
        for _ in range(objects):
            _put(rng, g, _blob_patch(rng, int(rng.integers(1, 10)), colour()))
        counts = sorted(len(c) for c in _objects_of(g))
        if len(counts) >= 2 and counts[-1] > counts[-2]:
            return g
    g = np.zeros((h, w), np.int8)  # not reached in practice; a valid grid all the same (sides >= 3)
    g[0, 0:2] = colour()
    g[h - 1, w - 1] = colour()
    return g


def _largest(g: np.ndarray) -> list[tuple[int, int]]:
    """The largest object's cells (the first in scan order on a tie, which the inputs never have)."""
    comps = _objects_of(g)
    return max(comps, key=len) if comps else []


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


# --- object rules (added after the nine above; see `basic` in the module docstring) ----------------


def _fill_enclosed(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 3)))
    colour = int(rng.choice([c for c in range(1, 10) if c not in palette]))
    size = _sizes(rng, 6, 16)
    frames = int(rng.integers(1, 4))
    leaky = bool(rng.random() < 0.5)  # frames after the first may have a gap: their inside is not filled
    blobs = int(rng.integers(0, 4))

    def make() -> np.ndarray:
        h, w = size()
        g = np.zeros((h, w), np.int8)
        for k in range(frames):
            fh, fw = int(rng.integers(3, min(h, 8) + 1)), int(rng.integers(3, min(w, 8) + 1))
            patch = _frame(fh, fw, palette[int(rng.integers(len(palette)))])
            if leaky and k > 0 and rng.random() < 0.5:
                gaps = [(r, c) for r in range(fh) for c in range(fw)  # a border cell, not a corner
                        if patch[r, c] and not (r in (0, fh - 1) and c in (0, fw - 1))]
                r, c = gaps[int(rng.integers(len(gaps)))]
                patch[r, c] = 0
            # The first frame lands on an empty grid, is closed, and nothing placed later can touch its
            # inside's border cells: every input has an enclosed region.
            _put(rng, g, patch)
        for _ in range(blobs):
            _put(rng, g, _blob_patch(rng, int(rng.integers(1, 7)), palette[int(rng.integers(len(palette)))]))
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        out[(g == 0) & ~_outside(g)] = colour
        return out

    return {"colour": colour}, make, apply


def _outline(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 4)))
    colour = int(rng.choice([c for c in range(1, 10) if c not in palette]))
    size = _sizes(rng, 4, 14)
    objects = int(rng.integers(1, 5))

    def make() -> np.ndarray:
        h, w = size()
        g = np.zeros((h, w), np.int8)
        for _ in range(objects):
            _put(rng, g, _blob_patch(rng, int(rng.integers(1, 9)), palette[int(rng.integers(len(palette)))]))
        if not g.any():  # every blob was too long for the grid
            _dot(rng, g, palette[0])
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        out[(g == 0) & _near8(g != 0)] = colour
        return out

    return {"colour": colour}, make, apply


_DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _extend_lines(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    directions = (("up",), ("down",), ("left",), ("right",), ("up", "down"), ("left", "right"))[int(rng.integers(6))]
    palette = _palette(rng, int(rng.integers(2, 5)))
    marker, object_colours = palette[0], palette[1:]
    line = marker if rng.random() < 0.5 else int(rng.choice([c for c in range(1, 10) if c not in palette]))
    size = _sizes(rng, 5, 14)
    objects = int(rng.integers(0, 4))
    markers = int(rng.integers(1, 4))

    def make() -> np.ndarray:
        h, w = size()
        g = np.zeros((h, w), np.int8)
        for _ in range(objects):
            colour = object_colours[int(rng.integers(len(object_colours)))]
            _put(rng, g, _blob_patch(rng, int(rng.integers(2, 7)), colour))
        # Markers stay off the border and touch nothing, so each has background on all four sides: every
        # marker shows its line, and the examples rule out every other direction.
        allowed = np.zeros((h, w), bool)
        allowed[1:-1, 1:-1] = True
        for k in range(markers):
            if not _dot(rng, g, marker, allowed) and k == 0:
                g[:] = 0  # objects left no room: a marker alone
                _dot(rng, g, marker, allowed)
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        h, w = g.shape
        for r, c in np.argwhere(g == marker):
            for d in directions:
                dr, dc = _DIRECTIONS[d]
                y, x = r + dr, c + dc
                while 0 <= y < h and 0 <= x < w and g[y, x] == 0:
                    out[y, x] = line
                    y, x = y + dr, x + dc
        return out

    return {"directions": list(directions), "marker": marker, "line": line}, make, apply


def _translate(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    while True:
        dy, dx = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
        if (dy, dx) != (0, 0):
            break
    palette = _palette(rng, int(rng.integers(1, 5)))
    size = _sizes(rng, 5, 14)
    objects = int(rng.integers(1, 5))

    def make() -> np.ndarray:
        h, w = size()
        ih, iw = h - abs(dy), w - abs(dx)
        inner = _scene(rng, ih, iw, palette, objects=objects)
        if rng.random() < 0.8:  # the margin is where the content moves to: nothing is lost
            r0, c0 = max(-dy, 0), max(-dx, 0)
        else:
            r0, c0 = int(rng.integers(0, abs(dy) + 1)), int(rng.integers(0, abs(dx) + 1))
        g = np.zeros((h, w), np.int8)
        g[r0:r0 + ih, c0:c0 + iw] = inner
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        h, w = g.shape
        out = np.zeros_like(g)
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = g[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
        return out

    return {"shift": [dy, dx]}, make, apply


def _denoise(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(2, 5)))
    noise, object_colours = palette[0], palette[1:]
    size = _sizes(rng, 5, 14)
    objects = int(rng.integers(1, 5))

    def make() -> np.ndarray:
        h, w = size()
        g = np.zeros((h, w), np.int8)
        for _ in range(objects):
            colour = object_colours[int(rng.integers(len(object_colours)))]
            _put(rng, g, _blob_patch(rng, int(rng.integers(2, 9)), colour))
        for k in range(int(rng.integers(1, 7))):
            if not _dot(rng, g, noise) and k == 0:  # no isolated cell left: noise on any background cell
                free = np.argwhere(g == 0)
                r, c = free[rng.integers(len(free))]
                g[r, c] = noise
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        return np.where(g == noise, 0, g).astype(np.int8)

    return {"noise": noise}, make, apply


def _recolour_largest(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    source, colour = _palette(rng, 2)
    size = _sizes(rng, 6, 14)
    objects = int(rng.integers(2, 6))

    def apply(g: np.ndarray) -> np.ndarray:
        out = g.copy()
        for r, c in _largest(g):
            out[r, c] = colour
        return out

    return ({"colour": colour, "object_colour": source}, lambda: _unique_largest(rng, size, objects, lambda: source),
            apply)


def _count(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    orientation = ("row", "column")[int(rng.integers(2))]
    palette = _palette(rng, int(rng.integers(2, 5)))
    same_colour = bool(rng.random() < 0.5)  # output in the objects' colour (one per input) or in a fixed colour
    colour = "object" if same_colour else int(rng.choice([c for c in range(1, 10) if c not in palette]))
    size = _sizes(rng, 6, 14)
    made = [0]

    def make() -> np.ndarray:
        k = made[0]
        made[0] += 1
        for _ in range(20):
            h, w = size()
            g = np.zeros((h, w), np.int8)
            # The first input has >= 2 objects, so the examples show the orientation; in `object` mode the
            # objects' colour cycles through the palette, so they show the colour comes from the input.
            for _ in range(int(rng.integers(2 if k == 0 else 1, 10))):
                c = palette[k % len(palette)] if same_colour else palette[int(rng.integers(len(palette)))]
                _put(rng, g, _blob_patch(rng, int(rng.integers(1, 5)), c))
            if len(_objects_of(g)) >= (2 if k == 0 else 1):
                return g
        return g

    def apply(g: np.ndarray) -> np.ndarray:
        n = len(_objects_of(g))
        c = int(g[g != 0][0]) if same_colour else colour
        return np.full((1, n) if orientation == "row" else (n, 1), c, np.int8)

    return {"orientation": orientation, "colour": colour}, make, apply


def _largest_crop(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    palette = _palette(rng, int(rng.integers(1, 4)))
    size = _sizes(rng, 6, 14)
    objects = int(rng.integers(2, 6))

    def apply(g: np.ndarray) -> np.ndarray:
        cells = _largest(g)
        rs, cs = [r for r, _ in cells], [c for _, c in cells]
        out = np.zeros((max(rs) - min(rs) + 1, max(cs) - min(cs) + 1), np.int8)
        for r, c in cells:  # the object alone: another object inside its bounding box is left out
            out[r - min(rs), c - min(cs)] = g[r, c]
        return out

    return {}, lambda: _unique_largest(rng, size, objects, lambda: palette[int(rng.integers(len(palette)))]), apply


def _mirror_complete(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    side = ("left", "right", "top", "bottom")[int(rng.integers(4))]  # the half that holds the pattern
    turns = {"left": 0, "top": 1, "right": 2, "bottom": 3}[side]  # np.rot90 quarter turns that bring it to the left
    palette = _palette(rng, int(rng.integers(1, 5)))
    size = _sizes(rng, 4, 14)
    objects = int(rng.integers(2, 8))

    def make() -> np.ndarray:
        h, w = size()
        hh, ww = (h, w) if turns % 2 == 0 else (w, h)  # sides with the pattern on the left
        k = ww // 2  # columns mirrored; an odd middle column is the axis and belongs to the pattern
        pattern = _scene(rng, hh, ww - k, palette, objects=objects)
        if not pattern[:, :k].any():  # the pattern must reach the mirrored columns, or nothing changes
            pattern[int(rng.integers(hh)), int(rng.integers(k))] = palette[0]
        g = np.zeros((hh, ww), np.int8)
        g[:, :ww - k] = pattern
        return np.rot90(g, -turns).copy()

    def apply(g: np.ndarray) -> np.ndarray:
        r = np.rot90(g, turns).copy()
        k = r.shape[1] // 2
        r[:, r.shape[1] - k:] = np.fliplr(r[:, :k])
        return np.rot90(r, -turns).copy()

    return {"side": side}, make, apply


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
    "fill_enclosed": _fill_enclosed,
    "outline": _outline,
    "extend_lines": _extend_lines,
    "translate": _translate,
    "denoise": _denoise,
    "recolour_largest": _recolour_largest,
    "count": _count,
    "largest_crop": _largest_crop,
    "mirror_complete": _mirror_complete,
}

# Named groups of rules for `synth:GROUP`. `basic` is the nine rules arcstream-tiny was trained on, in the order
# `synth:all` had them then: the order decides which rule task i gets, so `synth:basic` reproduces that data.
GROUPS: Mapping[str, tuple[str, ...]] = {
    "all": tuple(RULES),
    "basic": ("recolour", "symmetry", "symmetry_recolour", "scale", "tile", "gravity", "crop", "fill_background",
              "constant"),
}
GROUPS = {**GROUPS, "objects": tuple(r for r in RULES if r not in GROUPS["basic"])}  # the object rules


def parse_rules(spec: str, rules: str) -> tuple[str, ...]:
    """A group (`all`, `basic`, `objects`; empty = `all`) or `a+b+...` -> rule names; an unknown name is a ValueError
    naming the spec and the choices."""
    if rules in GROUPS or not rules:
        return GROUPS[rules or "all"]
    names = tuple(r for r in rules.split("+") if r)
    unknown = [r for r in names if r not in RULES]
    if unknown or not names:
        raise ValueError(f"source {spec!r}: unknown synthetic rule(s) {unknown or [rules]}; expected a group "
                         f"({' or '.join(repr(g) for g in GROUPS)}) or rule names joined by '+' from {sorted(RULES)}")
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
