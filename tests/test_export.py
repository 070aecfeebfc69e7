"""Export: the task file alone reproduces the run's test accuracy; ``peftbench.load`` gives the ready model and its
preprocessing; the merged model in timm's Hugging Face layout loads with timm alone and the LoRA adapter in HF peft's
format loads with peft, both computing what the run computed; ``--check`` compares with results.json and writes the
artefacts only when they agree."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import peftbench
from peftbench.backbones import vit_micro
from peftbench.compose import compose_config
from peftbench.data.base import NORMALIZE
from peftbench.errors import PeftbenchError
from peftbench.export import evaluate, load_task, main
from peftbench.records.task_file import TASK_FILE
from peftbench.train import execute
from tests.helpers import TEST_CONF, TINY

#: the blobs task's evaluation decode (no transform of its own: square resize, bicubic) + imagenet normalisation
PREPROCESSING = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": NORMALIZE["imagenet"][0],
                 "std": NORMALIZE["imagenet"][1], "crop_pct": 1.0, "crop_mode": "squash"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    if not Path(vit_micro.asset_path()).is_file():
        pytest.skip("packaged vit_micro weights not built (python -m peftbench.pretrain)")
    tmp = tmp_path_factory.mktemp("export")
    overrides = ["backbone.pretrained=true", "method.scale=4.0"]  # offline-ok: the packaged weights
    cfg = compose_config(TINY + [f"paths.output_dir={tmp}/outputs", *overrides])
    return execute(cfg, tmp / "run"), tmp / "run"


@pytest.fixture(scope="module")
def exported(lora_run):
    """``python -m peftbench.export <run> --check``: its printed summary."""
    _, run_dir = lora_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(run_dir), "--check", "--config-dir", TEST_CONF]) == 0
    return json.loads(printed.getvalue())


def test_task_file_reproduces_test_accuracy_and_size(lora_run):
    record, run_dir = lora_run
    task = run_dir / TASK_FILE
    assert record["storage"]["task_file_bytes"] == task.stat().st_size
    payload = torch.load(task, weights_only=True)
    assert set(payload["params"]) == {n for n in payload["params"] if "lora_" in n or n.startswith("head.")}
    module, datamodule, _ = load_task(task, search_path=[TEST_CONF])
    assert evaluate(module, datamodule) == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)


@torch.no_grad()
def accuracy(model: torch.nn.Module, datamodule, mean, std) -> float:
    """Test accuracy over the run's own test batches, normalised with ``mean``/``std`` as the data module does
    (48 test images: accuracies of different counts differ by 1/48, so ``approx(abs=1e-6)`` means the same count)."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    correct = total = 0
    for images, labels in datamodule._eval_loader("test"):
        correct += int((model((images.float() - mean) / std).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def test_peftbench_load_gives_the_plain_merged_model_and_its_preprocessing(lora_run):
    record, run_dir = lora_run
    torch.manual_seed(123)
    model, pre = peftbench.load(run_dir, search_path=[TEST_CONF])
    after_load = torch.rand(2)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(2))  # the caller's RNG is left as it was (rebuilding seeds it)
    assert type(model) is VisionTransformer and not model.training
    assert not [n for n, m in model.named_modules() if hasattr(m, "base_layer")]  # merged: no wrapper left
    assert pre == PREPROCESSING
    _, datamodule, _ = load_task(run_dir / TASK_FILE, search_path=[TEST_CONF])
    expected = pytest.approx(record["metrics"]["test_acc"], abs=1e-6)
    assert accuracy(model, datamodule, pre["mean"], pre["std"]) == expected
    wrapped, _ = peftbench.load(run_dir, search_path=[TEST_CONF], merge=False)
    assert any(hasattr(m, "base_layer") for m in wrapped.modules())


def test_merged_timm_layout_loads_with_timm_and_matches_test_accuracy(lora_run, exported):
    record, run_dir = lora_run
    folder = Path(exported["merged"])
    assert folder == run_dir / "merged" and not (run_dir / "merged.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_micro" and config["num_classes"] == 4  # the registered timm name
    assert config["model_args"]["img_size"] == [32, 32]
    cfg = config["pretrained_cfg"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in PREPROCESSING} == PREPROCESSING
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # offline-ok: timm alone, a folder
    assert type(model) is VisionTransformer and model.num_classes == 4
    data = timm.data.resolve_data_config(model=model)  # what a timm user feeds create_transform
    assert (tuple(data["mean"]), tuple(data["std"]), data["crop_pct"]) == NORMALIZE["imagenet"] + (1.0,)
    _, datamodule, _ = load_task(run_dir / TASK_FILE, search_path=[TEST_CONF])
    got = accuracy(model, datamodule, data["mean"], data["std"])
    assert got == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)  # the same count (results.json: float32)


def test_lora_adapter_loads_with_peft_onto_the_plain_timm_model(lora_run, exported):
    peft = pytest.importorskip("peft")
    _, run_dir = lora_run
    folder = Path(exported["peft"])
    assert folder == run_dir / "peft" and "peft_skipped" not in exported
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "vit_micro" and config["r"] == 16  # q and v: rank 2 x 8
    assert exported["peft_base_args"] == {"num_classes": 4, "img_size": 32}
    base = timm.create_model(  # offline-ok: vit_micro, packaged weights
        config["base_model_name_or_path"], pretrained=True, **exported["peft_base_args"]  # offline-ok
    )
    adapted = peft.PeftModel.from_pretrained(base, folder).eval()  # offline-ok: a local folder
    module, datamodule, _ = load_task(run_dir / TASK_FILE, search_path=[TEST_CONF])
    x = datamodule.normalize(datamodule.split("test").images[:16])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), module.eval()(x), rtol=0, atol=1e-5)


