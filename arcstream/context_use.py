"""The context-use job: python -m arcstream.context_use --config=configs/context_use.py --config.model=M

Flags and `main` only: the work is `arcstream.lm.context_job.run_context_use` over the checked options
(`ContextUseOptions`, where every key is documented; configs/context_use.py starts from its defaults).
"""

from __future__ import annotations

from absl import logging

from arcstream import cli
from arcstream.lm.context_job import ContextUseOptions, ContextUseResult, run_context_use

__all__ = ["ContextUseOptions", "ContextUseResult", "run_context_use"]


def _job(options: ContextUseOptions) -> ContextUseResult:
    return run_context_use(options, log=logging.info)


if __name__ == "__main__":
    cli.run_job("arcstream.context_use", _job, check=ContextUseOptions.from_config)
