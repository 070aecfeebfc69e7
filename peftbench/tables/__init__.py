"""Paper tables from spec files (``conf/table/<name>.yaml``): ``python -m peftbench.tables <name> scale=smoke``.

- :mod:`peftbench.tables.spec`: benchmarks, the two scales (``SCALES``: the one place that defines them), loading and
  validating specs.
- :mod:`peftbench.tables.plan`: the run of every cell, its key in the results index, model selection.
- :mod:`peftbench.tables.launch`: missing runs launched as ``python -m peftbench.train --multirun`` sweeps.
- :mod:`peftbench.tables.render`: cells (mean ± std over seeds, published, difference, provenance) and the Markdown,
  CSV, LaTeX, cells.json and W&B renderings.
- :mod:`peftbench.tables.cli`: the command line.
"""
