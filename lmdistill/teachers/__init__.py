"""Teachers: what the student learns from (an in-process model, a served one, or a cache)."""

from lmdistill.teachers.generate import GenerationReport, generate_responses, read_finished

__all__ = ["GenerationReport", "generate_responses", "read_finished"]
