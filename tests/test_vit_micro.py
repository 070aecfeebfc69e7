"""``vit_micro`` is a timm model once peftbench is imported: packaged weights offline, one architecture, and the
default run's backbone is built exactly as before it was registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy, build_backbone, vit_micro
from peftbench.backbones.checkpoint import load_checkpoint
from peftbench.data.base import NORMALIZE
from peftbench.errors import WeightsError
from peftbench.plots import sweeps
from peftbench.pretrain import run as pretrain

CONF = Path(__file__).resolve().parent.parent / "conf"
ASSET = Path(vit_micro.asset_path())
needs_asset = pytest.mark.skipif(not ASSET.is_file(), reason="packaged vit_micro weights not built")
#: the architecture the shipped weights were trained with, as pre-training recorded it
RECORDED = {k: v for k, v in json.loads(ASSET.with_suffix(".json").read_text())["architecture"].items()
            if k not in ("class", "timm_name")}


def test_registered_with_its_preprocessing():
    assert "vit_micro" in timm.list_models() and "vit_micro.fractal" in timm.list_pretrained()
    cfg = timm.models.get_pretrained_cfg("vit_micro")
    assert Path(cfg.file) == ASSET and not cfg.url and not cfg.hf_hub_id  # offline by construction
    assert cfg.num_classes == 0 and cfg.input_size == (3, 32, 32) and cfg.interpolation == "bicubic"
    assert (tuple(cfg.mean), tuple(cfg.std)) == NORMALIZE["imagenet"]  # what pre-training and the runs use
    assert pretrain.MEAN.flatten().tolist() == torch.tensor(cfg.mean).tolist() and pretrain.IMAGE_SIZE == 32


def test_one_architecture_the_one_the_weights_were_trained_with():
    assert RECORDED == vit_micro.ARGS
    model = pretrain.build_vit_micro(7)
    assert isinstance(model, VisionTransformer) and model.pretrained_cfg["architecture"] == "vit_micro"
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.num_classes) == (192, 6, 12, 7)
    assert model.patch_embed.patch_size == (8, 8) and model.blocks[0].mlp.fc1.out_features == 4 * 192
    assert sweeps.backbone_width("vit_micro") == 192


@needs_asset
def test_pretrained_true_gives_the_packaged_weights_offline():
    model = timm.create_model("vit_micro", pretrained=True)  # offline-ok: packaged weights
    packaged = {k: v.float() for k, v in load_file(str(ASSET)).items()}
    state = model.state_dict()
    assert set(state) == set(packaged) and all(torch.equal(state[k], packaged[k]) for k in packaged)
    assert model.num_classes == 0 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 192)  # features: no head
    with_head = timm.create_model("vit_micro", pretrained=True, num_classes=5)  # offline-ok
    assert torch.equal(with_head.blocks[3].mlp.fc2.weight, packaged["blocks.3.mlp.fc2.weight"])


@needs_asset
def test_default_backbone_built_exactly_as_before_registration():
    """conf/backbone/vit_micro.yaml now names the timm model; under the same seed it yields the same weights, the same
    fresh head and leaves the RNG where the former build (VisionTransformer(**arch) + asset + reset head) left it, so
    the default run's numbers do not change."""
    cfg = OmegaConf.load(CONF / "backbone" / "vit_micro.yaml")
    assert cfg.timm_name == "vit_micro" and "arch" not in cfg and "asset" not in cfg
    torch.manual_seed(0)
    new = instantiate(cfg, num_classes=10)
    after_new = torch.rand(3)
    torch.manual_seed(0)
    old = VisionTransformer(**RECORDED, num_classes=10, drop_path_rate=cfg.drop_path_rate)
    load_checkpoint(old, ASSET)
    anatomy.reset_head(old, 10)
    after_old = torch.rand(3)
    assert torch.equal(after_new, after_old)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert set(old_state) == set(new_state) and all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    assert new.blocks[1].drop_path1.drop_prob == old.blocks[1].drop_path1.drop_prob


def test_missing_packaged_weights_name_the_fix(monkeypatch, tmp_path):
    from peftbench.backbones import build

    cfg = timm.models.get_pretrained_cfg("vit_micro")  # a copy
    cfg.file = str(tmp_path / "absent.safetensors")
    monkeypatch.setattr(build, "get_pretrained_cfg", lambda name: cfg)
    with pytest.raises(WeightsError, match="make pretrain"):
        build_backbone("vit_micro", num_classes=3, timm_name="vit_micro")


def test_custom_arch_is_built_by_timm_and_records_its_arguments():
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0)
    torch.manual_seed(1)
    model = build_backbone("custom", num_classes=3, arch=arch, pretrained=False)
    torch.manual_seed(1)
    plain = VisionTransformer(**arch, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert arch.items() <= model._model_args.items()  # what an export writes as timm's model_args
    with pytest.raises(WeightsError, match="custom arch has no pre-trained weights"):  # never vit_base's hub weights
        build_backbone("custom", num_classes=3, arch=arch, pretrained=True)  # offline-ok: refused before any hub
