"""One process's writer: host buffer -> whole-shard asynchronous TensorStore writes -> ledger.

Performance contract: `append` copies the rows into a host buffer and, for
every shard the buffer completes, issues one whole-shard write per array
(a TensorStore future) and returns. It blocks only for the small metadata
update that grows the arrays, and when more than `max_pending_bytes` of
writes are still in flight (backpressure: the caller slows to disk speed,
nothing is dropped). Partial writes into a shared shard rewrite the whole
shard file (measured 5-60x slower), so the only partial-shard write is the
tail at `commit`, done once, in a single transaction over every array; the
tail stays in the buffer and is rewritten whole when its shard fills.

Durability contract: rows count only once a commit record says so. `commit`
awaits every write, replaces this process's ledger atomically and (with a
single process) the manifest; with several processes the run job calls
`write_manifest` on process 0 after a barrier. Reopening a run resumes at the
manifest's rows: anything written after it is overwritten by the rerun steps,
which are deterministic, so the finished store equals an uninterrupted one.

Not thread-safe: appends and commits must never overlap. The run job appends
from its drain thread and commits from the main thread only after joining the
drain (`DrainQueue.join`), so one thread at a time touches the writer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from arcstream.store.layout import CONFIG_FILE, DTYPES, MANIFEST_FILE, TOKEN_FIELDS, ConfigMismatchError, activation_key, activation_metadata, check_site_name, ledger_key, numpy_dtype, prompt_segment_key, prompt_to_json, token_key, token_metadata
from arcstream.io import CONTEXT, RunLocation, StoreError, StoreWriteError, explain_os_error
from arcstream.store.manifest import (Ledger, Manifest, ProcessCommit, StoreLayout, canonical_json, config_diff,
                                      config_fingerprint, read_ledger, read_manifest, write_manifest)


@dataclasses.dataclass
class _Array:
    """One zarr3 array this process owns, and its host buffer for the shard being filled.

    `buf` holds rows [base, base + rows_per_shard) of the array; the writer's
    `_fill` says how many are valid. Appended rows are copied (and cast) once,
    straight into `buf`; a full `buf` is handed to TensorStore as a whole-shard
    write and replaced by a fresh one, so a buffer is never written while
    TensorStore may still read it.
    """

    name: str  # e.g. "activations/blocks.0.hook_resid_post" or "tokens/prompt"
    key: str  # path relative to the run directory
    store: ts.TensorStore  # replaced by the handle each resize returns
    dtype: np.dtype
    width: int | None  # d for activations, None for 1-D token arrays
    rows_per_shard: int
    buf: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        self.new_buffer()

    def new_buffer(self) -> None:
        shape = (self.rows_per_shard,) if self.width is None else (self.rows_per_shard, self.width)
        self.buf = np.empty(shape, self.dtype)


@dataclasses.dataclass
class _Pending:
    future: Any  # ts.Future
    nbytes: int
    what: str


_RESERVE_SHARDS = 16  # how far ahead of the rows an array's extent may grow between commits


class StoreWriter:
    """Writes one process's share of a run: activations per site, token metadata, prompt table.

    Build it with `StoreWriter.create_or_resume(...)`. Invariants: every array of
    this process has the same row count; rows `[0, durable_rows)` are exactly
    what the last commit record says; `rows >= durable_rows` counts what has
    been appended since (durable only after the next `commit`).
    """

    def __init__(self, *, location: RunLocation, layout: StoreLayout, process_index: int,
                 arrays: dict[str, _Array], durable: ProcessCommit, known_prompts: set[int],
                 max_pending_bytes: int):
        self.location = location
        self.layout = layout
        self.process_index = process_index
        self.max_pending_bytes = max_pending_bytes
        self._arrays = arrays
        self._durable = durable
        self._known_prompts = known_prompts
        self._new_prompts: list[dict[str, Any]] = []
        self._rows = durable.rows
        self._shape = durable.rows  # current row extent of every array
        S = layout.rows_per_shard
        self._base = (durable.rows // S) * S  # first buffered row: always a shard boundary
        self._tail_end = durable.rows  # rows already on disk through a tail write
        self._pending: collections.deque[_Pending] = collections.deque()
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------ open

    @classmethod
    def create_or_resume(cls, output_dir: str, *, sites: Mapping[str, int], config: Mapping[str, Any],
                         dtype: str = "bfloat16", process_index: int = 0, process_count: int = 1,
                         rows_per_shard: int = 4096, rows_per_chunk: int | None = None,
                         max_pending_bytes: int = 1 << 30) -> "StoreWriter":
        """Opens this process's writer on a new run, or on an existing one at its committed rows.

        `output_dir`: a local path or a TensorStore kvstore URL (`gs://...`,
        `file://...`, `memory://...`). `sites`: site name -> d, in storage
        order. `config`: the resolved config as plain JSON data; its
        fingerprint is recorded, and reopening with a different one raises
        `ConfigMismatchError` listing the differing keys. `rows_per_shard`:
        rows per shard file; `rows_per_chunk` (default: the largest divisor of
        rows_per_shard up to 256; must divide it): the unit a reader fetches.
        A resumed writer is positioned at the manifest's rows for this process;
        `resume_step` says where the run continues.
        """
        _check_args(sites, dtype, process_index, process_count, rows_per_shard, rows_per_chunk,
                    max_pending_bytes)
        if rows_per_chunk is None:
            rows_per_chunk = _default_rows_per_chunk(rows_per_shard)
        location = RunLocation(output_dir)
        location.ensure_writable()
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict of the resolved config (ConfigDict.to_dict()), got {type(config).__name__}")
        config = _plain_json(config, "config")
        layout = StoreLayout(dict(sites), dtype, rows_per_shard, rows_per_chunk, process_count,
                             config_fingerprint(config))
        manifest = _check_or_record_config(location, layout, config, process_index)
        if manifest is not None:
            durable = manifest.processes[process_index]
            durable = dataclasses.replace(durable, step=manifest.step)
        else:
            durable = ProcessCommit(process_index, 0, 0, 0, (), {})
        arrays = _open_arrays(location, layout, process_index, durable.rows)
        _remove_temporaries(location, process_index)
        known = _read_prompt_indices(location, durable)
        writer = cls(location=location, layout=layout, process_index=process_index, arrays=arrays,
                     durable=durable, known_prompts=known, max_pending_bytes=max_pending_bytes)
        writer._reload_tail()
        return writer

    def _reload_tail(self) -> None:
        """On resume mid-shard, reads back the committed rows of the open shard so it can be rewritten whole."""
        if self._rows == self._base:
            return
        futures = {name: a.store[self._base:self._rows].read() for name, a in self._arrays.items()}
        for name, future in futures.items():
            try:
                self._arrays[name].buf[: self._rows - self._base] = np.asarray(future.result())
            except Exception as err:
                raise StoreError(f"{self.location.url}: cannot read back committed rows "
                                 f"[{self._base}, {self._rows}) of {self._arrays[name].key}: {err}. "
                                 "The run directory is damaged.") from err

    # ------------------------------------------------------------------ state

    @property
    def sites(self) -> dict[str, int]:
        return dict(self.layout.sites)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def rows(self) -> int:
        """Rows appended by this process so far (durable or not)."""
        return self._rows

    @property
    def durable_rows(self) -> int:
        """Rows of this process that the last commit made durable."""
        return self._durable.rows

    @property
    def resume_step(self) -> int:
        """The step the run continues from: the `step` of the last commit (0 for a new run)."""
        return self._durable.step

    @property
    def last_commit(self) -> ProcessCommit:
        return self._durable

    @property
    def pending_bytes(self) -> int:
        """Bytes of issued writes not yet finished (the backpressure measure)."""
        self._reap()
        return sum(p.nbytes for p in self._pending)

    @property
    def buffered_rows(self) -> int:
        """Rows held on host since the last shard boundary (at most one shard plus the last append)."""
        return self._rows - self._base

    # ------------------------------------------------------------------ append

    def append(self, site_rows: Mapping[str, np.ndarray], tokens: Mapping[str, np.ndarray],
               prompts: Sequence[Any] = ()) -> None:
        """Buffers `N` rows (activations per site, token metadata) and the prompts they belong to.

        `site_rows[site]`: float `[N, d]` for every site; `tokens[field]`: integer
        `[N]` for every field of `TOKEN_FIELDS`; `prompts`: the
        `arcstream.data.records.PromptInfo` of every prompt first seen in this
        batch (each prompt index once per process; every `tokens['prompt']`
        value must name a prompt appended so far). The arrays are copied, so
        the caller may reuse them. Completed shards are written asynchronously.
        """
        self._check_usable()
        converted, n = self._validate(site_rows, tokens)
        self._register_prompts(prompts, converted["tokens/prompt"])
        S = self.layout.rows_per_shard
        done = 0
        while done < n:
            fill = self._rows - self._base
            take = min(S - fill, n - done)
            for name, data in converted.items():
                self._arrays[name].buf[fill:fill + take] = data[done:done + take]  # the one copy (and cast)
            self._rows += take
            done += take
            if self._rows - self._base == S:
                self._flush_full_shard()
        self.wait(self.max_pending_bytes)

    def _validate(self, site_rows: Mapping[str, np.ndarray],
                  tokens: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        sites = self.layout.sites
        if set(site_rows) != set(sites):
            raise ValueError(f"append: site_rows has sites {sorted(site_rows)}, this store expects exactly "
                             f"{sorted(sites)} (missing {sorted(set(sites) - set(site_rows))}, unexpected "
                             f"{sorted(set(site_rows) - set(sites))})")
        if set(tokens) != set(TOKEN_FIELDS):
            raise ValueError(f"append: tokens has fields {sorted(tokens)}, expected exactly {list(TOKEN_FIELDS)} "
                             f"(missing {sorted(set(TOKEN_FIELDS) - set(tokens))}, unexpected "
                             f"{sorted(set(tokens) - set(TOKEN_FIELDS))})")
        out: dict[str, np.ndarray] = {}
        n: int | None = None
        dt = numpy_dtype(self.layout.dtype)
        for site, d in sites.items():
            x = np.asarray(site_rows[site])
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"append: site_rows[{site!r}] has shape {x.shape}, expected [N, {d}]")
            if not (np.issubdtype(x.dtype, np.floating) or x.dtype == dt):
                raise ValueError(f"append: site_rows[{site!r}] has dtype {x.dtype}, expected a float dtype")
            if n is None:
                n = x.shape[0]
            elif x.shape[0] != n:
                raise ValueError(f"append: site_rows[{site!r}] has {x.shape[0]} rows, the first site has {n}")
            out[f"activations/{site}"] = x
        assert n is not None
        for field, fdt in TOKEN_FIELDS.items():
            t = np.asarray(tokens[field])
            if t.shape != (n,):
                raise ValueError(f"append: tokens[{field!r}] has shape {t.shape}, expected ({n},) (one per row)")
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"append: tokens[{field!r}] has dtype {t.dtype}, expected integers")
            info = np.iinfo(fdt)
            if n and (t.min() < info.min or t.max() > info.max):
                raise ValueError(f"append: tokens[{field!r}] has values in [{t.min()}, {t.max()}], "
                                 f"outside the stored {fdt} range [{info.min}, {info.max}]")
            if field in ("prompt", "position") and n and t.min() < 0:
                raise ValueError(f"append: tokens[{field!r}] has a negative value {t.min()}; padding rows "
                                 "must not be stored")
            out[f"tokens/{field}"] = t
        return out, n

    def _register_prompts(self, prompts: Sequence[Any], prompt_rows: np.ndarray) -> None:
        new: dict[int, dict[str, Any]] = {}
        for info in prompts:
            try:
                record = prompt_to_json(info)
                canonical_json(record["augmentation"], "prompt augmentation record")
            except AttributeError as err:
                raise TypeError(f"append: prompts must be arcstream.data.records.PromptInfo, got "
                                f"{type(info).__name__} ({err})") from err
            index = record["prompt_index"]
            if index < 0:
                raise ValueError(f"append: prompt_index={index} (task {record['task_id']!r}) must be >= 0")
            if index in self._known_prompts or index in new:
                raise ValueError(f"append: prompt {index} (task {record['task_id']!r}) was already appended by "
                                 f"process {self.process_index}; pass each prompt once, with its first rows")
            new[index] = record
        unknown = set(np.unique(prompt_rows).tolist()) - self._known_prompts - set(new)
        if unknown:
            raise ValueError(f"append: tokens['prompt'] names prompts {sorted(unknown)[:10]} that were never "
                             "passed in `prompts`; pass each prompt's PromptInfo with its first rows")
        self._known_prompts.update(new)
        self._new_prompts.extend(new.values())

    # ------------------------------------------------------------------ writes

    def _grow(self, end: int) -> None:
        """Makes every array at least `end` rows long (metadata-only resizes, all arrays concurrently).

        Grows by up to `_RESERVE_SHARDS` shards beyond `end` so that most shard
        writes need no metadata update; `commit` trims the extent back to the
        exact row count, so a finished run's arrays are exactly its rows long.
        """
        if end <= self._shape:
            return
        S = self.layout.rows_per_shard
        if end % S:  # the tail at a commit: exact
            self._set_extent(end)
            return
        ahead = max(end, min(2 * self._shape, self._shape + _RESERVE_SHARDS * S))
        self._set_extent(-(-ahead // S) * S)

    def _set_extent(self, rows: int) -> None:
        futures = {name: a.store.resize(exclusive_max=[rows] + ([None] if a.width else []),
                                        resize_metadata_only=True)
                   for name, a in self._arrays.items()}
        for name, future in futures.items():
            try:
                self._arrays[name].store = future.result()
            except Exception as err:
                self._fail(err, f"resizing {self._arrays[name].key} to {rows} rows")
        self._shape = rows

    def _flush_full_shard(self) -> None:
        """Writes the full shard [base, base + S) of every array: one whole-shard write each, not awaited."""
        S = self.layout.rows_per_shard
        lo = self._base
        self._grow(lo + S)
        for a in self._arrays.values():
            try:
                future = a.store[lo:lo + S].write(a.buf).commit
            except Exception as err:
                self._fail(err, f"writing rows [{lo}, {lo + S}) of {a.key}")
            self._pending.append(_Pending(future, a.buf.nbytes, f"rows [{lo}, {lo + S}) of {a.key}"))
            a.new_buffer()
        self._base = lo + S

    def _write_tail(self) -> None:
        """Writes rows [base, rows) of every array in one transaction (the only partial-shard write)."""
        if self._rows == self._base or self._tail_end == self._rows:
            return
        self._grow(self._rows)
        fill = self._rows - self._base
        txn = ts.Transaction()
        writes, nbytes = [], 0
        for a in self._arrays.values():
            # a view of the live buffer: safe because commit awaits this write before returning
            writes.append((a.key, a.store.with_transaction(txn)[self._base:self._rows].write(a.buf[:fill])))
            nbytes += a.buf[:fill].nbytes
        for key, w in writes:
            try:
                w.result()  # staged in the transaction (in memory)
            except Exception as err:
                self._fail(err, f"staging rows [{self._base}, {self._rows}) of {key}")
        self._pending.append(_Pending(txn.commit_async(), nbytes,
                                      f"the tail rows [{self._base}, {self._rows}) of every array"))
        self._tail_end = self._rows

    def _reap(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._await(self._pending.popleft())

    def _await(self, p: _Pending) -> None:
        try:
            p.future.result()
        except Exception as err:
            self._fail(err, f"writing {p.what}")

    def wait(self, max_pending_bytes: int = 0) -> None:
        """Blocks until at most `max_pending_bytes` of issued writes are unfinished (0: all done)."""
        self._check_usable()
        self._reap()
        total = sum(p.nbytes for p in self._pending)
        while self._pending and total > max_pending_bytes:
            p = self._pending.popleft()
            total -= p.nbytes
            self._await(p)

    def _fail(self, err: BaseException, what: str) -> None:
        self._failed = StoreWriteError(
            f"{self.location.url}: process {self.process_index}: {what} failed: {explain_os_error(err)}. "
            f"Committed rows (step {self._durable.step}, {self._durable.rows} rows of this process) are intact; "
            "fix the cause (free disk space, permissions) and rerun the same command to resume from them.")
        self._failed.__cause__ = err
        raise self._failed

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StoreWriteError(f"this writer failed earlier and cannot continue: {self._failed}") from self._failed

    # ------------------------------------------------------------------ commit

    def commit(self, step: int, extra: Mapping[str, Any] | None = None) -> ProcessCommit:
        """Makes every row appended so far durable and records `step` (steps completed).

        Order (each waits for the one before): tail write and all pending shard
        writes; this commit's prompt table segment; the ledger (atomic
        replace); with a single process, the manifest. With several processes
        the run job calls `write_manifest(output_dir, process_count)` on
        process 0 once every process's `commit` returned (barrier); until then
        readers and resumes see the previous manifest.

        Cost: a rewrite of the partial last shard of every array plus a few
        small fsynced files, about 0.1 s on the 2-core dev VM
        (benchmarks/bench_store.py --commit_every=1): commit every
        `rows_per_shard` rows or more, or every few seconds, not every batch.
        """
        self._check_usable()
        if not isinstance(step, (int, np.integer)) or step < self._durable.step:
            raise ValueError(f"commit: step={step!r} must be an int >= the last committed step "
                             f"{self._durable.step} (steps only move forward)")
        extra = _plain_json(extra or {}, "commit extra")
        self._write_tail()
        self.wait(0)
        if self._shape != self._rows:
            self._set_extent(self._rows)  # plain zarr readers of a finished run see exactly its rows
        segments = self._durable.prompt_segments
        if self._new_prompts:
            key = prompt_segment_key(self.process_index, len(segments))
            body = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in self._new_prompts)
            self._call_io(lambda: self.location.write_bytes_atomic(key, body.encode()), f"writing {key}")
            segments = segments + ((key, len(self._new_prompts)),)
        commit = ProcessCommit(self.process_index, int(step), self._rows,
                               self._durable.prompts + len(self._new_prompts), segments, extra)
        ledger = Ledger(self.layout, commit)
        key = ledger_key(self.process_index)
        self._call_io(lambda: self.location.write_json_atomic(key, ledger.to_json()), f"writing {key}")
        self._new_prompts = []
        self._durable = commit
        if self.layout.process_count == 1:
            self._call_io(lambda: write_manifest(self.location, 1), "writing manifest.json")
        return commit

    def _call_io(self, fn, what: str) -> None:
        try:
            fn()
        except StoreWriteError as err:
            self._failed = err
            raise
        except Exception as err:
            self._fail(err, what)

    def close(self) -> None:
        """Waits for in-flight writes; does not commit (uncommitted rows stay invisible)."""
        if self._failed is None:
            self.wait(0)


# ---------------------------------------------------------------------- helpers


def _check_args(sites, dtype, process_index, process_count, rows_per_shard, rows_per_chunk, max_pending_bytes):
    if not isinstance(sites, Mapping) or not sites:
        raise ValueError(f"sites={sites!r}: expected a non-empty dict of site name -> d")
    for site, d in sites.items():
        check_site_name(site)
        if not isinstance(d, (int, np.integer)) or d <= 0:
            raise ValueError(f"sites[{site!r}]={d!r}: expected a positive int width d")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES} (store.dtype)")
    if not (isinstance(process_count, int) and process_count >= 1):
        raise ValueError(f"process_count={process_count!r}: expected an int >= 1")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index!r}: expected an int in [0, {process_count})")
    if not (isinstance(rows_per_shard, int) and rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard={rows_per_shard!r}: expected an int >= 1")
    if rows_per_chunk is not None and not (isinstance(rows_per_chunk, int) and rows_per_chunk >= 1
                                           and rows_per_shard % rows_per_chunk == 0):
        raise ValueError(f"rows_per_chunk={rows_per_chunk!r}: expected a positive int dividing "
                         f"rows_per_shard={rows_per_shard}")
    if max_pending_bytes < 0:
        raise ValueError(f"max_pending_bytes={max_pending_bytes}: expected >= 0")


def _default_rows_per_chunk(rows_per_shard: int) -> int:
    """The largest divisor of `rows_per_shard` up to 256 (a chunk must tile its shard)."""
    rows_per_chunk = min(256, rows_per_shard)
    while rows_per_shard % rows_per_chunk:
        rows_per_chunk -= 1
    return rows_per_chunk


def _plain_json(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`obj` as JSON reads it back (plain dicts, lists, str, int, float, bool, None), so what is recorded equals
    what a reader gets; ValueError naming `what` when it is not JSON-serialisable."""
    return json.loads(canonical_json(dict(obj), what))


