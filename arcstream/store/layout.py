"""Where a run's files live, what each array looks like, and how small files are committed.

A run directory (a local path or any TensorStore kvstore URL) holds:

    config.json                        resolved config (process 0, at creation)
    manifest.json                      the run-level commit record (process 0, after each barrier)
    ledger/p00000.json                 one process's commit record (its own rows, step, prompt segments)
    activations/<site>/p00000/         zarr3 [rows, d], sharding codec, one array per (site, process)
    tokens/<field>/p00000/             zarr3 [rows], one array per (token field, process)
    prompts/p00000/000000.jsonl        prompt table segments, one per commit that added prompts

Every process owns the arrays named after it, so two processes never write the
same shard and no locking is needed. docs/FORMAT.md documents the layout for
readers that do not use arcstream.

`RunLocation` hides the two kinds of location: local directories (atomic JSON
replacement by temp file + fsync + rename + directory fsync) and kvstore URLs
(`gs://`, `s3://`, `memory://`, ...), where a single-key write is atomic
already. All TensorStore objects share one `ts.Context` so that a `memory://`
run written in a process can be read back in the same process.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT_NAME = "arcstream-store"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"

# Token metadata written row for row with the activations, and its on-disk dtype.
# `prompt` is the global prompt index, `position` the position within the prompt;
# the cell fields come from arcstream.data.records.CELL_FIELDS (-1 = none, grid_kind 0 = none).
TOKEN_FIELDS: dict[str, np.dtype] = {
    "prompt": np.dtype(np.int32),
    "position": np.dtype(np.int32),
    "token_id": np.dtype(np.int32),
    "grid_kind": np.dtype(np.int8),
    "pair_index": np.dtype(np.int8),
    "row": np.dtype(np.int8),
    "col": np.dtype(np.int8),
    "colour": np.dtype(np.int8),
}

DTYPES = ("bfloat16", "float16", "float32")

# The shared context: one memory:// namespace per Python process (tests), and one
# set of TensorStore thread pools.
CONTEXT = ts.Context()


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a store dtype name (`bfloat16` is `ml_dtypes.bfloat16`)."""
    if name not in DTYPES:
        raise ValueError(f"store dtype={name!r} is not supported; expected one of {DTYPES}")
    return ts.dtype(name).numpy_dtype


def process_name(process_index: int) -> str:
    return f"p{process_index:05d}"


def activation_key(site: str, process_index: int) -> str:
    return f"activations/{site}/{process_name(process_index)}"


def token_key(field: str, process_index: int) -> str:
    return f"tokens/{field}/{process_name(process_index)}"


def ledger_key(process_index: int) -> str:
    return f"ledger/{process_name(process_index)}.json"


def prompt_segment_key(process_index: int, segment: int) -> str:
    return f"prompts/{process_name(process_index)}/{segment:06d}.jsonl"


def check_site_name(site: str) -> None:
    """Site names become directory names: refuse the ones that would escape or collide."""
    if not isinstance(site, str) or not site or "/" in site or "\\" in site or site.startswith("."):
        raise ValueError(
            f"site name {site!r} cannot be stored: it becomes a directory name under activations/, "
            "so it must be a non-empty string without '/' or '\\' that does not start with '.' "
            "(e.g. 'blocks.11.hook_resid_post')")


def activation_metadata(d: int, dtype: str, rows_per_shard: int, rows_per_chunk: int,
                        site: str, process_index: int) -> dict[str, Any]:
    """zarr3 metadata of one activation array: `[rows, d]`, a shard = `rows_per_shard` rows.

    The sharding codec keeps the file count low (one file per shard) while readers
    still fetch `rows_per_chunk`-row pieces. No compression: activations in
    bf16 barely compress and the writer must keep up with the forward pass.
    """
    return {
        "shape": [0, d],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows_per_shard, d]}},
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [rows_per_chunk, d],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            },
        }],
        "fill_value": 0,
        "dimension_names": ["row", "d"],
        "attributes": {"arcstream": {"kind": "activations", "site": site, "process_index": process_index}},
    }


def token_metadata(field: str, rows_per_shard: int, process_index: int) -> dict[str, Any]:
    """zarr3 metadata of one token-metadata array: `[rows]`, one zstd chunk per shard of rows."""
    dtype = TOKEN_FIELDS[field]
    return {
        "shape": [0],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows_per_shard]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
        "fill_value": -1,
        "dimension_names": ["row"],
        "attributes": {"arcstream": {"kind": "tokens", "field": field, "process_index": process_index}},
    }


class StoreError(RuntimeError):
    """A run directory cannot be written or read as asked; the message says why and what to do."""


class StoreWriteError(StoreError):
    """Writing failed (full disk, permissions, network). Committed rows are untouched."""


class ConfigMismatchError(StoreError):
    """The run directory was written by a different config (or store layout)."""


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "a file size limit was hit", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def explain_os_error(err: BaseException) -> str:
    """A short human cause for an OSError, or for a TensorStore error carrying its text."""
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        return f"{_DISK_ERRNOS[err.errno]} ({err})"
    text = str(err)
    for code, why in _DISK_ERRNOS.items():
        if os.strerror(code) in text:
            return f"{why} ({text})"
    return f"{type(err).__name__}: {text}"


