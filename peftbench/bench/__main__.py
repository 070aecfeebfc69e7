"""``python -m peftbench.bench``: see :mod:`peftbench.bench.run`."""

import sys

from peftbench.bench.run import main

sys.exit(main())
