"""Distillation losses: per-token divergences (``LOSSES``) and the fused, chunked CE + KD loss."""

from lmdistill.losses.divergences import LOSSES, LossFn, get_loss, register_loss
from lmdistill.losses.fused import IGNORE_INDEX, fused_kd_loss, naive_kd_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "LossFn",
    "fused_kd_loss",
    "get_loss",
    "naive_kd_loss",
    "register_loss",
]
