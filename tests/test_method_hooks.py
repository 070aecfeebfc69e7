"""The Method interface's training hooks: method files import no Lightning (one generic callback owns it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

METHODS = sorted((Path(__file__).resolve().parent.parent / "peftbench" / "methods").glob("*.py"))


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_files_import_no_lightning_and_no_callbacks(path):
    """Methods act during training through Method.on_epoch_start / update / on_epoch_end / on_fit_end; the
    Lightning side (broadcast, optimizer rebuild, DDP re-wrap, state re-save) is
    peftbench.training.callbacks.MethodHooks."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    lightning = ("lightning", "pytorch_lightning")
    bad = sorted(m for m in imported if m.split(".")[0] in lightning or m == "peftbench.training.callbacks")
    assert not bad, f"{path.name} imports {bad}"
