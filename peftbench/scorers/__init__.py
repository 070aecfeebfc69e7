"""Scorers: pure functions ``scorer(model, batches) -> {name: score tensor}`` that methods select from.

Every scorer leaves the model exactly as it found it (see :class:`~peftbench.scorers.base.Pristine`).
"""
