"""`python -m benchmarks.latency`."""

import sys

from . import main

sys.exit(main())
