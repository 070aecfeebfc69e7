"""``status: ok`` means a trained, finite, evaluated model: everything else stops with one line and a record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.datagen import make_fgvc_folder, make_vtab_folder
from tests.helpers import TINY, train_cli


def _vtab(tmp_path: Path, empty: str | None = None) -> list[str]:
    """A tiny VTAB-1k folder for ``dataset=vtab/dtd`` under ``tmp_path/data``; ``empty`` empties one split file."""
    root = tmp_path / "data" / "vtab-1k" / "dtd"
    make_vtab_folder(root, num_classes=3, counts={"train800": 8, "val200": 4, "test": 6})
    if empty:
        (root / f"{empty}.txt").write_text("")
    return [
        *[o for o in TINY if not o.startswith("dataset=")],
        "dataset=vtab/dtd",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.max_epochs=1",
    ]


def _failed(tmp_path: Path, code: int, err: str, needle: str) -> dict:
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("peftbench: error:") and needle in last, err
    assert "Traceback" not in err
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and needle in record["error"]
    index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [r["status"] for r in index] == ["failed"]
    return record


@pytest.mark.parametrize(
    ("split", "protocol"),
    [("train800", "tune"), ("val200", "tune"), ("test", "final"), ("train800val200", "final")],
)
def test_an_empty_split_stops_before_training(tmp_path, split, protocol):
    code, _, err = train_cli(*_vtab(tmp_path, empty=split), f"protocol={protocol}")
    _failed(tmp_path, code, err, f"split '{split}'")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # nothing trained


def test_an_empty_fgvc_val_json_stops_under_tune(tmp_path):
    root = tmp_path / "data" / "fgvc" / "CUB_200_2011"
    make_fgvc_folder(root, {"train": [1, 2, 1, 2], "val": [1, 2], "test": [1, 2, 2]})
    (root / "val.json").write_text("{}")
    args = [o for o in _vtab(tmp_path) if not o.startswith("dataset=")]
    code, _, err = train_cli(*args, "dataset=fgvc/cub", "dataset.num_classes=2", "protocol=tune")
    _failed(tmp_path, code, err, "split 'val'")


@pytest.mark.parametrize("override", ["trainer.max_epochs=0", "+trainer.limit_train_batches=0"])
def test_zero_epochs_stop_before_training(tmp_path, override):
    code, _, err = train_cli(*_vtab(tmp_path), override)
    _failed(tmp_path, code, err, "at least one step")


def test_zero_scoring_samples_stop_before_training(tmp_path):
    code, _, err = train_cli(*_vtab(tmp_path), "method=spt_lora", "scoring.n_samples=0")
    _failed(tmp_path, code, err, "gets no data")


def test_non_finite_test_logits_fail_the_run(tmp_path):
    """Divergence after the last step (a frozen weight turned NaN): test accuracy of NaN logits is no result."""
    code, _, err = train_cli(
        *_vtab(tmp_path), "protocol=final", "+callbacks.poison._target_=tests.helpers.PoisonFrozenWeight"
    )
    _failed(tmp_path, code, err, "non-finite logits in test")


def test_all_zero_scores_are_refused():
    import torch

    from peftbench.errors import PeftbenchError
    from peftbench.scorers.base import Counted, check_scores

    seen = Counted([(torch.zeros(2, 3), torch.zeros(2))])
    list(seen)
    with pytest.raises(PeftbenchError, match="all-zero scores on 2 samples"):
        check_scores({"a": torch.zeros(3, 3), "b": torch.zeros(3)}, seen, object())
    with pytest.raises(PeftbenchError, match="non-finite scores for 'a'"):
        check_scores({"a": torch.tensor([1.0, float("nan")])}, seen, object())
    check_scores({"a": torch.tensor([0.0, 1e-30])}, seen, object())  # tiny but informative: accepted
