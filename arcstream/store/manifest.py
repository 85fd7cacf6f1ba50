"""The commit records: each process's ledger and the run-level manifest.

A row counts only once a commit record says it is durable. Each writer
process, after awaiting all of its writes, replaces its own ledger
(`ledger/pNNNNN.json`); after a barrier, process 0 merges the ledgers into
`manifest.json`. Readers and resumes trust only the manifest, so a process
that crashed between its data writes and the manifest leaves nothing visible:
its extra rows are simply overwritten when the (deterministic, idempotent)
steps are rerun.

Both records carry the config fingerprint (sha256 of the canonical JSON of the
resolved config) and the store layout; reopening with a different config
raises `ConfigMismatchError` with the differing keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from arcstream.store.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, ConfigMismatchError, ledger_key
from arcstream.io import RunLocation, StoreError, canonical_json, config_diff


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the resolved config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """What every process of a run must agree on; fixed when the run is created."""

    sites: dict[str, int]  # site name -> d, in storage order
    dtype: str  # activation dtype: bfloat16 | float16 | float32
    rows_per_shard: int  # rows per shard file (and per token chunk)
    rows_per_chunk: int  # rows per inner chunk of an activation shard (the unit of a read)
    process_count: int
    config_fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {"sites": dict(self.sites), "dtype": self.dtype, "rows_per_shard": self.rows_per_shard,
                "rows_per_chunk": self.rows_per_chunk, "process_count": self.process_count,
                "config_fingerprint": self.config_fingerprint}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str) -> "StoreLayout":
        try:
            return cls(sites={str(k): int(v) for k, v in d["sites"].items()}, dtype=str(d["dtype"]),
                       rows_per_shard=int(d["rows_per_shard"]), rows_per_chunk=int(d["rows_per_chunk"]),
                       process_count=int(d["process_count"]), config_fingerprint=str(d["config_fingerprint"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise StoreError(f"{source}: missing or malformed layout field ({err!r}); the file is damaged "
                             "or was not written by arcstream") from err

    def check_matches(self, requested: "StoreLayout", source: str) -> None:
        """Raises `ConfigMismatchError` listing every layout field that differs."""
        diffs = [f"  {k}: stored={v!r}, requested={requested.to_json()[k]!r}"
                 for k, v in self.to_json().items()
                 if k != "config_fingerprint" and canonical_json(v) != canonical_json(requested.to_json()[k])]
        if diffs:
            raise ConfigMismatchError(
                f"{source} was written with a different store layout:\n" + "\n".join(diffs) +
                "\nUse a new output_dir, or rerun with the stored settings to resume.")


@dataclasses.dataclass(frozen=True)
class ProcessCommit:
    """What one process has made durable: its first `rows` rows and its prompt segments.

    Invariant: `prompts == sum(count for _, count in prompt_segments)`, and every
    prompt index referenced by the first `rows` token rows is in those segments.
    """

    process_index: int
    step: int  # steps completed: a resumed run starts at this step
    rows: int  # durable rows of this process's arrays (rows [0, rows) of each)
    prompts: int  # prompts in the prompt table segments below
    prompt_segments: tuple[tuple[str, int], ...]  # (key relative to the run dir, prompts in it)
    extra: dict[str, Any]  # what the run job passed to commit(), e.g. counters

    def to_json(self) -> dict[str, Any]:
        return {"process_index": self.process_index, "step": self.step, "rows": self.rows,
                "prompts": self.prompts, "prompt_segments": [list(s) for s in self.prompt_segments],
                "extra": self.extra}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str) -> "ProcessCommit":
        try:
            return cls(process_index=int(d["process_index"]), step=int(d["step"]), rows=int(d["rows"]),
                       prompts=int(d["prompts"]),
                       prompt_segments=tuple((str(k), int(n)) for k, n in d["prompt_segments"]),
                       extra=dict(d.get("extra", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{source}: malformed process commit record ({err!r}); the file is damaged "
                             "or was not written by arcstream") from err


def _check_format(d: Any, source: str) -> None:
    if not isinstance(d, Mapping) or d.get("format") != FORMAT_NAME:
        raise StoreError(f"{source} is not an arcstream commit record (format={d.get('format') if isinstance(d, Mapping) else d!r}, "
                         f"expected {FORMAT_NAME!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{source} has format_version={d.get('format_version')!r}; this arcstream reads "
                         f"format_version={FORMAT_VERSION}. Use the arcstream version that wrote it.")


@dataclasses.dataclass(frozen=True)
class Ledger:
    """One process's commit record (`ledger/pNNNNN.json`), replaced atomically by `commit()`."""

    layout: StoreLayout
    commit: ProcessCommit

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.layout.to_json(),
                **self.commit.to_json()}

    @classmethod
    def from_json(cls, d: Any, source: str) -> "Ledger":
        _check_format(d, source)
        return cls(StoreLayout.from_json(d, source), ProcessCommit.from_json(d, source))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The run-level commit record (`manifest.json`): exactly which rows are durable.

    Invariant: every process committed the same `step`; process p's durable rows
    are rows `[0, processes[p].rows)` of its arrays, and the logical array of a
    site is those ranges concatenated in process order.
    """

    layout: StoreLayout
    step: int
    processes: tuple[ProcessCommit, ...]  # indexed by process_index

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.processes)

    @property
    def sites(self) -> dict[str, int]:
        return dict(self.layout.sites)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.layout.to_json(),
                "step": self.step, "rows": self.rows, "processes": [p.to_json() for p in self.processes]}

    @classmethod
    def from_json(cls, d: Any, source: str) -> "Manifest":
        _check_format(d, source)
        layout = StoreLayout.from_json(d, source)
        try:
            processes = tuple(ProcessCommit.from_json(p, f"{source} processes[{i}]")
                              for i, p in enumerate(d["processes"]))
            step = int(d["step"])
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{source}: malformed manifest ({err!r})") from err
        if len(processes) != layout.process_count or [p.process_index for p in processes] != list(range(len(processes))):
            raise StoreError(f"{source}: lists processes {[p.process_index for p in processes]}, expected "
                             f"0..{layout.process_count - 1}; the file is damaged")
        return cls(layout, step, processes)


def read_manifest(location: RunLocation) -> Manifest | None:
    d = location.read_json(MANIFEST_FILE)
    return None if d is None else Manifest.from_json(d, f"{location.url.rstrip('/')}/{MANIFEST_FILE}")


def read_ledger(location: RunLocation, process_index: int) -> Ledger | None:
    key = ledger_key(process_index)
    d = location.read_json(key)
    return None if d is None else Ledger.from_json(d, f"{location.url.rstrip('/')}/{key}")


def write_manifest(run_dir: str | RunLocation, process_count: int) -> Manifest:
    """Merges every process's ledger into `manifest.json` (atomically). Process 0 calls it after a barrier.

    Call it only once every process's `commit()` of the same step has returned
    (that is what the barrier guarantees): the ledgers must agree on step,
    layout and config fingerprint, or this raises and leaves the old manifest.
    Idempotent: calling it again with the same ledgers writes the same bytes.
    """
    location = run_dir if isinstance(run_dir, RunLocation) else RunLocation(run_dir)
    ledgers = []
    for p in range(process_count):
        ledger = read_ledger(location, p)
        if ledger is None:
            raise StoreError(f"{location.url}: no ledger for process {p} of {process_count} ({ledger_key(p)}); "
                             "call write_manifest only after every process's commit() has returned (barrier)")
        ledgers.append(ledger)
    layout = ledgers[0].layout
    if layout.process_count != process_count:
        raise StoreError(f"{location.url}: ledgers were written with process_count={layout.process_count}, "
                         f"write_manifest was called with process_count={process_count}")
    for p, ledger in enumerate(ledgers[1:], start=1):
        if ledger.layout != layout:
            raise ConfigMismatchError(f"{location.url}: process {p}'s ledger disagrees with process 0's on the "
                                      f"layout or config: {ledger.layout.to_json()} vs {layout.to_json()}")
    steps = [ledger.commit.step for ledger in ledgers]
    if len(set(steps)) != 1:
        raise StoreError(f"{location.url}: the processes' ledgers are at different steps {steps}; "
                         "write_manifest must be called after every process committed the same step (barrier)")
    manifest = Manifest(layout, steps[0], tuple(ledger.commit for ledger in ledgers))
    location.write_json_atomic(MANIFEST_FILE, manifest.to_json())
    return manifest
