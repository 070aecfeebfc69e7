"""GPS and Child-Tuning-D: exact selection counts, frozen entries bit-identical after AdamW training, end to end.

GPS as its authors' code: per-row top-k of the block matrices and the patch embedding, every linear/conv bias,
norms frozen (ViT-B/16, k = 1: 167,424); scores from two augmented views per image over one full pass, batch 16.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.backbones.build import build_backbone
from peftbench.compose import compose_config
from peftbench.layers.sparse import SparseDeltaBiasLinear, SparseDeltaConv2d, SparseDeltaLinear, SparseParams
from peftbench.methods.base import merge, prepare_model, unwrap
from peftbench.methods.child_tuning import ChildTuningD
from peftbench.methods.gps import GPS, row_topk
from peftbench.scorers import contrastive as contrastive_module
from peftbench.scorers.base import matrix_key, patch_key
from peftbench.scorers.contrastive import Contrastive, supcon_loss
from peftbench.scorers.sensitivity import Sensitivity, matrix_scores
from peftbench.scorers.views import crop_box, two_views
from peftbench.train import execute
from tests.helpers import SCORED_TINY, TINY

C = 24


def micro(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=C, depth=2, num_heads=3, num_classes=3).eval()


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def real_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return Sensitivity(model_mode="eval")(model, [data()])


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps with strong decoupled weight decay (would shrink masked-gradient 'frozen' entries)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    x, y = data()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def backbone_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Backbone parameters by their plain timm name (model must be unwrapped), head excluded."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not anatomy.is_head_param(model, n)}


def test_row_topk_ties_and_count():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert row_topk(s, 2).tolist() == [1, 2, 4, 5]  # ties by column
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (7, 9), generator=g).float()  # many ties
    for k in (1, 3, 9, 12):
        ref = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : min(k, 9)]  # the reference
        assert torch.equal(row_topk(s, k), (torch.arange(7)[:, None] * 9 + ref).flatten())


def gps_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GPS's scores for the micro ViT: the contrastive scorer (two views, block matrices + patch embedding)."""
    return Contrastive()(model, [data()])


def layer_bias_names(model: torch.nn.Module) -> set[str]:
    """The reference for GPS's biases, by name: every linear / conv bias of the blocks and the patch embedding."""
    names = {f"{b.linear_path(t)}.bias" for b in anatomy.blocks(model) for t in b.targets()}
    return names | {"patch_embed.proj.bias"}


@pytest.mark.parametrize("k", [1, 3])
def test_gps_selects_k_per_row_and_freezes_the_rest(k):
    model = micro()
    before = backbone_weights(model)
    scores = gps_scores(model)
    assert patch_key(model) == "patch_embed.proj.weight" and scores["patch_embed.proj.weight"].shape == (C, 3 * 8 * 8)
    method = GPS(k=k)
    state = prepare_model(model, method, state=method.select(model, scores))
    total = 0
    layers = [(block.linear(t), block.rows(t), matrix_key(block, t)) for block, t in anatomy.iter_linear_targets(
        model, method.targets)]
    patch = anatomy.patch_embedding(model)
    assert isinstance(patch, SparseDeltaConv2d)
    layers.append((patch, None, "patch_embed.proj.weight"))
    for layer, rows, key in layers:
        assert isinstance(layer, (SparseDeltaLinear, SparseDeltaConv2d))
        mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
        mask[layer.sparse_indices] = True
        mask = anatomy.patch_embedding_matrix(mask.view_as(layer.weight))  # (out, in) for linears and the conv
        m = mask if rows is None else mask[rows]
        assert (m.sum(1) == k).all()  # exactly k per row of this matrix (q/k/v slices and patch embedding too)
        sel = scores[key]
        assert (sel[m].view(-1, k).min(1).values >= sel.masked_fill(m, -1).max(1).values).all()  # the top k
        total += int(m.sum())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and "head" not in n}
    biases = {n.replace(".base_layer", "") for n in trainable if n.endswith("bias")}
    assert biases == layer_bias_names(model)  # every linear / conv bias, no norm
    n_bias = sum(p.numel() for n, p in trainable.items() if n.endswith("bias"))
    assert sum(p.numel() for p in trainable.values()) == state["summary"]["trainable_backbone"] == total + n_bias
    indices = {p: i.clone() for p, i in state["sparse"].items()}
    train_steps(model)
    unwrap(model)
    after = backbone_weights(model)
    changed = 0
    for n, w0 in before.items():
        w = after[n]
        path = n.rpartition(".")[0]
        keep = torch.ones(w0.numel(), dtype=torch.bool)
        if n.endswith("weight") and path in indices:
            keep[indices[path]] = False
            changed += int((w.view(-1) != w0.view(-1))[~keep].sum())
        if n in layer_bias_names(model):
            continue  # trained whole
        assert torch.equal(w.view(-1)[keep], w0.view(-1)[keep]), n  # bit-identical outside the selection
    assert changed > 0


