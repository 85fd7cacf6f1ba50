"""Orbax checkpoints of the SAE trainer: params, optimizer state, buffers, step
(and the offline trainer's Grain iterator).

Saved as `ocp.args.Composite(state=StandardSave(tree), data=grain CheckpointSave)`.
Site names contain dots, which Orbax would read as path separators, so the saved
tree names sites `site0, site1, ...` in sorted order (the site list is fixed by the
config that the resumed run must repeat). The data iterator goes through Grain's
own handler, which writes one file per process (JsonSave would keep only process 0's).
Restoring needs a template state (same specs): shapes, dtypes and shardings come
from it, so a restored state lands on the mesh as the template does.

The directory is a local path (or `file://` URL) or an object-store URL that
`etils.epath` knows (`gs://`, `s3://`, `az://`): Orbax writes its small files
through epath and the arrays through TensorStore (as MaxText does for `gs://`).
Other kvstore URLs (`memory://`) cannot hold Orbax checkpoints: `checkpoint_path`
(`arcstream.io`) refuses them with an error naming the flag to set.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from arcstream.io import checkpoint_path, resume_refusal
from arcstream.options import ConfigError
from arcstream.sae.train import SiteState, TrainState


def _to_tree(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "sites": {
            f"site{i}": {"params": s.params, "opt_state": s.opt_state, "buffers": s.buffers}
            for i, (_, s) in enumerate(sorted(state.sites.items()))
        },
    }


def _from_tree(tree: dict[str, Any], template: TrainState) -> TrainState:
    sites = {
        name: SiteState(**tree["sites"][f"site{i}"]) for i, name in enumerate(sorted(template.sites))
    }
    return TrainState(sites=sites, step=tree["step"])


class SAECheckpointer:
    """Save/restore a TrainState (and optionally a Grain iterator) under `directory`
    (a local path, or a gs:// / s3:// / az:// URL: see `checkpoint_path`)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, flag: str = "checkpoint directory",
                 fingerprint: dict[str, Any] | None = None):
        """`fingerprint`: what a resumed run must repeat (JSON), saved with every step and compared on restore,
        which refuses another configuration with the differing keys (the online run leaves it None: its
        store's config check covers its SAEs)."""
        self.directory = checkpoint_path(directory, flag)
        self.fingerprint = fingerprint
        try:
            self._mgr = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
            )
        except ImportError as err:  # e.g. fsspec without gcsfs for gs://
            raise ImportError(f"{flag}={str(self.directory)!r}: writing Orbax checkpoints there needs a file "
                              f"system package for its URL scheme (gs://: pip install gcsfs): {err}") from err

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def delete_newer_than(self, step: int) -> list[int]:
        """Deletes every checkpoint step after `step` (an attempt killed between its SAE save and the store's
        commit leaves one: it is not what the commit records, and Orbax's max_to_keep would keep it over
        the resumed run's own saves); returns the deleted steps."""
        orphans = sorted(s for s in self._mgr.all_steps() if s > step)
        for s in orphans:
            self._mgr.delete(s)
        return orphans

    def save(self, state: TrainState, data_iter: grain.DatasetIterator | None = None, *, wait: bool = True) -> None:
        """Save at `state.step` and wait until it is on disk (a kill afterwards loses nothing).

        `wait=False` returns once the arrays are copied to host (the state may be used or
        donated then) and writes in the background; `close` waits for it.
        """
        args = {"state": ocp.args.StandardSave(_to_tree(state))}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if self.fingerprint is not None:
            args["meta"] = ocp.args.JsonSave({"fingerprint": self.fingerprint})
        self._mgr.save(int(state.step), args=ocp.args.Composite(**args), force=True)
        if wait:
            self._mgr.wait_until_finished()

    def restore(
        self, template: TrainState, data_iter: grain.DatasetIterator | None = None, step: int | None = None
    ) -> TrainState:
        """The state saved at `step` (default: latest); `data_iter` is set to its saved position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"SAECheckpointer.restore: no checkpoint under {self.directory}")
        if self.fingerprint is not None:
            self._check_fingerprint(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
        args = {"state": ocp.args.StandardRestore(abstract)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mgr.restore(step, args=ocp.args.Composite(**args))
        return _from_tree(restored["state"], template)

    def _check_fingerprint(self, step: int) -> None:
        try:
            saved = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (KeyError, ValueError, FileNotFoundError):  # no meta item: a checkpoint of an older arcstream
            saved = None
        refusal = resume_refusal(self.directory, step, saved, self.fingerprint,
                                 "delete it or use another checkpoint directory")
        if refusal:
            raise ConfigError(refusal)

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