def _check_or_record_config(location: RunLocation, layout: StoreLayout, config: dict[str, Any],
                            process_index: int) -> Manifest | None:
    """Refuses a store written under another config or layout, records the config of a new one (process 0), and
    returns the manifest (None before the first commit).

    The config file gives the differing keys; a manifest or ledger without it (a damaged or partly written
    store) can only say that the fingerprints differ.
    """
    where = location.url.rstrip("/")
    stored_config = location.read_json(CONFIG_FILE)
    if stored_config is not None and config_fingerprint(stored_config) != layout.config_fingerprint:
        raise ConfigMismatchError(
            f"{where} holds a store written by a different config; differing keys:\n"
            + "\n".join(config_diff(stored_config, config))
            + "\nUse a new output_dir, or rerun with the stored config to resume.")
    manifest = read_manifest(location)
    for record, source in ((manifest, "manifest.json"), (read_ledger(location, process_index),
                                                          ledger_key(process_index))):
        if record is None:
            continue
        record.layout.check_matches(layout, f"{where}/{source}")
        if record.layout.config_fingerprint != layout.config_fingerprint:
            raise ConfigMismatchError(
                f"{where}/{source} was written by a different config (fingerprint "
                f"{record.layout.config_fingerprint[:12]}..., requested {layout.config_fingerprint[:12]}...) and "
                f"{CONFIG_FILE} is missing, so the differing keys cannot be shown. Use a new output_dir.")
    if process_index == 0 and stored_config is None:
        location.write_json_atomic(CONFIG_FILE, config)
    return manifest


