"""No file can make peftbench run code: configs read back from files never choose what is instantiated.

Each payload below, planted in a real run's ``task.pt``, would create a marker file if anything instantiated it
(the first is the reported exploit: ``torch.load(weights_only=False)`` of an attacker's pickle). Every one must be
refused with one line naming the key, and the marker must never appear.
"""

from __future__ import annotations

import base64
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from peftbench.compose import compose_config, config_from_file
from peftbench.errors import PeftbenchError
from peftbench.export import load_task, main
from peftbench.records.task_file import TASK_FILE
from peftbench.train import execute
from tests.helpers import TEST_CONF, TINY


class _Touch:
    """Unpickling this calls ``open(path, "w")``: the harmless stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("security")
    cfg = compose_config(TINY + [f"paths.output_dir={tmp}/outputs", "trainer.max_epochs=1"])
    execute(cfg, tmp / "run")
    return tmp / "run"


def _payloads(marker: Path) -> dict[str, tuple[str, object]]:
    """name -> (dotted key to plant, value)."""
    blob = base64.b64encode(pickle.dumps(_Touch(str(marker)))).decode()
    torch_load = {
        "_target_": "torch.load",
        "weights_only": False,
        "f": {"_target_": "io.BytesIO", "initial_bytes": {"_target_": "base64.b64decode", "s": blob}},
    }
    return {
        "torch_load_pickle": ("dataset", torch_load),
        "builtins_open": ("dataset", {"_target_": "builtins.open", "file": str(marker), "mode": "w"}),
        "shutil_copyfile": ("method", {"_target_": "shutil.copyfile", "src": __file__, "dst": str(marker)}),
        "numpy_savetxt": ("optimizer", {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0]}),
        "nested_in_values": ("method.targets", {"_target_": "builtins.open", "file": str(marker), "mode": "w"}),
        "partial_args": ("scheduler._args_", [str(marker), "w"]),
        "extra_callbacks": ("callbacks", {"x": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}}),
        "interpolation": ("method.rank", "${oc.decode:'{_target_: builtins.open, file: " + f"{marker}, mode: w}}'}}"),
    }


def _plant(run_dir: Path, dest: Path, key: str, value: object) -> Path:
    shutil.copytree(run_dir, dest)
    payload = torch.load(dest / TASK_FILE, weights_only=True)
    config = yaml.safe_load(payload["config"])
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    payload["config"] = yaml.safe_dump(config)
    torch.save(payload, dest / TASK_FILE)
    return dest


@pytest.mark.parametrize("name", list(_payloads(Path("x"))))
def test_planted_targets_are_refused_and_never_run(finished_run, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    key, value = _payloads(marker)[name]
    run_dir = _plant(finished_run, tmp_path / "run", key, value)
    assert main([str(run_dir), "--config-dir", TEST_CONF]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peftbench: error:"), err
    assert "refused" in err and key.split(".")[0] in err
    with pytest.raises(PeftbenchError):
        load_task(run_dir / TASK_FILE, search_path=[TEST_CONF])
    assert not marker.exists()


def test_an_honest_task_file_still_loads(finished_run):
    module, _, cfg = load_task(finished_run / TASK_FILE, search_path=[TEST_CONF])
    assert cfg.dataset._target_ == "tests.helpers.BlobTask" and module.prepared


def test_recorded_choices_cannot_leave_conf(finished_run):
    payload = torch.load(finished_run / TASK_FILE, weights_only=True)
    config = yaml.safe_load(payload["config"])
    for option in ("../../../tmp/evil", "/etc/passwd", "vtab/../../x"):
        config["_choices_"]["dataset"] = option
        with pytest.raises(PeftbenchError, match="_choices_.dataset"):
            config_from_file(yaml.safe_dump(config), "test file")
    config["_choices_"] = {"evil_group": "x"}
    with pytest.raises(PeftbenchError, match="unknown config group"):
        config_from_file(yaml.safe_dump(config), "test file")
    del config["_choices_"]
    with pytest.raises(PeftbenchError, match="no recorded group choices"):
        config_from_file(yaml.safe_dump(config), "test file")


def test_a_target_swapped_for_another_peftbench_target_is_refused(finished_run):
    """Even a target inside peftbench is refused where conf/ puts another one (it would run with file values)."""
    payload = torch.load(finished_run / TASK_FILE, weights_only=True)
    config = yaml.safe_load(payload["config"])
    config["method"]["_target_"] = "peftbench.records.results.write_json_atomic"
    refused = r"method._target_ = 'peftbench.records.results.write_json_atomic' is refused"
    with pytest.raises(PeftbenchError, match=refused):
        config_from_file(yaml.safe_dump(config), "test file", [TEST_CONF])


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ("overrides: [method=lora, 'method._target_=builtins.open']", "no _keys_"),
        ("overrides: [method=lora, '+callbacks.x._target_=builtins.open']", "no _keys_"),
        ("overrides: [method=lora, 'hydra.searchpath=[file:///tmp/evil]']", "no hydra."),
        ("overrides: [method=lora, 'method.targets={_target_: builtins.open, file: x}']", "_target_ or other _key_"),
        ("overrides: [method=lora, 'method.rank=${oc.decode:x}']", "interpolation"),
        ("overrides: [method=lora]\n    search: {method._target_: [builtins.open]}", "no _keys_"),
    ],
)
def test_a_table_spec_file_cannot_choose_code(tmp_path, row, what):
    """Spec files may come from someone else (``python -m peftbench.tables path/to/spec.yaml``): plain values only."""
    from peftbench.tables.spec import SpecError, load_spec

    spec = tmp_path / "evil.yaml"
    spec.write_text(
        "title: t\nsource: s\nbenchmark: vtab\ncolumns: [natural, mean]\nmetric: test_acc\n"
        f"rows:\n  - name: Evil\n    {row}\n"
    )
    with pytest.raises(SpecError, match="refused") as info:
        load_spec(spec)
    assert what in str(info.value) and "\n" not in str(info.value)
