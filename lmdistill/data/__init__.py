"""Data formats, tokenisation with response-only loss masks, and batching."""

from lmdistill.data.example import DataError, Example
from lmdistill.data.formats import data_hash, load_examples, write_examples
from lmdistill.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TruncationReport,
    collate,
    collate_prompts,
    encode_prompt,
    prompt_ids,
    to_device,
    tokenize_examples,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "TokenizedExample",
    "TruncationReport",
    "collate",
    "collate_prompts",
    "data_hash",
    "encode_prompt",
    "load_examples",
    "prompt_ids",
    "to_device",
    "tokenize_examples",
    "write_examples",
]
