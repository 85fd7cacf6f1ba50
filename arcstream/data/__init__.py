"""ARC tasks: schema and validation, sources, augmentation, grid encoders, prompts, Grain pipeline.

The names below are imported from their modules on first use (PEP 562), so a job that needs only
`arcstream.data.skipped` (every job's skipped.jsonl, through arcstream.store) does not import the
tokenizers' transformers and torch: ~1.9 s of train_sae's start-up on a 2-core CPU.
"""

import importlib

_EXPORTS = {
    "arcstream.data.task": ("InvalidTask", "Pair", "Skipped", "SkipLog", "Task", "grid_from_json",
                            "task_from_challenge_json", "task_from_pairs"),
    "arcstream.data.records": ("EncodedPrompt", "PackedBatch", "PromptInfo"),
    "arcstream.data.sources": ("ACCEPTED_FORMS", "TaskSource", "open_source", "task_from_row"),
    "arcstream.data.augment": ("TRANSFORMS", "AugmentConfig", "Augmentation", "sample_augmentations"),
    "arcstream.data.encoders": ("DEFAULT_SPEC", "DecodeError", "GridEncoder", "get_encoder"),
    "arcstream.data.prompts": ("TEMPLATES", "PromptConfig", "build_prompt", "decode_answer"),
    "arcstream.data.pipeline": ("Pipeline", "PipelineOptions", "build_pipeline", "default_data_config",
                                "make_pipeline", "make_prompter", "prompt_index_of", "split_prompt_index"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'arcstream.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