def test_gps_count_on_vit_b16_is_the_authors():
    """ViT-B/16 (random weights), k = 1: 12 x (2304 + 768 + 3072 + 768) + 768 weight rows, one entry each, plus
    their 83,712 biases = 167,424 (0.195 % of 85.8M), as the authors' pruning mask; without patch embedding and
    biases (the previous count) 82,944. Scores: random, with the contrastive scorer's keys and shapes."""
    torch.manual_seed(0)
    model = build_backbone("vit_b16_in21k", num_classes=10, timm_name="vit_base_patch16_224", pretrained=False)
    pretrained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    matrices, vectors = Contrastive().candidates(model)
    assert not vectors and len(matrices) == 12 * 6 + 1
    params = dict(model.named_parameters())
    scores = matrix_scores({n: torch.rand(params[n].shape) for n, _ in matrices.values()}, matrices)
    assert GPS(k=1, patch_embed=False, biases=False).select(model, scores)["summary"]["trainable_backbone"] == 82_944
    state = prepare_model(model, GPS(k=1), state=GPS(k=1).select(model, scores))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    assert trainable == state["summary"]["trainable_backbone"] == 167_424
    assert state["summary"]["patch_entries"] == 768 and state["summary"]["bias_params"] == 83_712
    assert round(100 * trainable / pretrained, 3) == 0.195


