"""The activation store: TensorStore zarr3 arrays, token metadata, prompt table, commit manifest.

Writers (one per process) append rows and commit; readers see exactly the
committed rows as one logical array per site. The on-disk format is
documented in docs/FORMAT.md. This package knows nothing of the model or of
JAX distributed: the run job does its own barriers and calls
`write_manifest` on process 0. `lock` is the run lock every job holds on the
directory it writes; `skipped` the `skipped.jsonl` writer every job shares.
"""

from arcstream.store.layout import DTYPES, FORMAT_VERSION, TOKEN_FIELDS, ConfigMismatchError
from arcstream.io import RunLocation, StoreError, StoreWriteError
from arcstream.store.manifest import (Ledger, Manifest, ProcessCommit, StoreLayout, config_diff,
                                      config_fingerprint, read_manifest, write_manifest)
from arcstream.store.lock import RunLock, RunLockedError, acquire_run_lock, check_run_lock
from arcstream.store.reader import RunReader, open_run
from arcstream.data.skipped import SKIPPED_FILE, SkippedLog, merge_skipped
from arcstream.store.writer import StoreWriter

__all__ = [
    "DTYPES", "FORMAT_VERSION", "SKIPPED_FILE", "TOKEN_FIELDS", "ConfigMismatchError", "Ledger", "Manifest",
    "ProcessCommit", "RunLocation", "RunLock", "RunLockedError", "RunReader", "SkippedLog", "StoreError",
    "StoreLayout", "StoreWriteError", "StoreWriter", "acquire_run_lock", "check_run_lock", "config_diff",
    "config_fingerprint", "merge_skipped", "open_run", "read_manifest", "write_manifest",
]
