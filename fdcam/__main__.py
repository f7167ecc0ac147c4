"""`python -m fdcam`: the same command line as `fdcam`."""

import sys

from .cli import main

sys.exit(main())
