"""Offline SAE training: python -m arcstream.train_sae --config=configs/train_sae.py --config.run_dir=DIR

Flags only; the work is `arcstream.sae.train_offline` over the checked options (`TrainSAEOptions` in
arcstream/sae/options.py, where every key is documented), run through `cli.run_job` like every entry point
(environment log, pod join, run lock, summary box). The activation source is the run directory's store
(`arcstream.store.open_run(DIR)`): only committed rows, so it also trains on a run still in progress. It
holds the run directory's `.train_sae.lock` (`arcstream.store.lock`): a second train_sae on the same
directory is refused, a capture still running there is not.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from arcstream import cli

# glibc serves every allocation over 32 MB with a fresh mmap, so each step of XLA:CPU's program
# page-faults its large temporaries in again, 4 KB at a time (measured: 168k faults and 0.65 s of
# system time per 2.6 s TopK step at d_sae 14336, batch 4096). With this tunable glibc asks for
# transparent huge pages on those mappings: ~1k faults, a 1.8 s step. It must be set before the
# process starts, so the entry point re-executes itself once with it; ARCSTREAM_HUGEPAGES=0 opts out.
_HUGETLB = "glibc.malloc.hugetlb=1"


def _reexec_with_huge_pages() -> None:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or os.environ.get("ARCSTREAM_HUGEPAGES", "1") == "0"
            or "glibc.malloc.hugetlb" in tunables):
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{_HUGETLB}" if tunables else _HUGETLB)
    os.execve(sys.executable, sys.orig_argv, env)  # the same interpreter options, module and flags


@dataclasses.dataclass
class TrainSAEResult:
    """train_offline's summary, as the summary box's rows."""

    summary: dict[str, Any]

    def summary_rows(self) -> list[tuple[str, str]]:
        s = self.summary
        if "stopped_at" in s:
            return [("stopped", f"after step {s['stopped_at']} of {s['total_steps']} (checkpoint saved): rerun "
                                "the same command to continue")]
        from arcstream.sae.offline import summary_rows  # not at import: the module re-executes itself first

        return summary_rows(s)


def _run_dir_lock(config: Any) -> tuple[str, str, bool]:
    """train_sae locks the run directory it reads and writes saes/ into; a missing one is not created."""
    if not config.run_dir:
        raise ValueError("--config.run_dir is required (the run directory holding the activation store)")
    return str(config.run_dir), "--config.run_dir", False


def check(config: Any) -> Any:
    # Imported here, not at the top: the module re-executes itself first, and `--help` needs no JAX.
    from arcstream.sae.options import TrainSAEOptions

    return TrainSAEOptions.from_config(config)  # every key checked before the lock and the store


def job(opts: Any) -> TrainSAEResult:
    from absl import logging

    from arcstream.sae import train_offline
    from arcstream.sae.offline import use_compilation_cache
    from arcstream.store import open_run  # the store is wired in at the entry point only (sae reads arrays)

    cache = use_compilation_cache(opts.compilation_cache_dir)
    if cache:
        logging.info("compilation cache  %s", cache)
    return TrainSAEResult(train_offline(opts, open_run(opts.run_dir), log=logging.info))


if __name__ == "__main__":
    _reexec_with_huge_pages()
    # One process: train_offline does not shard its data over a pod (a pod would train the same SAEs
    # on every host and write the same exports).
    cli.run_job("arcstream train_sae", job, lock=_run_dir_lock, check=check)
