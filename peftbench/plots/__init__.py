"""Figure code behind ``python -m peftbench.plot`` (see :mod:`peftbench.plot`): one module per figure family.

Each module keeps data extraction (plain functions returning numbers, tested) apart from drawing (matplotlib Agg).
"""
