"""lmdistill: knowledge distillation and dataset distillation of large language models."""

import os
import sys

__version__ = "0.1.0"

if "torch" not in sys.modules:
    # OpenMP's default busy-wait makes every thread spin between parallel regions. On a small
    # shared CPU (2 cores, a tokenizer pool, a progress-bar thread) that starves the threads
    # doing work: we measured generation 5-100x slower than with passive waiting, and no
    # loss for large matmuls. Users who set these themselves keep their values.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
