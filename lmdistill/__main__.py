"""`python -m lmdistill ...` is `lmdistill ...` (handy under torchrun / accelerate launch)."""

import sys

from lmdistill.cli import main

sys.exit(main())
