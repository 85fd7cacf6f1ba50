"""Run directories, local or kvstore URL, and the small-file I/O every job shares.

A run directory is a local path (or `file://` URL) or any TensorStore kvstore
URL (`gs://`, `s3://`, `memory://`, ...). `RunLocation` hides the difference:
small files (JSON, JSONL, Markdown, HTML) go through `read_bytes` and
`write_bytes_atomic`, arrays get their kvstore spec from `kvstore(key)`.
Invariant: a reader of any key sees the previous complete value or the new
complete value, never a partial file. Local: temp file beside the target
(unique name) + fsync + rename + directory fsync; kvstore: one write, atomic
per key. `checkpoint_path`/`checkpoint_dir` say where Orbax may write (a
local path or gs://, s3://, az://; not memory://). `JsonlLog` is the one JSONL metrics/log writer of every job;
`truncate_metrics` cuts one back to the step a resumed run restarts from.
All TensorStore objects share one `ts.Context` (`CONTEXT`) so that a
`memory://` run written in a process can be read back in the same process.

Paths: `join_location` joins without breaking URLs (`Path("gs://b/run")`
collapses the '//'); `file_location` splits one file's path or URL; `local_folder`
lends a local directory to writers that need one and uploads it to a URL.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorstore as ts
from etils import epath

def process_name(process_index: int) -> str:
    """The per-process part of a key (`p00003`): store arrays, ledgers, skip logs."""
    return f"p{process_index:05d}"


# The shared context: one memory:// namespace per Python process (tests), and one
# set of TensorStore thread pools.
CONTEXT = ts.Context()


class StoreError(RuntimeError):
    """A run directory cannot be written or read as asked; the message says why and what to do."""


class StoreWriteError(StoreError):
    """Writing failed (full disk, permissions, network). Committed rows are untouched."""


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


# URL schemes etils.epath (hence Orbax) can write; gs:// needs gcsfs (or TensorFlow) installed.
EPATH_SCHEMES = ("gs://", "s3://", "az://")


def checkpoint_path(directory: str | os.PathLike, flag: str = "checkpoint directory") -> Path | epath.Path:
    """The Orbax directory for `directory`: an absolute local `Path`, or an `epath.Path` for an object-store URL.

    `flag` names the setting in errors (e.g. `--config.sae.checkpoint_dir`).
    """
    text = os.fspath(directory).removeprefix("file://")
    if "://" not in text:
        return Path(text).expanduser().absolute()
    if not text.startswith(EPATH_SCHEMES):
        raise ValueError(
            f"{flag}={text!r}: Orbax checkpoints can go to a local path or a {', '.join(EPATH_SCHEMES)} URL, "
            f"not to {text.split('://')[0]}:// (TensorStore can write there, Orbax's file layer cannot); "
            f"set {flag} to a local directory or a gs:// URL")
    return epath.Path(text)

def checkpoint_dir(explicit: str, output_dir: str | os.PathLike, *parts: str, flag: str, output_flag: str,
                   hint: str = "") -> str:
    """Where a job's Orbax checkpoints go: `explicit` (the setting `flag`) when set, else `output_dir/parts...`.

    Raises ValueError when that is a URL Orbax cannot write (e.g. `memory://`), naming `flag` as the fix
    (and `output_flag`, the setting the default came from); `hint` is appended to that message.
    """
    if explicit:
        checkpoint_path(explicit, flag)
        return explicit
    default = str(join_location(output_dir, *parts))
    try:
        checkpoint_path(default, flag)
    except ValueError:
        raise ValueError(f"{output_flag}={os.fspath(output_dir)!r}: Orbax checkpoints cannot be written under it "
                         f"({default}); set {flag} to a local directory or a gs:// URL{hint}") from None
    return default


@contextlib.contextmanager
def local_folder(location: str | os.PathLike, *, upload: bool = True, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder whose files end up at `location`, for writers that need a real directory
    (`save_pretrained`, safetensors, matplotlib).

    A local path (or `file://` URL): the folder itself, created. A kvstore URL: a temporary folder
    whose files are written to the URL when the block ends without an error (each one atomically,
    sorted by name, the names in `last` after the rest, so a reader that waits for e.g. README.md
    finds the others there); then it is deleted. `upload=False` discards it (processes other than 0).
    """
    loc = RunLocation(location)
    if loc.local is not None:
        loc.local.mkdir(parents=True, exist_ok=True)
        yield loc.local
        return
    with tempfile.TemporaryDirectory(prefix="arcstream-stage-") as tmp:
        root = Path(tmp)
        yield root
        if upload:
            files = sorted((p for p in root.rglob("*") if p.is_file()),
                           key=lambda p: (p.relative_to(root).as_posix() in last, p.relative_to(root).as_posix()))
            for p in files:
                loc.write_bytes_atomic(p.relative_to(root).as_posix(), p.read_bytes())


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


