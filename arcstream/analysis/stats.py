"""Per-feature statistics of one SAE, accumulated chunk by chunk over a stored run.

Why streaming: a site of a real run holds 10^8 rows; everything here is a sum,
a count or a top-k, so a chunk of `[n, d_sae]` latent activations is folded in
and dropped, and memory is O(d_sae * (k + bins + attribute values)), never
O(rows).

What is accumulated per latent (a latent "fires" on a row when its activation
is > 0):
  - firing count (density = count / rows), sum of activations, max activation;
  - the `top_k` largest activations with their global row indices (a streaming
    merge: chunk top-k, then top-k of the union);
  - a histogram of the non-zero activations on fixed log10 bins
    (`ACT_LOG10_EDGES`), so chunks add without knowing the range in advance;
  - how often it fires on each value of each cell attribute the store records
    (`ATTRIBUTES`: colour, row, column, grid kind, position bucket, colour x
    grid kind), counted over the firing (row, latent) pairs only (O(nnz)).

`evaluate_chunk` / `EvalAccumulator` give the model-free reconstruction metrics
on held-out rows: L0, FVU and explained variance (closed forms in
`EvalAccumulator.result`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from arcstream.data.records import GRID_KIND_NAMES
from arcstream.sae.architectures import fvu_and_explained_variance

# Fixed log10 bins of non-zero activations: 1e-4 .. 1e4, 4 bins per decade (values outside are clipped in).
ACT_LOG10_EDGES = np.linspace(-4.0, 4.0, 33)
# Position-in-prompt buckets: [edges[i], edges[i+1]).
POSITION_EDGES = (0, 16, 64, 256, 1024, 4096, 1 << 31)
MAX_GRID_SIDE = 30
N_COLOURS = 10
N_KINDS = len(GRID_KIND_NAMES)  # 0 none, 1..4


def _position_names() -> list[str]:
    return [f"{a}-{b - 1}" if b < (1 << 31) else f">={a}" for a, b in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:])]


# attribute -> names of its values (the code of a value is its index). "none" values are recorded too, so a
# feature firing on non-grid tokens is visible (grid_kind "none").
ATTRIBUTES: dict[str, list[str]] = {
    "colour": [str(c) for c in range(N_COLOURS)],
    "row": [str(r) for r in range(MAX_GRID_SIDE)],
    "col": [str(c) for c in range(MAX_GRID_SIDE)],
    "grid_kind": [GRID_KIND_NAMES[k] for k in range(N_KINDS)],
    "position": _position_names(),
    "colour_in_kind": [f"{c}@{GRID_KIND_NAMES[k]}" for c in range(N_COLOURS) for k in range(1, N_KINDS)],
}
_OFFSETS = dict(zip(ATTRIBUTES, np.cumsum([0] + [len(v) for v in ATTRIBUTES.values()])[:-1].tolist()))
N_ATTRIBUTE_VALUES = sum(len(v) for v in ATTRIBUTES.values())


def attribute_codes(tokens: Mapping[str, np.ndarray]) -> np.ndarray:
    """int32 [n, len(ATTRIBUTES)]: each row's value code per attribute in one flat space; -1 = not applicable.

    `tokens` holds the store's token fields for the rows (`colour`, `row`, `col`, `grid_kind`, `position`).
    """
    colour = tokens["colour"].astype(np.int32)
    kind = tokens["grid_kind"].astype(np.int32)
    row = tokens["row"].astype(np.int32)
    col = tokens["col"].astype(np.int32)
    pos_bucket = np.searchsorted(np.asarray(POSITION_EDGES[1:]), tokens["position"].astype(np.int64), side="right")
    is_cell = (kind > 0) & (colour >= 0)

    def code(name: str, value: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return np.where(ok, _OFFSETS[name] + value, -1)

    return np.stack([
        code("colour", colour, is_cell & (colour < N_COLOURS)),
        code("row", row, is_cell & (row >= 0) & (row < MAX_GRID_SIDE)),
        code("col", col, is_cell & (col >= 0) & (col < MAX_GRID_SIDE)),
        code("grid_kind", kind, (kind >= 0) & (kind < N_KINDS)),
        code("position", pos_bucket, pos_bucket < len(POSITION_EDGES) - 1),
        code("colour_in_kind", colour * (N_KINDS - 1) + kind - 1, is_cell & (colour < N_COLOURS) & (kind < N_KINDS)),
    ], axis=1).astype(np.int32)


@dataclasses.dataclass
class FeatureAccumulator:
    """Running per-latent statistics of one SAE; `update` per chunk, `result` at the end.

    Invariant: after updates over rows R, every field equals what the same
    formula gives on the concatenation of R (the tests check this against
    NumPy on the whole array), whatever the chunking.
    """

    d_sae: int
    top_k: int = 16

    def __post_init__(self) -> None:
        s = self.d_sae
        self.rows = 0
        self.fire_count_s = np.zeros(s, np.int64)
        self.act_sum_s = np.zeros(s, np.float64)
        self.act_max_s = np.zeros(s, np.float32)
        self.top_val_ks = np.full((self.top_k, s), -np.inf, np.float32)
        self.top_row_ks = np.full((self.top_k, s), -1, np.int64)
        self.top_key_ks = np.full((self.top_k, s), -1, np.int64)
        self.hist_sb = np.zeros((s, len(ACT_LOG10_EDGES) - 1), np.int64)
        self.attr_fire_sv = np.zeros((s, N_ATTRIBUTE_VALUES), np.int64)
        self.attr_total_v = np.zeros(N_ATTRIBUTE_VALUES, np.int64)

    def update(self, acts_ns: np.ndarray, tokens: Mapping[str, np.ndarray], first_row: int) -> None:
        """Folds in latent activations `[n, d_sae]` of global rows `first_row .. first_row + n`.

        `tokens`: the store's token fields for those rows; `tokens["prompt"]` is kept beside each top row.
        """
        acts_ns = np.asarray(acts_ns, np.float32)
        n = acts_ns.shape[0]
        if acts_ns.ndim != 2 or acts_ns.shape[1] != self.d_sae:
            raise ValueError(f"FeatureAccumulator.update: acts have shape {acts_ns.shape}, expected [n, {self.d_sae}]")
        if n == 0:
            return
        fires_ns = acts_ns > 0
        self.rows += n
        self.fire_count_s += fires_ns.sum(0)
        self.act_sum_s += acts_ns.sum(0, dtype=np.float64)
        self.act_max_s = np.maximum(self.act_max_s, acts_ns.max(0))
        # Streaming top-k: the chunk's top-k per latent, merged with the running top-k. Sparse chunks (TopK
        # SAEs: k of d_sae latents per row) sort only the firing pairs; a dense argpartition over [n, d_sae]
        # costs ~10x more there (benchmarks/bench_analysis.py).
        r, s = np.nonzero(fires_ns)
        if r.size * 8 < acts_ns.size:
            vals_ks, idx_ks = self._sparse_chunk_top(acts_ns[r, s], r, s)
        else:
            k = min(self.top_k, n)
            idx_ks = np.argpartition(-acts_ns, k - 1, axis=0)[:k] if k < n else np.broadcast_to(
                np.arange(n)[:, None], (n, self.d_sae))
            vals_ks = np.take_along_axis(acts_ns, idx_ks, axis=0)
            vals_ks = np.where(vals_ks > 0, vals_ks, -np.inf)  # only firing rows are examples
        cand_val = np.concatenate([self.top_val_ks, vals_ks], 0)
        cand_row = np.concatenate([self.top_row_ks, np.where(vals_ks > -np.inf, idx_ks + first_row, -1)], 0)
        prompt_n = np.asarray(tokens["prompt"], np.int64)
        cand_key = np.concatenate([self.top_key_ks, np.where(vals_ks > -np.inf, prompt_n[idx_ks], -1)], 0)
        keep = np.argsort(-cand_val, axis=0, kind="stable")[: self.top_k]
        self.top_val_ks = np.take_along_axis(cand_val, keep, 0)
        self.top_row_ks = np.take_along_axis(cand_row, keep, 0)
        self.top_key_ks = np.take_along_axis(cand_key, keep, 0)
        # Everything below works on the (row, latent) pairs that fired: O(nnz), no dense [n, d_sae] temporaries.
        bins = len(ACT_LOG10_EDGES) - 1
        if r.size:
            b = np.clip(np.searchsorted(ACT_LOG10_EDGES, np.log10(acts_ns[r, s]), side="right") - 1, 0, bins - 1)
            self.hist_sb += np.bincount(s * bins + b, minlength=self.d_sae * bins).reshape(self.d_sae, bins)
        # Firing per attribute value: one bincount over (latent, value code) per attribute.
        codes_na = attribute_codes(tokens)
        valid = codes_na >= 0
        self.attr_total_v += np.bincount(codes_na[valid], minlength=N_ATTRIBUTE_VALUES)
        for a in range(codes_na.shape[1]):
            code_r = codes_na[r, a]
            ok = code_r >= 0
            self.attr_fire_sv += np.bincount(s[ok] * N_ATTRIBUTE_VALUES + code_r[ok],
                                             minlength=self.d_sae * N_ATTRIBUTE_VALUES).reshape(
                                                 self.d_sae, N_ATTRIBUTE_VALUES)

    def _sparse_chunk_top(self, vals: np.ndarray, r: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[top_k, d_sae] values (-inf where none) and chunk rows of each latent's largest firing values."""
        order = np.lexsort((-vals, s))  # by latent, then descending value
        s_sorted = s[order]
        starts = np.searchsorted(s_sorted, np.arange(self.d_sae))
        rank = np.arange(len(order)) - starts[s_sorted]
        keep = rank < self.top_k
        vals_ks = np.full((self.top_k, self.d_sae), -np.inf, np.float32)
        idx_ks = np.zeros((self.top_k, self.d_sae), np.int64)
        vals_ks[rank[keep], s_sorted[keep]] = vals[order][keep]
        idx_ks[rank[keep], s_sorted[keep]] = r[order][keep]
        return vals_ks, idx_ks

    def result(self) -> "FeatureStats":
        return FeatureStats(
            rows=self.rows, fire_count_s=self.fire_count_s.copy(), act_sum_s=self.act_sum_s.copy(),
            act_max_s=self.act_max_s.copy(), top_val_ks=self.top_val_ks.copy(), top_row_ks=self.top_row_ks.copy(),
            top_prompt_ks=self.top_key_ks.copy(), hist_sb=self.hist_sb.copy(), attr_fire_sv=self.attr_fire_sv.copy(),
            attr_total_v=self.attr_total_v.copy())


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
    """The finished statistics of one SAE over `rows` rows (see FeatureAccumulator)."""

    rows: int
    fire_count_s: np.ndarray  # int64 [d_sae]
    act_sum_s: np.ndarray  # float64 [d_sae]
    act_max_s: np.ndarray  # float32 [d_sae]
    top_val_ks: np.ndarray  # float32 [top_k, d_sae], descending; -inf where fewer rows fired
    top_row_ks: np.ndarray  # int64 [top_k, d_sae], global row of each top value; -1 where none
    top_prompt_ks: np.ndarray  # int64 [top_k, d_sae], prompt index of each top row; -1 where none
    hist_sb: np.ndarray  # int64 [d_sae, bins] of non-zero activations on ACT_LOG10_EDGES
    attr_fire_sv: np.ndarray  # int64 [d_sae, N_ATTRIBUTE_VALUES]: rows with that value where the latent fired
    attr_total_v: np.ndarray  # int64 [N_ATTRIBUTE_VALUES]: rows with that value

    @property
    def density_s(self) -> np.ndarray:
        return self.fire_count_s / max(self.rows, 1)

    @property
    def mean_act_s(self) -> np.ndarray:
        """Mean activation over all rows (zeros included)."""
        return self.act_sum_s / max(self.rows, 1)

    @property
    def mean_when_firing_s(self) -> np.ndarray:
        return np.where(self.fire_count_s > 0, self.act_sum_s / np.maximum(self.fire_count_s, 1), 0.0)

    def dead_mask(self) -> np.ndarray:
        """Latents that never fired on the analysed rows."""
        return self.fire_count_s == 0

    def dense_mask(self, dense_density: float) -> np.ndarray:
        """Latents firing on more than `dense_density` of the rows."""
        return self.density_s > dense_density

    def density_histogram(self, bins: int = 20) -> dict[str, Any]:
        """Histogram of log10(density) over latents that fired (dead ones are counted apart)."""
        alive = self.fire_count_s > 0
        log_d = np.log10(self.density_s[alive]) if alive.any() else np.zeros(0)
        lo = min(np.floor(np.log10(1.0 / max(self.rows, 1))), -1.0)  # a non-empty range even for 0-1 rows
        counts, edges = np.histogram(log_d, bins=bins, range=(float(lo), 0.0))
        return {"log10_edges": edges.tolist(), "counts": counts.tolist(), "dead": int((~alive).sum())}

    def phi_sv(self) -> np.ndarray:
        """float64 [d_sae, V]: the phi coefficient (Pearson correlation of two binary variables) between
        "the latent fires" and "the row has this attribute value", over the analysed rows."""
        n = float(self.rows)
        f = self.fire_count_s[:, None].astype(np.float64)
        v = self.attr_total_v[None, :].astype(np.float64)
        c = self.attr_fire_sv.astype(np.float64)
        den = np.sqrt(f * (n - f) * v * (n - v))
        with np.errstate(invalid="ignore", divide="ignore"):
            phi = (n * c - f * v) / den
        return np.where(den > 0, phi, 0.0)


