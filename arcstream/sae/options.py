"""The `sae` section of a job's config: every key defined once, with its default and its meaning.

Two jobs train SAEs: the run job's online trainer (`configs/default.py`, keys of `ONLINE`) and
`arcstream.train_sae` on stored activations (`configs/train_sae.py`, keys of `OFFLINE`). Both build their
`sae` section with `sae_section(job, **overrides)`, so adding a key is one edit here, and both resolve it
with `SAEOptions.from_config` (an unknown key is refused by name, a missing one takes its default).

The per-SAE hyperparameters (k, coefficients, lr, dead_steps, b_dec_init, ...) take their defaults from
`SAEConfig` (sae/architectures/base.py, where their meaning lives); the keys below add what a job needs
around them (width, sweep, schedule, batch). Comments on each field are the documentation of the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from arcstream.options import Section, from_config, from_section, section_field
from arcstream.sae.architectures import SWEEPABLE, SAEConfig, get_architecture
from arcstream.sae.train import TrainConfig
from arcstream.sae.transcoder import transcoder_key

_SAE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.default is not dataclasses.MISSING}


def _d(name: str) -> Any:
    return _SAE_DEFAULTS[name]


def parse_sweep(sweep: str) -> dict[str, list[Any]]:
    """`"k=16,32;l1_coefficient=1,5"` -> {"k": [16, 32], "l1_coefficient": [1.0, 5.0]} (zipped, equal lengths)."""
    out: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in sweep.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in SWEEPABLE or not values:
            raise ValueError(f"sae.sweep entry {part!r}: expected NAME=V1,V2,... with NAME in {SWEEPABLE}")
        cast = int if name == "k" else float
        out[name] = [cast(v) for v in values.split(",")]
    lengths = {n: len(v) for n, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sae.sweep lists differ in length {lengths}; members are zipped, so they must match")
    return out


def parse_widths(value: Any) -> tuple[int, ...]:
    """`sae.matryoshka_widths`: "" (none), "256,1024,4096" or a sequence of ints -> a tuple of ints."""
    if value is None or value == "":
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except ValueError:
        raise ValueError(f"sae.matryoshka_widths={value!r}: expected comma-separated integers, e.g. "
                         "'256,1024,4096' (strictly increasing, the last = d_sae)") from None


@dataclasses.dataclass(frozen=True)
class SAEOptions:
    # --- which SAE, how wide (both jobs)
    architecture: str = "topk"  # standard | topk | batchtopk | jumprelu | matryoshka_batchtopk | *_transcoder
    expansion_factor: int = 16  # d_sae = expansion_factor * d_in, unless d_sae is set
    d_sae: int = 0  # number of latents; 0 = use expansion_factor
    k: int = _d("k")  # active latents per token (topk; batchtopk on average)
    l1_coefficient: float = _d("l1_coefficient")  # standard: decoder-norm-weighted L1 weight
    l0_coefficient: float = _d("l0_coefficient")  # jumprelu: L0 penalty weight
    aux_coefficient: float = _d("aux_coefficient")  # topk/batchtopk: AuxK weight (TopK paper: 1/32)
    jumprelu_bandwidth: float = _d("jumprelu_bandwidth")  # jumprelu: STE kernel width (scaled units)
    jumprelu_init_threshold: float = _d("jumprelu_init_threshold")  # jumprelu: initial threshold (scaled units)
    dead_steps: int = _d("dead_steps")  # steps without firing after which a latent counts as dead
    b_dec_init: str = _d("b_dec_init")  # geometric_median | mean | zeros
    # topk, batchtopk, matryoshka_batchtopk, batchtopk_transcoder: start the encoder at the least-squares scale
    # for the first batch instead of the decoder's full-scale transpose (SAEConfig.fit_encoder_scale, with figures)
    fit_encoder_scale: bool = _d("fit_encoder_scale")
    # The dtype of the training step's dense encoder matmul where it only picks the kept latents (topk,
    # batchtopk; their values, the loss and every gradient stay float32; SAEConfig.select_dtype):
    # auto (bfloat16 for those, float32 for the others) | float32 | bfloat16. Measured (benchmarks/bench_sae.py
    # --whole --select_dtypes float32,bfloat16, 163,840 tokens): the same held-out FVU (0.6079 vs 0.6081).
    select_dtype: str = "auto"
    sweep: str = ""  # e.g. "k=32,64,128" or "l1_coefficient=1,5;lr=1e-4,3e-4": members zipped, vmapped in one step
    matryoshka_widths: str = ""  # matryoshka_batchtopk: nested prefix widths, e.g. "896,3584,14336" (last = d_sae)
    use_matryoshka_aux_loss: bool = _d("use_matryoshka_aux_loss")  # matryoshka_batchtopk: AuxK per level
    input_site: str = ""  # transcoders: the site encoded, e.g. blocks.11.hook_resid_mid (a captured site)
    target_site: str = ""  # transcoders: the site reconstructed from it (same tokens), e.g. blocks.11.hook_mlp_out
    init_from: str = ""  # SAELens folders (PATH[,PATH]) to start from instead of a fresh init (sae/pretrained.py)
    # --- optimiser and schedule (both jobs)
    lr: float = _d("lr")  # peak Adam learning rate
    warmup_steps: int = 100  # linear warm-up (SAE steps)
    decay_fraction: float = 0.2  # linear decay to 0 over this fraction of the run (at the end)
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    batch_size: int = 4096  # tokens per SAE step (online: sampled from the ring, a multiple of the data axis)
    # --- the run job's online SAEs only
    enabled: bool = True  # train one SAE per captured site (or one transcoder) on the ring buffer
    total_steps: int = 100_000  # the schedule's length in SAE steps (training stops there)
    passes: int = 1  # draws of every captured token (without replacement; SAE steps per forward step follow)
    exclude_first_token: bool = True  # never train on position 0 (attention-sink norms)
    log_every: int = 10  # SAE steps between metrics.jsonl records
    checkpoint_dir: str = ""  # Orbax SAE checkpoints: a local dir or gs:// URL; "" = output_dir/saes/checkpoints
    # --- train_sae only
    chunk_rows: int = 64  # contiguous stored rows read at once; a batch mixes batch_size / chunk_rows chunks
    train_tokens: int = 50_000_000  # tokens to train on (steps = train_tokens // batch_size)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | ml_collections.ConfigDict) -> SAEOptions:
        """The options of a config's `sae` section (`arcstream.options.from_section`: unknown keys and
        mistyped values are refused naming `--config.sae.KEY`)."""
        items = {k: v for k, v in dict(section.items()).items() if v is not None}  # None = the default
        if "matryoshka_widths" in items and not isinstance(items["matryoshka_widths"], str):
            items["matryoshka_widths"] = ",".join(str(w) for w in parse_widths(items["matryoshka_widths"]))
        return from_section(cls, items, "--config.sae")

    def train_config(self, total_steps: int, seed: int) -> TrainConfig:
        """The trainer's schedule: warm-up capped at the run, linear decay over `decay_fraction` of it."""
        warm = min(self.warmup_steps, total_steps)
        return TrainConfig(total_steps=total_steps, warmup_steps=warm,
                           decay_steps=min(int(round(self.decay_fraction * total_steps)), total_steps - warm),
                           clip_norm=self.clip_norm, seed=seed)

    def site_specs(self, d_in_by_site: Mapping[str, int]) -> dict[str, list[SAEConfig]]:
        """One spec per site (an SAE, or a sweep of them) or, for a transcoder architecture, the one spec
        `input_site` -> `target_site` (keyed `transcoder_key(input, target)`); `d_in_by_site` gives every
        available site's width."""
        arch = self.architecture
        if get_architecture(arch).transcoder:
            for flag, s in (("sae.input_site", self.input_site), ("sae.target_site", self.target_site)):
                if s not in d_in_by_site:
                    raise ValueError(f"--config.{flag}={s!r}: sae.architecture={arch!r} is a transcoder and needs an "
                                     f"input and a target site among {sorted(d_in_by_site)} (e.g. "
                                     "blocks.L.hook_resid_mid -> blocks.L.hook_mlp_out)")
            if self.input_site == self.target_site:
                raise ValueError(f"--config.sae.input_site and sae.target_site are both {self.input_site!r}; a "
                                 "transcoder reconstructs another site (for the same site train an SAE)")
            routes = {transcoder_key(self.input_site, self.target_site): (
                d_in_by_site[self.input_site], dict(d_out=d_in_by_site[self.target_site], input_site=self.input_site,
                                                    target_site=self.target_site, apply_b_dec_to_input=False))}
        elif self.input_site or self.target_site:
            raise ValueError(f"--config.sae.input_site={self.input_site!r} / sae.target_site={self.target_site!r} "
                             f"are set but sae.architecture={arch!r} is an autoencoder; use a transcoder "
                             "architecture (batchtopk_transcoder, jumprelu_transcoder) or leave them empty")
        else:
            routes = {site: (d_in, {}) for site, d_in in d_in_by_site.items()}
        widths = parse_widths(self.matryoshka_widths)
        sweep = parse_sweep(self.sweep)
        n = len(next(iter(sweep.values()))) if sweep else 1
        per_sae = {name: getattr(self, name) for name in _SAE_DEFAULTS if hasattr(self, name)}
        if self.select_dtype == "auto":
            per_sae["select_dtype"] = "bfloat16" if get_architecture(arch).sparse_selection else "float32"
        specs = {}
        for site, (d_in, route) in routes.items():
            d_sae = self.d_sae or self.expansion_factor * d_in
            base = {**per_sae, "architecture": arch, "d_in": d_in, "d_sae": d_sae, "matryoshka_widths": widths,
                    **route}
            try:
                specs[site] = [SAEConfig(**{**base, **{f: v[i] for f, v in sweep.items()}}) for i in range(n)]
            except ValueError as e:
                raise ValueError(f"sae.* for {site!r} (d_in {d_in}, d_sae {d_sae}): {e}") from None
        return specs


