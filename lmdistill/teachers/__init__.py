"""Teachers: what the student learns from. For now, generation with an in-process model."""

from lmdistill.teachers.generate import (
    GenerationReport,
    generate_responses,
    greedy_responses,
    read_finished,
)

__all__ = ["GenerationReport", "generate_responses", "greedy_responses", "read_finished"]