class RunLocation:
    """A run directory: a local path (or `file://` URL) or a TensorStore kvstore URL.

    Small files (JSON, JSONL) go through `read_bytes` / `write_bytes_atomic`;
    arrays get their kvstore spec from `kvstore(key)`. Invariant: a reader of
    any key sees either the previous complete value or the new complete value,
    never a partial file.
    """

    def __init__(self, url_or_path: str | os.PathLike):
        text = os.fspath(url_or_path)
        if not text:
            raise ValueError("output_dir is empty: give a local directory or a kvstore URL such as gs://bucket/run")
        self.url = text
        if text.startswith("file://"):
            text = text[len("file://"):]
        if "://" in text:
            self.local: Path | None = None
            try:
                base = ts.KvStore.Spec(text if text.endswith("/") else text + "/").to_json()
            except Exception as err:  # TensorStore raises ValueError with its own wording
                raise ValueError(f"output_dir={url_or_path!r} is not a TensorStore kvstore URL "
                                 f"(e.g. gs://bucket/run, memory://run, file:///abs/dir): {err}") from err
            self._base_spec = base
            self._kvstore: ts.KvStore | None = None
        else:
            self.local = Path(text).expanduser().absolute()
            self._base_spec = {"driver": "file", "path": str(self.local) + "/"}
            self._kvstore = None

    def __repr__(self) -> str:
        return f"RunLocation({self.url!r})"

    def kvstore(self, key: str) -> dict[str, Any]:
        """The kvstore spec of a sub-directory (for `ts.open`), with a trailing '/'."""
        spec = dict(self._base_spec)
        spec["path"] = spec.get("path", "") + key.rstrip("/") + "/"
        return spec

    def _kv(self) -> ts.KvStore:
        if self._kvstore is None:
            self._kvstore = ts.KvStore.open(self._base_spec, context=CONTEXT).result()
        return self._kvstore

    def ensure_writable(self) -> None:
        """Creates a local run directory and proves it writable, with an error that says what to fix."""
        if self.local is None:
            return  # object stores: the first write reports permissions
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            probe = self.local / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise StoreWriteError(
                f"output_dir {str(self.local)!r} is not writable: {explain_os_error(err)}. "
                "Choose a directory you can write to (--config.output_dir=...) or fix its permissions.") from err

    def exists(self, key: str) -> bool:
        return self.read_bytes(key) is not None

    def remove_temporaries(self, *keys: str) -> None:
        """Deletes the temporary files a killed `write_bytes_atomic` left beside these keys (local runs only;
        a kvstore write leaves none). They were never renamed into place, so nothing reads them."""
        if self.local is None:
            return
        for key in keys:
            target = self.local / key
            for tmp in target.parent.glob(f".{target.name}.tmp-*"):
                tmp.unlink(missing_ok=True)

    def read_bytes(self, key: str) -> bytes | None:
        """The content of a small file, or None when it does not exist."""
        if self.local is not None:
            try:
                return (self.local / key).read_bytes()
            except FileNotFoundError:
                return None
            except NotADirectoryError:
                return None
        result = self._kv().read(key).result()
        return None if result.state == "missing" else bytes(result.value)

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StoreError(f"{self.url}/{key} is not valid JSON ({err}); the run directory is damaged "
                             "or was not written by arcstream") from err

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        """Replaces a small file so that readers never see a partial one.

        Local: write `.<name>.tmp-*` beside it, fsync, rename over the target,
        fsync the directory (so the rename itself survives a power cut). A
        failure removes the temporary file and leaves the old content in place.
        kvstore URLs: one kvstore write, which is atomic per key.
        """
        if self.local is None:
            try:
                self._kv().write(key, data).result()
            except Exception as err:
                raise StoreWriteError(f"writing {self.url.rstrip('/')}/{key} failed: {explain_os_error(err)}. "
                                      "Committed rows are intact; fix the cause and rerun the same command "
                                      "to resume.") from err
            return
        target = self.local / key
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_and_fsync(tmp, data)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as err:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreWriteError(f"writing {target} failed: {explain_os_error(err)}. The previous "
                                  f"{target.name} (and every committed row) is intact; fix the cause and "
                                  "rerun the same command to resume.") from err

    def delete(self, key: str) -> None:
        """Removes a small file if it exists (a stale output that would mislead a reader)."""
        if self.local is not None:
            (self.local / key).unlink(missing_ok=True)
            return
        self._kv().delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()

    def write_json_atomic(self, key: str, obj: Any) -> None:
        self.write_bytes_atomic(key, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def is_url(path: str | os.PathLike) -> bool:
    """True for a kvstore URL (`gs://...`, `memory://...`, also `file://...`), False for a plain path."""
    return "://" in os.fspath(path)


def join_location(base: str | os.PathLike, *parts: str) -> str | Path:
    """`base/part/...`: a plain path stays a `Path`; a URL is joined with '/' and stays a string.

    (`Path("gs://b/run")` would collapse the '//' and turn the URL into a relative path.)
    """
    if not is_url(base):
        return Path(base).joinpath(*parts)
    return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])


def file_location(path: str | os.PathLike) -> tuple[RunLocation, str]:
    """(the location of the folder holding `path`, the file's key in it), for one small file."""
    text = os.fspath(path)
    if not is_url(text):
        p = Path(text)
        return RunLocation(p.parent), p.name
    folder, _, name = text.rstrip("/").rpartition("/")
    if not name or not is_url(folder):
        raise ValueError(f"{text!r} names no file inside a kvstore URL (expected e.g. gs://bucket/run/metrics.jsonl)")
    return RunLocation(folder), name


def _write_and_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prompt_to_json(info: Any) -> dict[str, Any]:
    """One prompt table line (a `arcstream.data.records.PromptInfo` as JSON)."""
    return {"prompt_index": int(info.prompt_index), "task_id": str(info.task_id),
            "test_index": int(info.test_index), "augmentation": info.augmentation,
            "answer_start": int(info.answer_start),
            "token_ids": np.asarray(info.token_ids).astype(np.int64).tolist()}
