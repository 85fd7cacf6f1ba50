"""ARC tasks: schema and validation, sources, augmentation, grid encoders, prompts, Grain pipeline."""

from arcstream.data.task import InvalidTask, Pair, Skipped, SkipLog, Task, grid_from_json, task_from_challenge_json, task_from_pairs
from arcstream.data.records import EncodedPrompt, PackedBatch, PromptInfo
from arcstream.data.sources import ACCEPTED_FORMS, TaskSource, open_source, task_from_row
