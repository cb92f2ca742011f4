"""Distillation losses: per-token divergences (``LOSSES``), sparse top-k teacher signals and
the fused, chunked CE + KD loss, and the feature (hidden-state / attention) losses."""

from lmdistill.losses.divergences import LOSSES, LossFn, get_loss, register_loss
from lmdistill.losses.features import HiddenStateMatcher, attention_kl, layer_map
from lmdistill.losses.fused import fused_kd_loss, naive_kd_loss
from lmdistill.losses.sparse import SparseSignal, sparse_divergence, topk_signal

__all__ = [
    "LOSSES",
    "HiddenStateMatcher",
    "LossFn",
    "SparseSignal",
    "attention_kl",
    "fused_kd_loss",
    "get_loss",
    "layer_map",
    "naive_kd_loss",
    "register_loss",
    "sparse_divergence",
    "topk_signal",
]
