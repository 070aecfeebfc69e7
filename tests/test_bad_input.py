"""One clear line for every damaged or wrong input: the file, key or value, and what to do; never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones.checkpoint import load_checkpoint
from peftbench.data.decode import ImageTransform
from peftbench.data.fgvc import FGVCTask
from peftbench.data.vtab import VTABTask
from peftbench.errors import DataError, WeightsError
from tests.datagen import make_fgvc_folder, make_vtab_folder
from tests.helpers import TINY, train_cli


def _one_line_error(tmp_path: Path, *overrides: str) -> str:
    code, _, err = train_cli(*TINY, f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}",
                             "trainer.max_epochs=1", "scoring.n_samples=16", *overrides)
    assert code == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("peftbench: error:"), err
    return last


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimizer.lr=fast"], "optimizer.lr='fast': expected a number"),
        (["seed=abc"], "seed='abc': expected an integer"),
        (["trainer.max_epochs=two"], "trainer.max_epochs='two': expected an integer"),
        (["method.scale=abc"], "method"),
        (["method.rank=0"], "method.rank=0"),
        (["method.rank=100000"], "rank=100000: expected an integer in [1, 192]"),  # LoRA rank above min(in, out)
        (["method.dropout=2"], "method.dropout=2"),
        (["method=spt_lora", "method.budget=-5"], "budget"),
        (["method=spt_lora", "method.budget=abc"], "cannot parse budget"),
        (["method=hifi", "method.k=99"], "method.k=99: a layer has only 12 heads"),
        (["method=adapter", "method.n=0"], "method.n=0"),
        (["method=adaptformer", "method.n=0"], "method.n=0"),
        (["method=adaptformer", "method.input=raw"], "method.input='raw': choose block"),
        (["method=vpt_deep", "method.dropout=5"], "method.dropout=5"),
        (["method=gps", "method.k=0"], "k must be >= 1"),
        (["method=child_tuning", "method.p=2"], "p must be in [0, 1]"),
        (["method=cdra_spt", "method.block=22"], "block must be one of"),
        (["scoring.batch_size=0"], "scoring.batch_size=0"),
        (["label_smoothing=2"], "label_smoothing=2"),
        (["optimizer.weight_decay=-1"], "optimizer: Invalid weight_decay"),
        (["backbone.drop_path_rate=2"], "backbone.drop_path_rate=2"),
        (["data.image_size=7"], "data.image_size=7 but the backbone is built for 32"),
        (["protocol=paper", "paper_eval_every=0"], "paper_eval_every=0"),
        (["data.batch_size=0"], "data.batch_size=0"),
        (["protocol=nope"], "protocol='nope' is unknown"),
        (["method=heart_lora", "method.ne=99"], "deactivates 99 of 12 heads"),
        (["method=lora", "method.targets=[x]"], "unknown target(s) ['x']"),
        (["method=partial", "method.k=99"], "k must be in [1, 6]"),
        (["method=phm_adapter", "method.phm_dim=0"], "PHM dimension 0 must divide both widths"),
        (["method=tina", "method.rho=2"], "rho must be in (0, 1)"),
    ],
)
def test_wrong_values_are_one_line(tmp_path, overrides, needle):
    assert needle in _one_line_error(tmp_path, *overrides)


# --- checkpoints -------------------------------------------------------------------------------------------------
def _micro(width: int = 24) -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=width, depth=2, num_heads=4, num_classes=3)


@pytest.fixture
def good_files(tmp_path) -> dict[str, Path]:
    state = {k: v.contiguous() for k, v in _micro().state_dict().items()}
    save_file(state, str(tmp_path / "good.safetensors"))
    torch.save(state, tmp_path / "good.pt")
    return {"safetensors": tmp_path / "good.safetensors", "pt": tmp_path / "good.pt"}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".npz"])
@pytest.mark.parametrize("damage", ["text", "empty", "truncated"])
def test_damaged_checkpoints_are_one_line(tmp_path, good_files, suffix, damage):
    path = tmp_path / f"weights{suffix}"
    if damage == "text":
        path.write_text("<html>404 not found</html>\n")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        source = good_files["safetensors" if suffix == ".safetensors" else "pt"]
        blob = source.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError) as info:
        load_checkpoint(_micro(), path, name="micro")
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_a_checkpoint_of_another_architecture_names_the_key_and_both_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in _micro(width=48).state_dict().items()}, str(path))
    shapes = r"\w+ is \((1, )?(17, )?48(, 24)?,?\) in the file but \((1, )?(17, )?24,?(, 24)?\) in the model"
    with pytest.raises(WeightsError, match=shapes):
        load_checkpoint(_micro(width=24), path, name="micro")


def test_a_truncated_checkpoint_on_resume_is_one_line(tmp_path):
    kill = "+callbacks.kill={_target_: tests.helpers.SignalAtEpoch, epoch: 0}"
    args = [f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=2", kill]
    assert train_cli(*TINY, *args)[0] == 143
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = train_cli(*TINY, *args, "resume=true")
    assert code == 1 and "Traceback" not in err
    assert "last.ckpt cannot be read" in err.strip().splitlines()[-1]


# --- data files --------------------------------------------------------------------------------------------------
def test_a_latin1_byte_in_a_split_file_is_one_line(tmp_path):
    make_vtab_folder(tmp_path, num_classes=3)
    lines = (tmp_path / "test.txt").read_bytes().splitlines()
    lines[2] = lines[2].replace(b".jpg", b"\xe9.jpg")
    (tmp_path / "test.txt").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"test.txt line 3: not UTF-8 \(byte b'\\xe9'"):
        VTABTask("dtd", tmp_path, num_classes=3, cache=False).load_split("test", 16)


def test_a_list_as_fgvc_class_id_is_one_line(tmp_path):
    make_fgvc_folder(tmp_path, {"train": [1, 2], "val": [1, 2], "test": [1, 2]})
    anno = json.loads((tmp_path / "val.json").read_text())
    anno[next(iter(anno))] = [1, 2]
    (tmp_path / "val.json").write_text(json.dumps(anno))
    with pytest.raises(DataError, match=r"val.json: class id of .* is \[1, 2\]; class ids are integers"):
        FGVCTask("cub", tmp_path, num_classes=2, cache=False).load_split("train", 16)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../../etc/passwd", "images/../../secret.jpg"])
def test_split_paths_cannot_leave_the_dataset(tmp_path, bad):
    make_vtab_folder(tmp_path / "task", num_classes=3)
    (tmp_path / "task" / "test.txt").write_text(f"images/test/000000.jpg 0\n{bad} 1\n")
    with pytest.raises(DataError, match="line 2: image path .* leaves the dataset folder"):
        VTABTask("dtd", tmp_path / "task", num_classes=3, cache=False).load_split("test", 16)
    make_fgvc_folder(tmp_path / "fgvc", {"train": [1, 2], "val": [1, 2], "test": [1, 2]})
    (tmp_path / "fgvc" / "test.json").write_text(json.dumps({bad: 1}))
    with pytest.raises(DataError, match="leaves the dataset folder"):
        FGVCTask("cub", tmp_path / "fgvc", num_classes=2, cache=False).load_split("test", 16)


def test_a_fifo_named_as_an_image_is_refused_not_waited_on(tmp_path):
    make_vtab_folder(tmp_path, num_classes=3)
    fifo = tmp_path / "images" / "test" / "000001.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="000001.jpg is not a regular file"):
        VTABTask("dtd", tmp_path, num_classes=3, cache=False).load_split("test", 16)


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    out = ImageTransform(8)(path)  # (3, 8, 8) uint8, no resize at this size
    assert out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out[0], np.rint(wide / 257.0).astype(np.uint8))
    assert out.max() == 251 and len(np.unique(out)) == 64  # clipping would leave 255 for almost every pixel
