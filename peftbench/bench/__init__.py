"""Every method's cost side by side: ``python -m peftbench.bench`` (``make bench``); see :mod:`peftbench.bench.run`."""
