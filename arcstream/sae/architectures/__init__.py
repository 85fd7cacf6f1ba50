"""SAE architectures (SAELens names): standard, topk, batchtopk, jumprelu, one file each; base.py holds
the contract they share and the one training loss built on it. matryoshka.py (beside this package) adds
matryoshka_batchtopk and transcoder.py the transcoders (batchtopk_transcoder, jumprelu_transcoder).

Importing this package registers the four architectures; the names below are its public API.
"""

from arcstream.sae.architectures.base import (ARCHITECTURES, SWEEPABLE, Architecture, AuxTerms, Buffers, Encoding,
                                              HParams, Latents, Params, SAEConfig, StepInput, StepOutput, check_k,
                                              decode, decode_blocks, fired_counts, fvu_and_explained_variance,
                                              get_architecture, init_params, member_names, mse, no_buffers, preacts,
                                              reconstruction_metrics, register_architecture, saelens_weights,
                                              sweep_config, unconstrained, unit_norm_decoder)
from arcstream.sae.architectures.standard import STANDARD
from arcstream.sae.architectures.topk import AUXK_CANDIDATES, TOPK, auxk_loss, auxk_terms, top_k
from arcstream.sae.architectures.batchtopk import (BATCHTOPK, BATCHTOPK_DENSE_UP_TO, BATCHTOPK_TIERS, batch_topk,
                                                   batchtopk_select, ema_threshold, kth_largest, threshold_buffers,
                                                   threshold_encode, threshold_export)
from arcstream.sae.architectures.jumprelu import JUMPRELU, JUMPRELU_DECODER_INIT_NORM, jumprelu, step_fn

__all__ = [
    "ARCHITECTURES", "AUXK_CANDIDATES", "Architecture", "AuxTerms", "BATCHTOPK", "BATCHTOPK_DENSE_UP_TO",
    "BATCHTOPK_TIERS", "Buffers", "Encoding", "HParams", "JUMPRELU", "JUMPRELU_DECODER_INIT_NORM", "Latents",
    "Params", "SAEConfig", "STANDARD", "SWEEPABLE", "StepInput", "StepOutput", "TOPK", "auxk_loss", "auxk_terms",
    "batch_topk", "batchtopk_select", "check_k", "decode", "decode_blocks", "ema_threshold", "fired_counts",
    "fvu_and_explained_variance", "get_architecture", "init_params", "jumprelu", "kth_largest", "member_names",
    "mse", "no_buffers", "preacts", "reconstruction_metrics", "register_architecture", "saelens_weights",
    "step_fn", "sweep_config", "threshold_buffers", "threshold_encode", "threshold_export", "top_k",
    "unconstrained", "unit_norm_decoder",
]
