"""Load teachers and students; build students from teachers; check tokenizers agree."""

from lmdistill.models.loading import (
    ModelLoadError,
    check_model_path,
    describe,
    load_model,
    resolve_device,
    weights_fingerprint,
)
from lmdistill.models.registry import RegistryError, resolve_alias
from lmdistill.models.students import (
    TokenizerMismatchError,
    build_student,
    check_tokenizers,
    evenly_spaced_layers,
    shared_vocab_size,
)

__all__ = [
    "ModelLoadError",
    "RegistryError",
    "TokenizerMismatchError",
    "build_student",
    "check_model_path",
    "check_tokenizers",
    "describe",
    "evenly_spaced_layers",
    "load_model",
    "resolve_alias",
    "resolve_device",
    "shared_vocab_size",
    "weights_fingerprint",
]
