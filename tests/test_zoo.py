"""Every method in conf/method/, through the same interface: paper-size forward/backward, and digits training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from peftbench.backbones.build import build_backbone
from peftbench.compose import compose_config
from peftbench.methods.base import prepare_model
from peftbench.train import execute

METHODS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))




def needs_scores(method: str) -> bool:
    return bool(getattr(instantiate(compose_config([f"method={method}"]).method), "needs_scores", False))


def prepare(model: torch.nn.Module, method: str, batches: list):
    """Apply ``method`` from its config; a scoring method's config brings its scorer, run on ``batches``."""
    cfg = compose_config([f"method={method}"])
    m = instantiate(cfg.method)
    scorer = instantiate(cfg.scorer) if cfg.get("scorer") else None
    prepare_model(model, m, scorer, lambda: batches)
    return m


@pytest.mark.parametrize("method", METHODS)
def test_paper_configuration_forward_backward(method):
    """ViT-B/16 at 224x224 (random weights): one training step's gradients reach exactly the trainable set."""
    torch.manual_seed(0)
    model = build_backbone("vit_b16_in21k", num_classes=10, timm_name="vit_base_patch16_224", pretrained=False)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 2])
    prepare(model, method, [(x, y)])
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_trains_on_embedded_digits_above_chance(tmp_path, method):
    """The embedded default (pre-trained vit_micro, embedded/digits): every method beats chance (0.1) clearly."""
    cfg = compose_config([
        f"method={method}", "logger=none", f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false",
        "trainer.max_epochs=3", "scheduler.warmup_epochs=1", "optimizer.lr=3e-3",
    ])
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok"
    assert record["metrics"]["test_acc"] > 0.3, record["metrics"]


@pytest.mark.parametrize("method", METHODS)
def test_reparameterisable_methods_merge_into_a_plain_timm_model(method):
    """Merged plain timm model == unmerged model (after training-like perturbation), with timm's exact keys."""
    from timm.models.vision_transformer import VisionTransformer

    from peftbench.methods.base import unwrap

    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    torch.manual_seed(0)
    model = VisionTransformer(**arch)
    if not instantiate(compose_config([f"method={method}"]).method).reparameterisable:
        pytest.skip(f"{method} adds modules that do not fold into the backbone")
    prepare(model, method, [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    plain = unwrap(model)
    assert set(plain.state_dict()) == set(VisionTransformer(**arch).state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)


SWIN = {"lora": [], "spt_lora": [], "tina": [], "heart_lora": ["method.ratio=0.25"], "hifi": ["method.ratio=0.25"]}


@pytest.mark.parametrize("method", sorted(SWIN))
def test_swin_b_paper_configuration_forward_backward(method):
    """Swin-B at 224x224 (random weights), the hierarchical backbone of SPT Table 3, Heart-LoRA Table 4 and TINA:
    gradients reach exactly the trainable set; per-stage head ratios give Heart-LoRA's {1, 2, 4, 8}."""
    torch.manual_seed(0)
    model = build_backbone("swin_b_in22k", num_classes=10, timm_name="swin_base_patch4_window7_224", pretrained=False)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 2])
    cfg = compose_config([f"method={method}", *SWIN[method]])
    m, scorer = instantiate(cfg.method), instantiate(cfg.scorer) if cfg.get("scorer") else None
    state = prepare_model(model, m, scorer, lambda: [(x, y)])
    if method == "heart_lora":
        assert sorted(set(state["ne"].values())) == [1, 2, 4, 8]
    if method == "hifi":
        assert sorted({len(h) for h in state["heads"].values()}) == [1, 2, 4, 8]
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
