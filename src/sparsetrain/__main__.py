"""`python -m sparsetrain` runs the command line (also under torchrun)."""

import sys

from .run.cli import main

sys.exit(main())