class JsonlLog:
    """A JSONL file in a local directory or a kvstore URL, written as a trainer goes (offline and online SAEs).

    Records wait in memory until `flush()`. Local: they are appended (and
    fsynced with `fsync=True`); `appends` is true. A kvstore has no append, so
    there the file is kept in memory and rewritten whole at each `flush` (one
    atomic object write: readers see the old or the new file, never part of
    one). Either way a kill loses at most the lines after the last flush, and
    `truncate` drops lines past the step a resumed run restarts from.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False):
        self.path = path
        self.location, self.key = file_location(path)
        self.appends = self.location.local is not None
        self.fsync = fsync
        self._pending: list[str] = []
        self._whole: bytes | None = None  # kvstores: the file's content as last written

    def truncate(self, step: int, key: str = "step") -> None:
        truncate_metrics(self.path, step, key=key)
        self._whole = None

    def append(self, record: Mapping[str, Any]) -> None:
        self._pending.append(json.dumps(record) + "\n")

    def flush(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending).encode()
        if self.appends:
            path = self.location.local / self.key
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        else:
            if self._whole is None:
                self._whole = self.location.read_bytes(self.key) or b""
            self._whole += data
            self.location.write_bytes_atomic(self.key, self._whole)
        self._pending.clear()


def truncate_metrics(path: str | os.PathLike, step: int, key: str = "step") -> None:
    """Drop metrics.jsonl lines whose `key` is past the restored step (a resumed run writes them again).

    `path`: a local file or a file in a kvstore URL (`gs://bucket/run/metrics.jsonl`). Replaces the
    file atomically (`RunLocation.write_bytes_atomic`), so a kill here leaves the old file, never a
    half-written one.
    """
    location, name = file_location(path)
    data = location.read_bytes(name)
    if data is None:
        return
    keep = [ln for ln in data.decode().splitlines() if ln.strip() and json.loads(ln).get(key, 0) <= step]
    location.write_bytes_atomic(name, "".join(ln + "\n" for ln in keep).encode())


def canonical_json(obj: Any, what: str = "config") -> str:
    """Sorted, compact JSON: the byte string the fingerprint hashes."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the {what} must be JSON-serialisable (plain dicts, lists, str, int, float, bool, "
                         f"None; pass ConfigDict.to_dict()): {err}") from err


def flat_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted key: leaf value} (an empty mapping is a leaf)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key in obj:
            out.update(flat_keys(obj[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "<root>": obj}


def config_diff(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """One line per differing dotted key: `key: stored=... requested=...` (empty when equal): what a job
    refusing to resume under another configuration prints (the store, train_lm, train_sae, predict)."""
    a, b = flat_keys(stored), flat_keys(requested)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"  {key}: stored={a[key]!r}, requested=<absent>")
        elif key not in a:
            lines.append(f"  {key}: stored=<absent>, requested={b[key]!r}")
        elif canonical_json(a[key]) != canonical_json(b[key]):
            lines.append(f"  {key}: stored={a[key]!r}, requested={b[key]!r}")
    return lines


def resume_refusal(directory: Any, step: int, saved: Mapping[str, Any] | None, requested: Mapping[str, Any],
                   start_afresh: str) -> str | None:
    """Why checkpoint `step` of `directory` may not be resumed under the fingerprint `requested`, or None.

    `saved` is the checkpoint's meta item (None when it has none); its "fingerprint" must equal `requested`.
    `start_afresh` says how to start over instead (a flag). train_lm and train_sae raise the message as
    their one-line config error."""
    if saved is None or "fingerprint" not in saved:
        return (f"{directory} (step {step}) does not record the configuration it was trained with (written by an "
                f"older arcstream); {start_afresh} to start afresh")
    diff = config_diff(saved["fingerprint"], requested)
    if not diff:
        return None
    return (f"{directory} (step {step}) was trained with another configuration; rerun with the saved settings, or "
            f"{start_afresh} to start afresh. Differences:\n" + "\n".join(diff))


__all__ = ["CONTEXT", "EPATH_SCHEMES", "JsonlLog", "RunLocation", "StoreError", "StoreWriteError", "canonical_json",
           "checkpoint_dir", "checkpoint_path", "config_diff", "explain_os_error", "file_location", "fsync_dir",
           "is_url", "join_location", "local_folder", "resume_refusal", "truncate_metrics"]


def resume_fingerprint(resolved: Mapping[str, Any], progress_keys: Sequence[str]) -> dict[str, Any]:
    """The part of a resolved config that a resumed run must repeat: all of it but `progress_keys`.

    Every job ties its checkpoints or store to this, in the same direction: a key
    is part of the fingerprint unless it is named here as progress-only (how
    often to log or save, where checkpoints live, what to evaluate at the end),
    so a key added later is protected by default. `progress_keys` are dotted
    (`train.log_every`); an absent one is ignored. The result is a plain JSON
    copy (no ConfigDict, no tuples), comparable with what a checkpoint stored.
    """
    out = json.loads(json.dumps(dict(resolved)))
    for dotted in progress_keys:
        *parents, leaf = dotted.split(".")
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out