# ---------------------------------------------------------------------------------- labels

_KIND_PHRASE = {"train_input": "train input grids", "train_output": "train output grids",
                "test_input": "the test input", "answer": "answer grids", "none": "non-grid tokens"}


def _value_phrase(attribute: str, value: str) -> str:
    if attribute == "colour":
        return f"colour {value}"
    if attribute == "row":
        return "first row" if value == "0" else f"row {value}"
    if attribute == "col":
        return "first column" if value == "0" else f"column {value}"
    if attribute == "grid_kind":
        return _KIND_PHRASE[value]
    if attribute == "position":
        return f"prompt positions {value}"
    colour, kind = value.split("@")
    return f"colour {colour} in {_KIND_PHRASE[kind]}"


@dataclasses.dataclass(frozen=True)
class Label:
    """A candidate label: the attribute value whose indicator best correlates with the latent's firing."""

    text: str  # e.g. "colour 3 in answer grids", "first row"; "unclear" when nothing correlates
    attribute: str  # a key of ATTRIBUTES, or "" when unclear
    value: str  # the value name within the attribute
    phi: float  # correlation of firing with the value's indicator, in [-1, 1]
    precision: float  # P(value | fires)
    recall: float  # P(fires | value)


def label_features(stats: FeatureStats, min_phi: float = 0.3, prefer_simple_margin: float = 0.05) -> list[Label]:
    """One candidate label per latent.

    The best value by phi among the single attributes wins; the colour x grid
    kind conjunction replaces it only when its phi is higher by more than
    `prefer_simple_margin` (a feature for colour 3 everywhere stays "colour 3").
    Below `min_phi` the label is "unclear (best: ...)".
    """
    phi_sv = stats.phi_sv()
    names = [(a, v) for a, values in ATTRIBUTES.items() for v in values]
    conj_lo = _OFFSETS["colour_in_kind"]
    labels = []
    for s in range(phi_sv.shape[0]):
        if stats.fire_count_s[s] == 0:
            labels.append(Label("dead", "", "", 0.0, 0.0, 0.0))
            continue
        single = int(np.argmax(phi_sv[s, :conj_lo]))
        conj = conj_lo + int(np.argmax(phi_sv[s, conj_lo:]))
        best = conj if phi_sv[s, conj] > phi_sv[s, single] + prefer_simple_margin else single
        attribute, value = names[best]
        c = float(stats.attr_fire_sv[s, best])
        precision = c / float(stats.fire_count_s[s])
        recall = c / float(max(stats.attr_total_v[best], 1))
        phrase = _value_phrase(attribute, value)
        phi = float(phi_sv[s, best])
        text = phrase if phi >= min_phi else f"unclear (best: {phrase}, phi {phi:.2f})"
        labels.append(Label(text, attribute if phi >= min_phi else "", value if phi >= min_phi else "", phi,
                            precision, recall))
    return labels


