"""Sparse autoencoders on activation batches: architectures, the shared training step,
SAELens export/import, checkpoints and the offline trainer's data source.

Knows nothing of the model or the activation store: it takes arrays [N, d_in] per site (it uses only
the run directory file I/O of `arcstream.io`, to read and write exports).
"""

from arcstream.sae.architectures import (
    ARCHITECTURES,
    SWEEPABLE,
    Architecture,
    SAEConfig,
    StepOutput,
    get_architecture,
    member_names,
    register_architecture,
    sweep_config,
)
from arcstream.sae.matryoshka import MATRYOSHKA_BATCHTOPK  # registers matryoshka_batchtopk
from arcstream.sae.transcoder import TRANSCODERS, transcoder_key  # registers the transcoder architectures
from arcstream.sae.train import (
    SiteState,
    TrainConfig,
    TrainState,
    batch_sharding,
    batch_sites,
    init_train_state,
    make_train_step,
    member_state,
    spec_sites,
    state_shardings,
)
from arcstream.sae.export import decode, encode, export_circuit_tracer, export_sae, load_sae, reconstruct
from arcstream.sae.data import ActivationSource, InMemorySource, batch_dataset
from arcstream.sae.checkpoint import SAECheckpointer
from arcstream.sae.offline import export_all, summary_rows, train_offline
from arcstream.sae.options import SAEOptions, parse_sweep, sae_section, site_specs
