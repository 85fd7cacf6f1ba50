"""The offline trainer's data: a Grain pipeline over stored activations.

The trainer sees only `ActivationSource`: an object with `.sites` and
`.activations(site)` returning a lazily sliceable [N, d_in] array-like (the
store's reader, a NumPy array, a TensorStore array). Rows are aligned across
sites (row i of every site is the same token).

Mixing: the store holds each prompt's tokens contiguously, so a batch of
consecutive rows would come from one or two prompts. The pipeline reads
`chunk_rows` consecutive rows at a time (one cheap contiguous read), visits the
chunks in a global random order (a Grain `MapDataset.shuffle`, reshuffled each
epoch: a shuffle over the whole store rather than a bounded buffer), gathers
`batch_size / chunk_rows` chunks into a batch and permutes its rows. With
batch 4096 and chunks of 64 rows a batch mixes up to 64 prompts from anywhere.
Everything is a function of (seed, batch index), so a resumed iterator
(Grain state: a few integers) yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np


class ActivationSource(Protocol):
    """What the offline trainer reads: `sites` and `activations(site)` -> sliceable [N, d_in]."""

    @property
    def sites(self) -> Sequence[str]: ...

    def activations(self, site: str) -> Any: ...


class InMemorySource:
    """An `ActivationSource` over in-memory arrays (tests, small experiments)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = dict(arrays)
        rows = {s: a.shape[0] for s, a in self._arrays.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"InMemorySource: sites have different row counts {rows}; rows must align")

    @property
    def sites(self) -> list[str]:
        return list(self._arrays)

    def activations(self, site: str) -> np.ndarray:
        return self._arrays[site]


class _ReadBatch(grain.transforms.RandomMap):
    """Read a batch's chunks for every site and permute its rows (same permutation for all sites)."""

    def __init__(self, source: ActivationSource, sites: Sequence[str], chunk_rows: int):
        self._arrays = {s: source.activations(s) for s in sites}
        self._chunk_rows = chunk_rows

    def random_map(self, chunk_ids, rng: np.random.Generator):
        c = self._chunk_rows
        ids = np.asarray(chunk_ids).reshape(-1)
        perm = None
        out = {}
        for site, arr in self._arrays.items():
            parts = [np.asarray(arr[int(i) * c:(int(i) + 1) * c], dtype=np.float32) for i in ids]
            x_nd = np.concatenate(parts, axis=0)
            if perm is None:
                perm = rng.permutation(x_nd.shape[0])
            out[site] = x_nd[perm]
        return out


def batch_dataset(
    source: ActivationSource,
    sites: Sequence[str],
    batch_size: int,
    *,
    chunk_rows: int = 64,
    seed: int = 0,
) -> grain.MapDataset:
    """Infinite MapDataset of {site: float32 [batch_size, d_in]} batches (see module docstring).

    Rows past the last whole chunk are not used (at most chunk_rows - 1 rows).
    """
    if not sites:
        raise ValueError("batch_dataset: no sites given")
    missing = [s for s in sites if s not in set(source.sites)]
    if missing:
        raise ValueError(f"batch_dataset: sites {missing} are not in the source; it has {list(source.sites)}")
    if batch_size <= 0 or chunk_rows <= 0 or batch_size % chunk_rows:
        raise ValueError(
            f"batch_dataset: batch_size={batch_size} must be a positive multiple of chunk_rows={chunk_rows}"
        )
    rows = {s: int(source.activations(s).shape[0]) for s in sites}
    if len(set(rows.values())) > 1:
        raise ValueError(f"batch_dataset: sites have different row counts {rows}; rows must align across sites")
    n = next(iter(rows.values()))
    n_chunks = n // chunk_rows
    per_batch = batch_size // chunk_rows
    if n_chunks < per_batch:
        raise ValueError(
            f"batch_dataset: the source has {n} rows, fewer than one batch of {batch_size} "
            f"(in chunks of {chunk_rows}); lower sae.batch_size or capture more tokens"
        )
    ds = grain.MapDataset.range(n_chunks).shuffle(seed=seed).repeat(None)
    ds = ds.batch(per_batch, drop_remainder=True)
    return ds.random_map(_ReadBatch(source, sites, chunk_rows), seed=seed)