ONLINE = ("architecture", "expansion_factor", "d_sae", "k", "l1_coefficient", "l0_coefficient", "aux_coefficient",
          "jumprelu_bandwidth", "jumprelu_init_threshold", "dead_steps", "b_dec_init", "fit_encoder_scale",
          "select_dtype", "sweep", "matryoshka_widths", "use_matryoshka_aux_loss", "input_site", "target_site",
          "init_from", "lr", "warmup_steps", "decay_fraction", "clip_norm", "batch_size", "enabled", "total_steps",
          "passes", "exclude_first_token", "log_every", "checkpoint_dir")
OFFLINE = tuple(k for k in ONLINE if k not in ("enabled", "total_steps", "passes", "exclude_first_token",
                                               "log_every", "checkpoint_dir")) + ("chunk_rows", "train_tokens")
JOB_KEYS = {"online": ONLINE, "train_sae": OFFLINE}


def site_specs(section: SAEOptions | Mapping[str, Any], d_in_by_site: Mapping[str, int]) -> dict[str, list[SAEConfig]]:
    """`SAEOptions.site_specs` of a config's `sae` section (or of resolved options)."""
    opts = section if isinstance(section, SAEOptions) else SAEOptions.from_config(section)
    return opts.site_specs(d_in_by_site)


