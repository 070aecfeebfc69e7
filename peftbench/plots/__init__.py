"""Figure code behind ``python -m peftbench.plots`` (see :mod:`peftbench.plots.cli`): one module per figure family.

Each module keeps data extraction (plain functions returning numbers, tested) apart from drawing (matplotlib Agg).
"""
