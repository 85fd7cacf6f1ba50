"""The activation store: TensorStore zarr3 arrays, token metadata, prompt table, commit manifest.

Writers (one per process) append rows and commit; readers see exactly the
committed rows as one logical array per site. The on-disk format is
documented in docs/FORMAT.md. This package knows nothing of the model or of
JAX distributed: the run job does its own barriers and calls
`write_manifest` on process 0.
"""

from arcstream.store.layout import (DTYPES, FORMAT_VERSION, TOKEN_FIELDS, ConfigMismatchError, RunLocation,
                                    StoreError, StoreWriteError)
from arcstream.store.manifest import (Ledger, Manifest, ProcessCommit, StoreLayout, config_diff,
                                      config_fingerprint, read_manifest, write_manifest)
from arcstream.store.reader import RunReader, open_run
from arcstream.store.writer import StoreWriter

__all__ = [
    "DTYPES", "FORMAT_VERSION", "TOKEN_FIELDS", "ConfigMismatchError", "Ledger", "Manifest", "ProcessCommit",
    "RunLocation", "RunReader", "StoreError", "StoreLayout", "StoreWriteError", "StoreWriter", "config_diff",
    "config_fingerprint", "open_run", "read_manifest", "write_manifest",
]
