"""``python -m speechbench``: the ``bench`` command line."""

import sys

from speechbench.benchmark.cli import main

sys.exit(main())
