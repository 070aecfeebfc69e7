"""``python -m peftbench.plots <subcommand>``: see :mod:`peftbench.plots.cli`."""

import sys

from peftbench.plots.cli import main

main(sys.argv[1:])
