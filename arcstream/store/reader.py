"""Reading a run: one logical array per site over every process's arrays, only committed rows.

`open_run` reads `manifest.json` once; everything the reader returns is cut to
the rows that manifest declares durable, so a reader opened on a run in
progress (or on one that crashed) never sees half-written data. Reopen to
see later commits.

Performance contract: `activations(site)` is a lazy TensorStore view (a
virtual concatenation of the per-process arrays); reading it in slices of
many rows is efficient (one request per `rows_per_chunk`-row chunk); reading
single rows one by one is not — batch your indices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from arcstream.store.layout import CONFIG_FILE, MANIFEST_FILE, TOKEN_FIELDS, activation_key, numpy_dtype, token_key
from arcstream.io import CONTEXT, RunLocation, StoreError
from arcstream.store.manifest import Manifest, read_manifest

if TYPE_CHECKING:  # imported where used: `arcstream.data` pulls in transformers and torch (~7 s of start-up)
    from arcstream.data.records import PromptInfo


def open_run(run_dir: str) -> "RunReader":
    """Opens a run directory (local path or kvstore URL) at its last committed manifest."""
    location = RunLocation(run_dir)
    manifest = read_manifest(location)
    if manifest is None:
        raise StoreError(f"{run_dir}: no {MANIFEST_FILE}: nothing is committed yet (a run writes it at its first "
                         "commit), or this is not an arcstream run directory")
    config = location.read_json(CONFIG_FILE)
    if config is None:
        raise StoreError(f"{run_dir}: {MANIFEST_FILE} exists but {CONFIG_FILE} is missing; the run directory is damaged")
    return RunReader(location, manifest, config)


class RunReader:
    """A committed snapshot of a run: activations, token metadata and the prompt table.

    Invariant: row `i` of `activations(site)` (every site) and of every
    `tokens()` array describe the same token; rows of process 0 come first,
    then process 1's, and so on (`process_offsets`).
    """

    def __init__(self, location: RunLocation, manifest: Manifest, config: dict[str, Any]):
        self.location = location
        self.manifest = manifest
        self.config = config
        self._views: dict[str, ts.TensorStore] = {}

    @property
    def sites(self) -> dict[str, int]:
        """Site name -> width d, in storage order."""
        return self.manifest.sites

    @property
    def rows(self) -> int:
        """Committed rows over every process."""
        return self.manifest.rows

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.manifest.dtype)

    @property
    def process_offsets(self) -> np.ndarray:
        """int64 [process_count + 1]: process p's rows are [offsets[p], offsets[p+1]) of the logical arrays."""
        return np.concatenate([[0], np.cumsum([p.rows for p in self.manifest.processes])]).astype(np.int64)

    def __len__(self) -> int:
        return self.rows

    def _view(self, name: str, key_of, dtype: np.dtype, width: int | None) -> ts.TensorStore:
        if name in self._views:
            return self._views[name]
        futures = [(p.rows, key_of(p.process_index),
                    ts.open({"driver": "zarr3", "kvstore": self.location.kvstore(key_of(p.process_index))},
                            open=True, read=True, context=CONTEXT))
                   for p in self.manifest.processes if p.rows > 0]
        layers = []
        for rows, key, future in futures:
            try:
                store = future.result()
            except Exception as err:
                raise StoreError(f"{self.location.url.rstrip('/')}/{key}: cannot open ({err}); the manifest says "
                                 f"it holds {rows} committed rows, so the run directory is damaged") from err
            if store.shape[0] < rows or store.dtype.numpy_dtype != dtype:
                raise StoreError(f"{self.location.url.rstrip('/')}/{key} has shape {tuple(store.shape)}, dtype "
                                 f"{store.dtype.name}; the manifest expects >= {rows} rows of {dtype}")
            layers.append(store[:rows])
        if not layers:
            view = ts.array(np.zeros((0,) if width is None else (0, width), dtype))
        elif len(layers) == 1:
            view = layers[0]
        else:
            view = ts.concat(layers, axis=0)
        self._views[name] = view
        return view

    def activations(self, site: str) -> ts.TensorStore:
        """Lazy `[rows, d]` view of one site (read-only); `np.asarray(view[a:b])` reads rows a..b."""
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in this run; it stores {list(self.sites)}")
        return self._view(f"activations/{site}", lambda p: activation_key(site, p), self.dtype, self.sites[site])

    def token_array(self, field: str) -> ts.TensorStore:
        """Lazy `[rows]` view of one token-metadata field."""
        if field not in TOKEN_FIELDS:
            raise KeyError(f"token field {field!r} does not exist; fields are {list(TOKEN_FIELDS)}")
        return self._view(f"tokens/{field}", lambda p: token_key(field, p), TOKEN_FIELDS[field], None)

    def tokens(self, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Token metadata as NumPy arrays aligned with the activations: `prompt`, `position`,
        `token_id`, and the cell fields `grid_kind`, `pair_index`, `row`, `col`, `colour` (-1 = none)."""
        fields = list(TOKEN_FIELDS) if fields is None else list(fields)
        futures = {f: self.token_array(f).read() for f in fields}
        return {f: np.asarray(fut.result()) for f, fut in futures.items()}

    def prompts(self) -> dict[int, PromptInfo]:
        """The prompt table (prompt index -> PromptInfo), committed prompts only, sorted by index."""
        from arcstream.data.records import PromptInfo

        table: dict[int, PromptInfo] = {}
        for p in self.manifest.processes:
            for key, count in p.prompt_segments:
                data = self.location.read_bytes(key)
                lines = [] if data is None else data.decode().splitlines()
                if len(lines) != count:
                    raise StoreError(f"{self.location.url.rstrip('/')}/{key}: expected {count} prompt lines, found "
                                     f"{len(lines)}; the run directory is damaged")
                for line in lines:
                    r = json.loads(line)
                    table[r["prompt_index"]] = PromptInfo(
                        prompt_index=r["prompt_index"], task_id=r["task_id"], test_index=r["test_index"],
                        augmentation=r["augmentation"], token_ids=np.asarray(r["token_ids"], np.int32),
                        answer_start=r["answer_start"])
        return dict(sorted(table.items()))
