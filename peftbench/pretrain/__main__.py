"""``python -m peftbench.pretrain``: see :mod:`peftbench.pretrain.run`."""

import sys

from peftbench.pretrain.run import main

sys.exit(main())
