"""Offline SAE training: python -m arcstream.train_sae --config=configs/train_sae.py --config.run_dir=DIR

Flags only; the work is `arcstream.sae.train_offline`. The activation source is
the run directory's store (`arcstream.store.open_run(DIR)`): only committed
rows, so it also trains on a run still in progress. It holds the run directory's
`.train_sae.lock` (`arcstream.store.lock`): a second train_sae on the same
directory is refused, a capture still running there is not.
"""

from __future__ import annotations

import os
import sys

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


def open_source(run_dir: str):
    """The run's activation store as an ActivationSource (`.sites`, `.activations(site)`)."""
    from arcstream.store import open_run  # the store is wired in at the entry point only (sae reads arrays, not the store)

    return open_run(run_dir)


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --config.<key>=<value> flag")
    config = flags.FLAGS.config
    if not config.run_dir:
        raise app.UsageError("--config.run_dir is required (the run directory holding the activation store)")
    cli.quiet_library_logs()
    cli.log_environment()
    from arcstream.sae import summary_lines, train_offline
    from arcstream.sae.offline import use_compilation_cache

    cache = use_compilation_cache(str(config.get("compilation_cache_dir", "") or ""))
    if cache:
        logging.info("compilation cache  %s", cache)

    with cli.job_lock(str(config.run_dir), "train_sae", flag="--config.run_dir", create=False):
        summary = train_offline(config, open_source(config.run_dir), log=logging.info)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} of {summary['total_steps']} (checkpoint saved)")
        return
    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    _reexec_with_huge_pages()
    from absl import app

    cli.define_config_flag()
    app.run(main)
