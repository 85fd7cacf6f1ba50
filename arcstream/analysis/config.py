"""The analysis job's options: every key of `configs/analyze.py` (and of the run job's `analyze_options`
section), its default and its meaning.

`AnalyzeOptions` is the one definition: its fields are the config keys, with their config types, defaults
and (in the field comments) their documentation. `AnalyzeOptions.from_config(config)` checks a whole config
once (`arcstream.options.from_section`: an unknown key or a mistyped value is refused naming
`--config.KEY`; then the checks of `__post_init__`), and `analysis.job.analyze` takes the frozen result.
`default_analyze_config()` is `section_of(AnalyzeOptions)`, what configs/analyze.py and the run job's
`analyze_options` start from, so a key added here reaches the standalone job and the analysis that ends a
run. The keys stay as a config writes them (`eval_rows='START:STOP'`, comma-separated `saes` and `sites`);
the job reads the parsed views `eval_range`, `sae_specs`, `site_names` and `attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from arcstream.model import attention_option, default_model_options
from arcstream.options import Section, from_config, section_field, section_of


def _comma_list(value: Any) -> Any:
    """A tuple or list of names (a library caller's form) as the config's comma-separated string."""
    if value is None:
        return ""
    return ",".join(str(v).strip() for v in value) if isinstance(value, (tuple, list)) else value


@dataclasses.dataclass(frozen=True)
class AnalyzeOptions:
    """A whole analysis config, checked: what `analysis.job.analyze` reads, and nothing else.

    Built directly (library callers, tests), `saes` and `sites` may also be given as tuples of names and
    `eval_rows` as a `(start, stop)` pair or None; they are kept in the config's string form."""

    run_dir: str = ""  # the run directory (local path or kvstore URL) (required)
    output_dir: str = ""  # where to write analysis/, dashboard/, report.md (local path or URL); "" = run_dir
    sae_dir: str = ""  # folder of SAELens exports, one sub-folder per site; "" = run_dir/saes
    # SAEs from outside the run, comma-separated SAELens folders (SAELens's own save_model output, a
    # Gemma Scope-style download, another run's export; local or URL) or SAELens releases,
    # sae_lens:RELEASE@SAE_ID (downloaded once, arcstream/sae/pretrained.py): each is analysed on the stored
    # site its cfg.json names (hook_name). "" = the run's own exports under sae_dir.
    saes: str = ""
    sites: str = ""  # comma-separated sites to analyse; "" = every stored site with an SAE export
    chunk_rows: int = 4096  # rows read and encoded at a time (memory ~ chunk_rows x d_sae x 4 bytes)
    max_rows: int = 0  # analyse only the first this-many committed rows; 0 = all
    eval_rows: str = ""  # held-out rows for L0/FVU, 'START:STOP'; "" = the last eval_fraction of the rows
    eval_fraction: float = 0.1  # fraction of rows (at the end) held out when eval_rows is ""
    top_k: int = 16  # top activating tokens kept per latent
    dense_density: float = 0.1  # a latent firing on more than this fraction of rows counts as dense
    dashboard_features: int = 64  # features with a dashboard page (best-labelled first); all get a list row
    examples_per_feature: int = 4  # distinct prompts drawn per feature page
    min_phi: float = 0.3  # a label needs at least this correlation (phi) with its attribute value
    invariance_groups: int = 32  # tasks stored under >= 2 augmentations used to judge invariance; 0 = off
    invariance_threshold: float = 0.5  # mean Jaccard overlap needed to call a feature invariant / equivariant
    ce_prompts: int = 8  # held-out prompts for CE loss recovered (runs the model); 0 = skip (no model needed)
    model: str = ""  # model for CE loss recovered (hub name or local dir); "" = the run's config.json model
    # .attention of the CE forward: auto | dense | blocked | splash | gpu (arcstream/model/attention.py)
    model_options: Section = section_field(default_model_options)
    ce_pad_to: int = 256  # prompts are padded to a multiple of this many tokens (fewer compiles)

    def __post_init__(self) -> None:
        # A library caller's forms, kept as the config writes them (as_dict(options) is a valid config).
        object.__setattr__(self, "saes", _comma_list(self.saes))
        object.__setattr__(self, "sites", _comma_list(self.sites))
        if self.eval_rows is None:
            object.__setattr__(self, "eval_rows", "")
        elif isinstance(self.eval_rows, (tuple, list)) and len(self.eval_rows) == 2:
            object.__setattr__(self, "eval_rows", f"{self.eval_rows[0]}:{self.eval_rows[1]}")
        if isinstance(self.model_options, (ml_collections.ConfigDict, Mapping)) and not isinstance(
                self.model_options, ml_collections.FrozenConfigDict):
            object.__setattr__(self, "model_options", ml_collections.FrozenConfigDict(self.model_options))
        if not self.run_dir:
            raise ValueError("--config.run_dir is empty; pass --config.run_dir=DIR (a run directory of "
                             "arcstream.run)")
        _ = self.eval_range  # a bad eval_rows is named now
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--config.eval_fraction={self.eval_fraction}; expected a fraction in [0, 1)")
        for name in ("chunk_rows", "top_k", "examples_per_feature"):
            if getattr(self, name) < 1:
                raise ValueError(f"--config.{name}={getattr(self, name)}; expected a positive integer")
        attention_option(self)  # a bad model_options.attention is named now

    @property
    def eval_range(self) -> tuple[int, int] | None:
        """`eval_rows` as the held-out [start, stop); None = the last `eval_fraction` of the rows."""
        spec = str(self.eval_rows).strip()
        if not spec:
            return None
        try:
            a, b = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ValueError(f"--config.eval_rows={spec!r}; expected 'START:STOP' row indices, e.g. '9000:10000', "
                             "or '' for the last eval_fraction of the rows") from None
        if not 0 <= a < b:
            raise ValueError(f"--config.eval_rows={spec!r}; expected 0 <= START < STOP")
        return a, b

    @property
    def sae_specs(self) -> tuple[str, ...]:
        """`saes` as a tuple of SAELens folders / sae_lens:RELEASE@SAE_ID specs; () = the run's own exports."""
        return tuple(s.strip() for s in self.saes.split(",") if s.strip())

    @property
    def site_names(self) -> tuple[str, ...]:
        """`sites` as a tuple; () = every stored site with an SAE export."""
        return tuple(s.strip() for s in self.sites.split(",") if s.strip())

    @property
    def attention(self) -> str:
        """`model_options.attention`, checked: the attention implementation of the CE forward."""
        return attention_option(self)

    @classmethod
    def from_config(cls, config: Any, flag: str = "--config") -> AnalyzeOptions:
        """`config` (a ConfigDict of configs/analyze.py, a mapping, or the options themselves) checked once."""
        return from_config(cls, config, flag)


def default_analyze_config() -> ml_collections.ConfigDict:
    """Every key of the analysis job with its default (`AnalyzeOptions` documents each)."""
    return section_of(AnalyzeOptions)
