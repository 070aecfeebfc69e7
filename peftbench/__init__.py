"""peftbench: parameter-efficient fine-tuning of pre-trained vision transformers, benchmarked honestly.

Importing peftbench registers the embedded backbone ``vit_micro`` as a timm model. ``peftbench.load(run_dir)``
returns a finished run's model (merged into a plain timm model where the method allows) and its preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftbench import backbones  # noqa: F401 - registers timm's "vit_micro"

__version__ = "0.1.0"


def load(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    search_path: list[str] | None = None,
    merge: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """``(model, preprocessing)`` of the run in ``run_dir``; see :func:`peftbench.export.load`."""
    from peftbench.export import load as _load

    return _load(run_dir, overrides, search_path, merge)
