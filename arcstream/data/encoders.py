"""Grid encoders: a grid as text, text back to a grid, and where each cell lies in the text.

In the style of the ARC Prize 2024 solutions, a grid is written one row per
line. An encoder is named by a *spec string* of `+`-separated parts, outermost
first:

    spec    := wrapper* rowmod? base
    wrapper := "codeblock" | "shape"      (each at most once, any order)
    rowmod  := "rownum"
    base    := "plain" | "space" | "comma"

  base      plain  `0120`         digits side by side (one char per cell)
            space  `0 1 2 0`      digits separated by one space
            comma  `0,1,2,0`      digits separated by commas
  rownum    `1: 0120`             each row prefixed by its 1-based number, ": "
  shape     `3x4\\n<body>`         a header line `{rows}x{cols}`; decode checks it
  codeblock ```` ```\\n<body>\\n``` ````  a Markdown code fence around the body

For example `get_encoder("shape+rownum+plain")` writes

    2x3
    1: 012
    2: 340

Rows are joined by "\\n" with no trailing newline. Why `space`: merging
tokenizers (Llama 3 groups up to three digits into one token) see digits
separated by a space as one token per cell, so the model reads every cell on
its own; `plain` is the most compact for digit-splitting tokenizers (Qwen).

Every encoder has:
  - `encode(grid) -> str`;
  - `decode(text) -> np.ndarray` (int8 [h, w]), which raises `DecodeError`
    (a ValueError) with a reason on anything that is not exactly a valid
    encoding (surrounding whitespace aside): it never raises anything else,
    whatever the text, because it reads model output;
  - `cell_spans(grid) -> int32 [h, w, 2]`: the `[start, end)` character span
    of every cell in `encode(grid)`, increasing in row-major order and
    non-overlapping; `cell_starts(grid) -> int64 [h*w]` is its first column,
    flattened, which is what the prompt builder aligns tokens with.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from arcstream.data.task import MAX_SIDE, NUM_COLOURS

BASES = {"plain": "", "space": " ", "comma": ","}  # base name -> cell separator
WRAPPERS = ("codeblock", "shape")
ROWMODS = ("rownum",)
_FENCE = "```"


class DecodeError(ValueError):
    """Text that is not a grid in the encoder's format; `reason` says why, `spec` names the encoder."""

    def __init__(self, reason: str, spec: str = ""):
        self.reason = reason
        self.spec = spec
        super().__init__(f"cannot decode a grid with encoder {spec!r}: {reason}" if spec else reason)


def _check_grid(grid: np.ndarray, values: bool = True) -> np.ndarray:
    g = np.asarray(grid)
    if g.ndim != 2 or not (1 <= g.shape[0] <= MAX_SIDE and 1 <= g.shape[1] <= MAX_SIDE):
        raise ValueError(f"encode: expected a grid of shape [h, w] with sides 1..{MAX_SIDE}, got shape {g.shape}")
    if values and (not np.issubdtype(g.dtype, np.integer) or g.min() < 0 or g.max() >= NUM_COLOURS):
        raise ValueError(f"encode: grid cells must be ints 0-9, got dtype {g.dtype} with values "
                         f"{sorted(set(np.unique(g).tolist()))}")
    return g


