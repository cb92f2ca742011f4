"""Evaluation: fidelity of the student to the teacher."""

from lmdistill.eval.fidelity import fidelity

__all__ = ["fidelity"]
