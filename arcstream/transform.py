"""The transform job: any ARC task source -> Kaggle-layout JSON files.

    python -m arcstream.transform --config=configs/transform.py \\
        --config.source=hf:barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems \\
        --config.output_dir=DIR --config.max_tasks=1000

writes challenges.json, solutions.json, skipped.jsonl (and metadata.json when tasks carry metadata) in DIR
and prints a one-screen summary (items read, tasks written, skips by reason, grid-size histogram).

Flags and `main` only: the work is `arcstream.data.kaggle.transform` over the checked options
(`TransformOptions`, where every key is documented; configs/transform.py starts from its defaults).
"""

from __future__ import annotations

from arcstream import cli
from arcstream.data.kaggle import TransformOptions, TransformResult, transform

__all__ = ["TransformOptions", "TransformResult", "transform"]


def _job(options: TransformOptions) -> TransformResult:
    return transform(options, progress=cli.progress)


if __name__ == "__main__":
    # The flag is defined here (inside run_job), not at import, so tests and other
    # jobs can import this module without a clash over the global `--config` flag.
    cli.run_job("arcstream.transform", _job, check=TransformOptions.from_config)