def sae_section(job: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The `sae` ConfigDict of `job` ("online": the run job; "train_sae"): the job's keys at their defaults,
    then `overrides` (a key the job does not have is refused)."""
    keys = JOB_KEYS[job]
    bad = sorted(set(overrides) - set(keys))
    if bad:
        raise ValueError(f"sae_section({job!r}): {bad} are not {job} SAE keys; they are {list(keys)}")
    defaults = SAEOptions()
    return ml_collections.ConfigDict({k: overrides.get(k, getattr(defaults, k)) for k in keys})


def job_sae_options(section: Mapping[str, Any], job: str) -> SAEOptions:
    """The `sae` section of `job` ("online" or "train_sae") checked: a key of the other job is refused by
    name (e.g. `sae.train_tokens` in a run config), then `SAEOptions.from_config`."""
    keys = JOB_KEYS[job]
    bad = sorted(set(section.keys()) - set(keys))
    if bad:
        raise ValueError(f"--config.sae.{bad[0]} is not an SAE key of the {job} job (unknown here: {bad}); its keys "
                         f"are {list(keys)} (arcstream/sae/options.py documents each)")
    return SAEOptions.from_config(section)


@dataclasses.dataclass(frozen=True)
class TrainSAEOptions:
    """A whole `arcstream.train_sae` config (configs/train_sae.py), checked: what `train_offline` reads."""

    run_dir: str = ""  # run directory written by `arcstream.run` (a local path or a kvstore URL) (required)
    checkpoint_dir: str = ""  # Orbax checkpoints; "" = run_dir/saes/train_sae_checkpoints (set it for memory://)
    sites: str = ""  # comma-separated site names; empty = every stored site
    seed: int = 0  # seeds the init and the batch order
    checkpoint_every: int = 1000  # steps between Orbax checkpoints (and at the end)
    log_every: int = 100  # steps between metrics.jsonl records
    stop_after_steps: int = 0  # stop (after a checkpoint) at this step; 0 = run to the end (tests of resume)
    model_name: str = ""  # written into the exports' metadata.model_name when set
    # JAX's persistent compilation cache (a private directory: its entries are trusted code). A run
    # with the same shapes skips XLA compilation (~15 s of a cold 2-core CPU start); "" = off.
    compilation_cache_dir: str = "~/.cache/arcstream/jax"
    # The SAE: architecture, width, sparsity, optimiser, schedule, batch (SAEOptions's train_sae keys).
    sae: Section = section_field(lambda: sae_section("train_sae"))

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("--config.run_dir is required (the run directory holding the activation store)")
        if self.checkpoint_every < 0 or self.stop_after_steps < 0:
            raise ValueError(f"--config.checkpoint_every ({self.checkpoint_every}) and --config.stop_after_steps "
                             f"({self.stop_after_steps}) must be >= 0")
        self.sae_options()

    def sae_options(self) -> SAEOptions:
        return job_sae_options(self.sae, "train_sae")

    @property
    def site_list(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]

    @classmethod
    def from_config(cls, config: Any) -> TrainSAEOptions:
        """`config` (a ConfigDict of configs/train_sae.py, or the options themselves) checked once."""
        return from_config(cls, config)


__all__ = ["JOB_KEYS", "OFFLINE", "ONLINE", "SAEOptions", "TrainSAEOptions", "job_sae_options", "parse_sweep",
           "parse_widths", "sae_section", "site_specs"]