def test_two_views_are_seeded_augmentations_in_pixel_range():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(6, 3, 16, 16, generator=g)
    x = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    v1 = two_views(x, mean, std, torch.Generator().manual_seed(0))
    assert v1.shape == (12, 3, 16, 16)
    assert torch.equal(v1, two_views(x, mean, std, torch.Generator().manual_seed(0)))  # seeded
    assert not torch.equal(v1, two_views(x, mean, std, torch.Generator().manual_seed(1)))
    back = v1 * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert back.min() > -1e-5 and back.max() < 1 + 1e-5  # [0, 1] pixels
    assert all(not torch.allclose(v1[i], v1[6 + i]) for i in range(6))  # the two views of an image differ
    # over many draws: flip 1/2, grayscale 1/5, crop area in [0.08, 1] of the image and ratio in [3/4, 4/3]
    g = torch.Generator().manual_seed(0)
    boxes = [crop_box(224, 224, g) for _ in range(500)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 0.08 * 224 * 224 * 0.9 <= h * w <= 224 * 224 and 0.7 <= w / h <= 1.4
    plain = torch.rand(1, 3, 8, 8, generator=g)
    views = two_views(plain.expand(200, -1, -1, -1), (0.0,) * 3, (1.0,) * 3, g)  # (400, 3, 8, 8)
    gray = (views[:, 0] == views[:, 1]).all(-1).all(-1) & (views[:, 1] == views[:, 2]).all(-1).all(-1)
    assert 0.12 < gray.float().mean() < 0.28


def test_gps_scoring_defaults_to_one_full_pass_of_two_views_at_batch_16(tmp_path, monkeypatch):
    """scorer=contrastive: every training image once (scoring.n_samples null), batches of 16, two views each."""
    cfg = compose_config(["method=gps"])  # the method brings its scorer
    assert cfg.scoring.n_samples is None and cfg.scoring.batch_size == 16 and cfg.scorer.augment
    seen: list[int] = []
    real = contrastive_module.two_views

    def counting(x, *args):
        seen.append(len(x))
        return real(x, *args)

    monkeypatch.setattr(contrastive_module, "two_views", counting)
    cfg = compose_config(TINY + [f"paths.output_dir={tmp_path}/outputs", "method=gps",
                                 "trainer.max_epochs=1"])
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert seen == [16, 16, 16, 16]  # blobs' train800 (protocol tune) has 64 images: one pass
    assert record["params"]["trainable_backbone"] == record["selection"]["trainable_backbone"] > 0


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_child_tuning_count_and_frozen_bit_identical(p):
    model = micro()
    before = backbone_weights(model)
    scores = real_scores(model)
    candidates = sum(v.numel() for v in scores.values())
    method = ChildTuningD(p=p)
    state = prepare_model(model, method, state=method.select(model, scores))
    assert state["summary"]["selected"] == round(p * candidates) == state["summary"]["trainable_backbone"]
    trainable = sum(q.numel() for n, q in model.named_parameters() if q.requires_grad and "head" not in n)
    assert trainable == round(p * candidates)
    assert state["vectors"]
    if p == 0.3:  # the final norm gets SparseParams; some linear gets weight and bias entries in one wrapper
        assert any(isinstance(m, SparseParams) for m in model.modules())
        assert any(isinstance(m, SparseDeltaBiasLinear) and m.bias_indices.numel() for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    ref = micro()(x)  # same seed, untouched: identity at step 0 (head identical too)
    assert torch.equal(model(x), ref)
    selected = {n: torch.zeros(w.numel(), dtype=torch.bool) for n, w in before.items()}
    for path, idx in state["sparse"].items():
        selected[f"{path}.weight"][idx] = True
    for name, idx in state["vectors"].items():
        selected[name][idx] = True
    assert sum(int(s.sum()) for s in selected.values()) == round(p * candidates)
    # the global top-p: every selected score >= every unselected candidate score
    sel, unsel = [], []
    for block, target in anatomy.iter_linear_targets(model, method.targets):
        key, rows = matrix_key(block, target), block.rows(target)
        wname = f"{block.linear_path(target)}.weight"
        m = selected[wname].view_as(before[wname])
        m = m if rows is None else m[rows]
        sel.append(scores[key][m]), unsel.append(scores[key][~m])
    for name in scores:
        if scores[name].ndim == 1:
            sel.append(scores[name][selected[name]]), unsel.append(scores[name][~selected[name]])
    assert torch.cat(sel).min() >= torch.cat(unsel).max()
    train_steps(model)
    unwrap(model)
    assert not any(isinstance(m, (SparseParams, SparseDeltaLinear)) for m in model.modules())
    after = backbone_weights(model)
    for n, w0 in before.items():
        keep = ~selected[n]
        assert torch.equal(after[n].view(-1)[keep], w0.view(-1)[keep]), n
    assert sum(int((after[n].view(-1) != before[n].view(-1)).sum()) for n in before) > 0


def test_child_tuning_merge_matches_forward():
    model = micro()
    method = ChildTuningD(p=0.2)
    prepare_model(model, method, state=method.select(model, real_scores(model)))
    train_steps(model, 2)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


@pytest.mark.parametrize(("method", "scorer"), [("gps", "contrastive"), ("child_tuning", "sensitivity")])
def test_end_to_end_run(tmp_path, method, scorer):
    cfg = compose_config(
        TINY
        + [
            f"paths.output_dir={tmp_path}/outputs",
            f"method={method}",
            f"scorer={scorer}",
            *SCORED_TINY,
        ]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert record["params"]["trainable_backbone"] == record["selection"]["trainable_backbone"] > 0


def test_supcon_loss_and_contrastive_scorer_is_pure():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    good, bad = supcon_loss(f, torch.tensor([0, 0, 1, 1])), supcon_loss(f, torch.tensor([0, 1, 0, 1]))
    assert good < bad and supcon_loss(f, torch.tensor([0, 1, 2, 3])) == 0  # no positives: nothing
    model = micro()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    scores = Contrastive()(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(scores[k], v) for k, v in Contrastive()(model, [(x[:4], y[:4]), (x[4:], y[4:])]).items())
    exclude = ("class_token", "register_tokens", "position_embedding")  # the patch embedding is scored for GPS
    ref = Sensitivity(model_mode="eval", vectors=False, exclude=exclude)(model, [data()])
    assert scores.keys() == ref.keys() and all(scores[k].shape == ref[k].shape for k in ref)
    assert "patch_embed.proj.weight" in scores and not any(v.ndim == 1 for v in scores.values())
    assert all((v >= 0).all() for v in scores.values()) and sum(float(v.sum()) for v in scores.values()) > 0
    # |g1 + g2| <= |g1| + |g2| (gradients summed over the pass before the magnitude), equal where signs agree
    plain = Contrastive(augment=False)
    scores = plain(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    one = plain(model, [(x[:4], y[:4])])
    two = plain(model, [(x[4:], y[4:])])
    k = "blocks.0.mlp.fc1.weight"
    assert (scores[k] <= one[k] + two[k] + 1e-6).all() and not torch.allclose(scores[k], one[k] + two[k])
    state = GPS(k=2).select(model, scores)
    assert state["summary"]["trainable_backbone"] > 0
