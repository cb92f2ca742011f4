"""Training: the KD objective, the loop, checkpoints, optimizer and schedule."""

from lmdistill.kd.train import TrainResult, train_student

__all__ = ["TrainResult", "train_student"]