# ---------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalAccumulator:
    """Model-free reconstruction metrics over held-out rows, accumulated chunk by chunk.

    Definitions (all over the rows seen, in float64):
      L0 = mean over rows of the number of latents > 0;
      FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean(x) the per-dimension mean over the rows;
      explained variance = 1 - FVU (`arcstream.sae.architectures.fvu_and_explained_variance`, the one
      definition: the trainer's batch metric and this held-out one are the same quantity).
    The denominator is accumulated as sum x^2 - (sum x)^2 / n per dimension, so one pass suffices.
    """

    d_in: int

    def __post_init__(self) -> None:
        self.rows = 0
        self.l0_sum = 0.0
        self.err_sq = 0.0
        self.x_sum_d = np.zeros(self.d_in, np.float64)
        self.x_sq_d = np.zeros(self.d_in, np.float64)

    def update(self, x_nd: np.ndarray, x_hat_nd: np.ndarray, acts_ns: np.ndarray) -> None:
        x = np.asarray(x_nd, np.float64)
        self.rows += x.shape[0]
        self.l0_sum += float((np.asarray(acts_ns) > 0).sum())
        self.err_sq += float(((x - np.asarray(x_hat_nd, np.float64)) ** 2).sum())
        self.x_sum_d += x.sum(0)
        self.x_sq_d += (x * x).sum(0)

    def result(self) -> dict[str, float]:
        if self.rows == 0:
            return {"rows": 0, "l0": float("nan"), "fvu": float("nan"), "explained_variance": float("nan"),
                    "mse": float("nan")}
        total = float((self.x_sq_d - self.x_sum_d ** 2 / self.rows).sum())
        fvu, ev = fvu_and_explained_variance(self.err_sq, total) if total > 0 else (float("nan"), float("nan"))
        return {"rows": self.rows, "l0": self.l0_sum / self.rows, "fvu": fvu, "explained_variance": ev,
                "mse": self.err_sq / (self.rows * self.d_in)}