def test_cli_check_and_missing_task_file(lora_run, exported, tmp_path, capsys):
    record, run_dir = lora_run
    assert exported["test_acc_in_results"] == record["metrics"]["test_acc"]
    assert exported["test_acc_from_task_file"] == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)  # same count
    assert Path(exported["merged"]).is_dir() and Path(exported["peft"]).is_dir()
    assert main([str(run_dir), "--out", str(tmp_path / "elsewhere"), "--config-dir", TEST_CONF]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "elsewhere" / "merged" / "model.safetensors").is_file() and out["peft"].startswith(str(tmp_path))
    assert main([str(tmp_path)]) == 1
    assert "task.pt does not exist" in capsys.readouterr().err
    with pytest.raises(PeftbenchError):
        load_task(tmp_path / TASK_FILE)


def test_a_method_that_is_not_lora_nor_reparameterisable_keeps_its_wrappers(tmp_path):
    """VPT: no merged model and no peft adapter (the output says why); peftbench.load gives the wrapped model."""
    from peftbench.export import export_artefacts
    from peftbench.records.task_file import save_task
    from peftbench.train import build

    cfg = compose_config(TINY + ["method=vpt_shallow", f"paths.output_dir={tmp_path}/outputs"])
    task, _, module, _ = build(cfg)
    module.configure_model()
    save_task(module.model, module.method_state, cfg, tmp_path / "run" / TASK_FILE)
    out = export_artefacts(module, cfg, task, tmp_path / "run")
    assert set(out) == {"peft_skipped", "merged_skipped"} and "vpt" in out["peft_skipped"]
    assert "not reparameterisable" in out["merged_skipped"] and sorted(p.name for p in tmp_path.joinpath("run")
                                                                       .iterdir()) == [TASK_FILE]
    model, pre = peftbench.load(tmp_path / "run", search_path=[TEST_CONF])
    assert not model.training and pre == PREPROCESSING
    assert any(n.startswith("vpt.") for n, _ in model.named_parameters())  # the method's own model, prompts kept


def _doctored(run_dir: Path, dest: Path, edit) -> Path:
    shutil.copytree(run_dir, dest)
    for artefact in ("merged", "peft"):
        shutil.rmtree(dest / artefact, ignore_errors=True)
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
def test_check_fails_on_a_damaged_task_file_and_writes_no_artefact(lora_run, tmp_path, capsys, edit, message):
    _, run_dir = lora_run
    bad = _doctored(run_dir, tmp_path / "run", edit)
    assert main([str(bad), "--check", "--config-dir", TEST_CONF]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (bad / "merged").exists() and not (bad / "peft").exists()


def test_overrides_are_plain_values_only(lora_run, capsys):
    _, run_dir = lora_run
    assert main([str(run_dir), "dataset._target_=builtins.open", "--config-dir", TEST_CONF]) == 1
    assert "no _target_" in capsys.readouterr().err