@dataclasses.dataclass(frozen=True)
class GridEncoder:
    """One encoder, built by `get_encoder(spec)`; see the module docstring for the format."""

    spec: str
    sep: str  # between the cells of a row
    rownum: bool  # rows prefixed by "{r+1}: "
    wrappers: tuple[str, ...]  # outermost first

    # --- encode --------------------------------------------------------------------
    def _rows(self, g: np.ndarray) -> list[str]:
        h, w = g.shape
        # Vectorised: the digits' ASCII codes with the separator bytes interleaved, one row per line.
        digits_hw = (g.astype(np.uint8) + ord("0"))
        if self.sep:
            step = 1 + len(self.sep)
            buf = np.empty((h, w * step), dtype=np.uint8)
            buf[:, ::step] = digits_hw
            for k, ch in enumerate(self.sep.encode("ascii")):
                buf[:, 1 + k::step] = ch
            buf = buf[:, : w * step - len(self.sep)]
        else:
            buf = digits_hw
        width = buf.shape[1]
        raw = np.ascontiguousarray(buf).tobytes().decode("ascii")
        rows = [raw[r * width:(r + 1) * width] for r in range(h)]
        if self.rownum:
            rows = [f"{r + 1}: {row}" for r, row in enumerate(rows)]
        return rows

    def _prefix_suffix(self, g: np.ndarray) -> tuple[str, str]:
        """The text before and after the row block, from the wrappers (outermost first)."""
        prefix, suffix = "", ""
        for wrapper in reversed(self.wrappers):  # innermost first
            if wrapper == "shape":
                prefix = f"{g.shape[0]}x{g.shape[1]}\n" + prefix
            elif wrapper == "codeblock":
                prefix, suffix = _FENCE + "\n" + prefix, suffix + "\n" + _FENCE
        return prefix, suffix

    def encode(self, grid: np.ndarray) -> str:
        g = _check_grid(grid)
        prefix, suffix = self._prefix_suffix(g)
        return prefix + "\n".join(self._rows(g)) + suffix

    def cell_starts(self, grid: np.ndarray) -> np.ndarray:
        """int64 [h*w]: the first character of each cell in `encode(grid)`, row-major (strictly increasing)."""
        g = _check_grid(grid, values=False)
        h, w = g.shape
        prefix, _ = self._prefix_suffix(g)
        row_width = w + (w - 1) * len(self.sep)
        # Row r starts after the prefix, r earlier rows with their "\n", and its own row number label.
        starts_h = len(prefix) + np.arange(h, dtype=np.int64) * (row_width + 1)
        if self.rownum:
            starts_h += np.cumsum([len(f"{r + 1}: ") for r in range(h)])
        return (starts_h[:, None] + np.arange(0, w * (1 + len(self.sep)), 1 + len(self.sep))[None, :]).reshape(-1)

    def cell_spans(self, grid: np.ndarray) -> np.ndarray:
        """int32 [h, w, 2]: `[start, end)` of each cell in `encode(grid)` (every cell is one char)."""
        g = np.asarray(grid)
        start_hw = self.cell_starts(g).reshape(g.shape)
        return np.stack([start_hw, start_hw + 1], axis=-1).astype(np.int32)

    # --- decode --------------------------------------------------------------------
    def _fail(self, reason: str) -> DecodeError:
        return DecodeError(reason, self.spec)

    def decode(self, text: str) -> np.ndarray:
        """The grid `text` encodes; raises DecodeError (never anything else) when it is not one."""
        if not isinstance(text, str):
            raise self._fail(f"expected text (str), got {type(text).__name__}")
        body = text.strip()
        header: tuple[int, int] | None = None
        for wrapper in self.wrappers:  # outermost first
            if wrapper == "codeblock":
                body = self._strip_fence(body)
            elif wrapper == "shape":
                header, body = self._strip_header(body)
        g = self._decode_rows(body)
        if header is not None and header != g.shape:
            raise self._fail(f"shape header says {header[0]}x{header[1]} but the rows form a "
                             f"{g.shape[0]}x{g.shape[1]} grid")
        return g

    def _strip_fence(self, body: str) -> str:
        first, _, rest = body.partition("\n")
        if not first.startswith(_FENCE) or not re.fullmatch(r"```[A-Za-z0-9_+-]*", first):
            raise self._fail(f"expected an opening ``` line, got {first[:40]!r}")
        inner, _, last = rest.rpartition("\n")
        if last.strip() != _FENCE:
            raise self._fail(f"expected a closing ``` line, got {last[:40]!r}")
        return inner

    def _strip_header(self, body: str) -> tuple[tuple[int, int], str]:
        first, _, rest = body.partition("\n")
        m = re.fullmatch(r"\s*(\d{1,2})\s*x\s*(\d{1,2})\s*", first)
        if m is None:
            raise self._fail(f"expected a shape header like '3x4' on the first line, got {first[:40]!r}")
        return (int(m.group(1)), int(m.group(2))), rest

    def _decode_rows(self, body: str) -> np.ndarray:
        lines = body.split("\n")
        if len(lines) > MAX_SIDE:
            raise self._fail(f"{len(lines)} rows; at most {MAX_SIDE} allowed")
        rows: list[str] = []
        for r, line in enumerate(lines):
            line = line.rstrip("\r")
            if self.rownum:
                m = re.match(r"(\d{1,3}): ", line)  # bounded: int() of a huge digit string raises
                if m is None:
                    raise self._fail(f"row {r} lacks its row number prefix '{r + 1}: ': {line[:40]!r}")
                if int(m.group(1)) != r + 1:
                    raise self._fail(f"row {r} is numbered {m.group(1)}; expected {r + 1}")
                line = line[m.end():]
            if self.sep:
                cells = line.split(self.sep)
                if any(len(c) != 1 for c in cells):
                    raise self._fail(f"row {r} is not single digits separated by {self.sep!r}: {line[:60]!r}")
                line = "".join(cells)
            if not line:
                raise self._fail(f"row {r} is empty")
            if not line.isascii() or not line.isdigit():
                bad = next(ch for ch in line if not ("0" <= ch <= "9"))
                raise self._fail(f"row {r} holds {bad!r}; cells are digits 0-9")
            if len(line) > MAX_SIDE:
                raise self._fail(f"row {r} has {len(line)} cells; at most {MAX_SIDE} allowed")
            if rows and len(line) != len(rows[0]):
                raise self._fail(f"row {r} has {len(line)} cells but row 0 has {len(rows[0])}")
            rows.append(line)
        data = np.frombuffer("".join(rows).encode("ascii"), dtype=np.uint8) - ord("0")
        return data.astype(np.int8).reshape(len(rows), len(rows[0]))


