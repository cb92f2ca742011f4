"""Teachers: what the student learns from (an in-process model, a served one, or a cache).
Importing the package registers the built-in backends (`TEACHERS`: local, served, cache)."""

from lmdistill.teachers import setup as _setup  # noqa: F401  (registers the backends)
from lmdistill.teachers.backends import TEACHERS, register_teacher
from lmdistill.teachers.generate import GenerationReport, generate_responses, read_finished

__all__ = [
    "TEACHERS",
    "GenerationReport",
    "generate_responses",
    "read_finished",
    "register_teacher",
]
