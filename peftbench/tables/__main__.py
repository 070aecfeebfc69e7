"""``python -m peftbench.tables <name> scale=smoke|paper``: see :mod:`peftbench.tables.cli`."""

from peftbench.tables.cli import main

if __name__ == "__main__":
    main()