def _parse_spec(spec: str) -> tuple[str, bool, tuple[str, ...]]:
    syntax = ("spec syntax: [codeblock+][shape+][rownum+]BASE with BASE one of "
              f"{sorted(BASES)}, e.g. 'shape+rownum+plain'")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"encoder spec must be a non-empty string, got {spec!r}; {syntax}")
    parts = spec.split("+")
    *mods, base = parts
    if base not in BASES:
        raise ValueError(f"encoder spec {spec!r}: the last part must be a base, got {base!r}; {syntax}")
    rownum = False
    wrappers: list[str] = []
    for i, part in enumerate(mods):
        if part == "rownum":
            if i != len(mods) - 1:
                raise ValueError(f"encoder spec {spec!r}: 'rownum' modifies rows, so it must come right before "
                                 f"the base; {syntax}")
            rownum = True
        elif part in WRAPPERS:
            if part in wrappers:
                raise ValueError(f"encoder spec {spec!r}: {part!r} appears twice; {syntax}")
            wrappers.append(part)
        else:
            raise ValueError(f"encoder spec {spec!r}: unknown part {part!r}; {syntax}")
    return BASES[base], rownum, tuple(wrappers)


@functools.lru_cache(maxsize=None)
def get_encoder(spec: str) -> GridEncoder:
    """The encoder for a spec string (see the module docstring); raises ValueError naming the bad part."""
    sep, rownum, wrappers = _parse_spec(spec)
    return GridEncoder(spec, sep, rownum, wrappers)


# Specs the tests round-trip over every ARC task: each part, and the compositions the brief names.
EXAMPLE_SPECS: tuple[str, ...] = (
    "plain",
    "space",
    "comma",
    "rownum+plain",
    "shape+plain",
    "codeblock+plain",
    "shape+rownum+plain",
    "codeblock+shape+rownum+space",
    "shape+codeblock+comma",
)
DEFAULT_SPEC = "plain"
