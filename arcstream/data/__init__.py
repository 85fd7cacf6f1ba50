"""ARC tasks: schema and validation, sources, augmentation, grid encoders, prompts, Grain pipeline."""

from arcstream.data.task import InvalidTask, Pair, Skipped, SkipLog, Task, grid_from_json, task_from_challenge_json, task_from_pairs
from arcstream.data.records import EncodedPrompt, PackedBatch, PromptInfo
from arcstream.data.sources import ACCEPTED_FORMS, TaskSource, open_source, task_from_row
from arcstream.data.augment import TRANSFORMS, AugmentConfig, Augmentation, sample_augmentations
from arcstream.data.encoders import DEFAULT_SPEC, DecodeError, GridEncoder, get_encoder
from arcstream.data.prompts import TEMPLATES, PromptConfig, build_prompt, decode_answer
from arcstream.data.pipeline import (Pipeline, PipelineOptions, build_pipeline, default_data_config, make_pipeline,
                                     make_prompter, prompt_index_of, split_prompt_index)
