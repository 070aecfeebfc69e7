"""The one timm-aware module: blocks, targets and qkv row layout."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.errors import WeightsError


def micro() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=3)


def test_qkv_rows_match_timm_reshape():
    """Rows from qkv_rows(parts, heads) are exactly timm's q/k/v head channels after its reshape."""
    model = micro()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 48)
    qkv = attn.qkv(x)  # (B, N, 3C)
    B, N, _ = qkv.shape
    split = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    for s, part in enumerate("qkv"):
        for h in range(attn.num_heads):
            rows = anatomy.qkv_rows(48, 4, parts=(part,), heads=[h])
            torch.testing.assert_close(qkv[..., rows], split[s, :, h], rtol=0, atol=0)


def test_blocks_of_vit_swin_convnext():
    vit = micro()
    views = anatomy.blocks(vit)
    assert [v.path for v in views] == ["blocks.0", "blocks.1"]
    assert views[0].num_heads == 4 and views[0].dim == 48 and views[0].head_dim == 12
    assert views[0].linear("v") is vit.blocks[0].attn.qkv and views[0].linear("fc2") is vit.blocks[0].mlp.fc2

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=32,
                             num_heads=(1, 2, 4, 8), num_classes=5)
    assert anatomy.heads_per_block(swin) == [1, 2, 4, 8]
    assert [v.dim for v in anatomy.blocks(swin)] == [32, 64, 128, 256]

    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    cviews = anatomy.blocks(convnext)
    assert cviews and all(v.attn is None and v.targets() == ("fc1", "fc2") for v in cviews)
    assert anatomy.head_prefix(convnext) == "head.fc."


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="unknown target"):
        list(anatomy.iter_linear_targets(micro(), ("q", "query")))


def test_check_structure_rejects_foreign_models():
    with pytest.raises(WeightsError, match="found no blocks"):
        anatomy.check_structure(torch.nn.Sequential(torch.nn.Linear(3, 3)), "mystery")


def test_one_accessor_for_wrappers_embedding_roles_and_matrix_names():
    from torch import nn

    from peftbench.backbones import anatomy
    from peftbench.layers.lora import LoRALinear

    base = nn.Linear(8, 8)
    wrapped = LoRALinear(LoRALinear(base, 2), 2)
    assert anatomy.base_layer(wrapped) is base and anatomy.base_layer(base) is base
    assert [anatomy.embedding_part(n) for n in ("cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight",
                                                  "blocks.0.norm1.weight")] == [*anatomy.EMBEDDING_PARTS, None]
    assert anatomy.matrix_target("blocks.3.attn.qkv.weight") == ("blocks.3", "qkv")
    assert anatomy.matrix_target("layers.1.blocks.0.attn.proj.weight") == ("layers.1.blocks.0", "proj")
    assert anatomy.matrix_target("blocks.0.mlp.fc2.weight") == ("blocks.0", "fc2")
    assert anatomy.matrix_target("blocks.0.norm1.weight") is None and anatomy.matrix_target("x.bias") is None


def test_pre_logits_are_what_the_head_reads():
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from peftbench.backbones import anatomy

    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(anatomy.head(model)(anatomy.pre_logits(model, x)), model(x))
