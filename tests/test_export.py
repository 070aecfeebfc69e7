"""Export: the task file alone reproduces the run's test accuracy; the merged timm model computes the same;
``--check`` compares with results.json and writes the merged model only when they agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from peftbench.errors import PeftbenchError
from peftbench.export import TASK_FILE, evaluate, export_merged, load_task, main
from peftbench.train import compose_config, execute
from tests.helpers import TEST_CONF, TINY


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = compose_config(TINY + [f"paths.output_dir={tmp}/outputs", "method.scale=4.0"])
    return execute(cfg, tmp / "run"), tmp / "run"


def test_task_file_reproduces_test_accuracy_and_size(lora_run):
    record, run_dir = lora_run
    task = run_dir / TASK_FILE
    assert record["storage"]["task_file_bytes"] == task.stat().st_size
    payload = torch.load(task, weights_only=True)
    assert set(payload["params"]) == {n for n in payload["params"] if "lora_" in n or n.startswith("head.")}
    module, datamodule, _ = load_task(task, search_path=[TEST_CONF])
    assert evaluate(module, datamodule) == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)


def test_merged_plain_timm_model_matches(lora_run, tmp_path):
    _, run_dir = lora_run
    module, datamodule, cfg = load_task(run_dir / TASK_FILE, search_path=[TEST_CONF])
    x = datamodule.normalize(datamodule.split("test").images[:8])
    with torch.no_grad():
        expected = module.eval()(x)
    path = export_merged(module, tmp_path / "merged.safetensors")
    plain = timm.create_model(cfg.backbone.timm_name, num_classes=cfg.dataset.num_classes).eval()
    plain.load_state_dict(load_file(str(path)))  # strict: exactly timm's keys
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-4)


def test_cli_check_and_missing_task_file(lora_run, tmp_path, capsys):
    record, run_dir = lora_run
    assert main([str(run_dir), "--check", "--config-dir", TEST_CONF]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_acc_in_results"] == record["metrics"]["test_acc"]
    assert out["test_acc_from_task_file"] == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)  # same count
    assert Path(out["merged"]).is_file()
    assert main([str(tmp_path)]) == 1
    assert "task.pt does not exist" in capsys.readouterr().err
    with pytest.raises(PeftbenchError):
        load_task(tmp_path / TASK_FILE)


def _doctored(run_dir: Path, dest: Path, edit) -> Path:
    shutil.copytree(run_dir, dest)
    (dest / "merged.safetensors").unlink(missing_ok=True)
    payload = torch.load(dest / TASK_FILE, weights_only=True)
    edit(payload["params"])
    torch.save(payload, dest / TASK_FILE)
    return dest


def _zero_head(params: dict) -> None:
    for name in params:
        if name.startswith("head."):
            params[name].zero_()


def _nan_lora(params: dict) -> None:
    next(v for n, v in params.items() if "lora_B" in n).fill_(float("nan"))


def _drop_lora(params: dict) -> None:
    del params[next(n for n in params if "lora_A" in n)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_zero_head, "--check failed"),
        (_nan_lora, "NaN or infinite"),
        (_drop_lora, "lacks trained tensors"),
    ],
)
def test_check_fails_on_a_damaged_task_file_and_writes_no_merged_model(lora_run, tmp_path, capsys, edit, message):
    _, run_dir = lora_run
    bad = _doctored(run_dir, tmp_path / "run", edit)
    assert main([str(bad), "--check", "--config-dir", TEST_CONF]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (bad / "merged.safetensors").exists()


def test_overrides_are_plain_values_only(lora_run, capsys):
    _, run_dir = lora_run
    assert main([str(run_dir), "dataset._target_=builtins.open", "--config-dir", TEST_CONF]) == 1
    assert "no _target_" in capsys.readouterr().err