def _remove_temporaries(location: RunLocation, process_index: int) -> None:
    """Removes the temporaries of this process's small files (process 0: also the config and manifest):
    a kill between writing a small file's temporary and renaming it leaves the temporary behind."""
    segments = prompt_segment_key(process_index, 0).rsplit("/", 1)[0] + "/*"  # any of this process's segments
    location.remove_temporaries(ledger_key(process_index), segments,
                                *((CONFIG_FILE, MANIFEST_FILE) if process_index == 0 else ()))


def _open_arrays(location: RunLocation, layout: StoreLayout, process_index: int, durable_rows: int) -> dict[str, _Array]:
    """Creates this process's arrays (new run), or opens them trimmed to the durable rows (resume).

    Trimming deletes shards wholly beyond the durable rows, so a resumed run
    leaves no stale files behind; rows past `durable_rows` in the open shard
    are overwritten before they become visible again.
    """
    specs: dict[str, tuple[str, dict[str, Any], np.dtype, int | None]] = {}
    for site, d in layout.sites.items():
        meta = activation_metadata(d, layout.dtype, layout.rows_per_shard, layout.rows_per_chunk, site, process_index)
        specs[f"activations/{site}"] = (activation_key(site, process_index), meta, numpy_dtype(layout.dtype), d)
    for field, fdt in TOKEN_FIELDS.items():
        specs[f"tokens/{field}"] = (token_key(field, process_index),
                                    token_metadata(field, layout.rows_per_shard, process_index), fdt, None)
    futures = {}
    for name, (key, meta, _, _) in specs.items():
        spec = {"driver": "zarr3", "kvstore": location.kvstore(key)}
        if durable_rows == 0:
            futures[name] = ts.open({**spec, "metadata": meta}, create=True, delete_existing=True, context=CONTEXT)
        else:
            futures[name] = ts.open(spec, open=True, context=CONTEXT)
    arrays = {}
    for name, future in futures.items():
        key, meta, dt, width = specs[name]
        try:
            store = future.result()
        except Exception as err:
            if durable_rows == 0:
                raise StoreWriteError(f"creating {location.url.rstrip('/')}/{key} failed: {explain_os_error(err)}. "
                                      "Check that output_dir is writable and has free space.") from err
            raise StoreError(f"{location.url.rstrip('/')}/{key}: the manifest says {durable_rows} rows are durable "
                             f"but the array cannot be opened ({err}); the run directory is damaged") from err
        if durable_rows:
            shape = tuple(store.shape)
            if store.dtype.numpy_dtype != dt or (width is not None and shape[1] != width) or shape[0] < durable_rows:
                raise StoreError(f"{location.url.rstrip('/')}/{key} has dtype {store.dtype.name}, shape {shape}; "
                                 f"the manifest expects dtype {dt}, at least {durable_rows} rows"
                                 + (f" of width {width}" if width else "") + "; the run directory is damaged")
            if shape[0] > durable_rows:
                store = store.resize(exclusive_max=[durable_rows] + ([None] if width else []),
                                     shrink_only=True).result()
        arrays[name] = _Array(name, key, store, dt, width, layout.rows_per_shard)
    return arrays


def _read_prompt_indices(location: RunLocation, durable: ProcessCommit) -> set[int]:
    known: set[int] = set()
    for key, count in durable.prompt_segments:
        data = location.read_bytes(key)
        lines = [] if data is None else data.decode().splitlines()
        if len(lines) != count:
            raise StoreError(f"{location.url.rstrip('/')}/{key}: expected {count} prompt lines, found {len(lines)}; "
                             "the run directory is damaged")
        known.update(json.loads(line)["prompt_index"] for line in lines)
    return known
