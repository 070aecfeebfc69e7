"""CDRA-SPT: compact sub-matrix, Eq. 7 rank bound, exact scatter, identity at step 0, merge, ablations, end to end."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.compose import compose_config
from peftbench.layers.compact_lora import CompactLoRALinear
from peftbench.methods.base import merge, prepare_model, unmerge
from peftbench.methods.cdra_spt import CDRASPT, compact_index, dynamic_rank
from peftbench.methods.spt_lora import SPTLoRA
from peftbench.scorers.sensitivity import Sensitivity
from peftbench.train import execute
from tests.helpers import SCORED_TINY, TINY

C = 24
DUMMY_BATCH = (None, torch.zeros(1))  # the crafted scorers below read no data; prepare_model wants some
QROWS = torch.tensor([0, 2, 3, 5, 7, 9, 11, 13, 16, 17, 19, 23])  # (12,)
QCOLS = torch.tensor([1, 3, 4, 6, 8, 9, 10, 14, 15, 20, 21, 22])  # (12,)
FCOLS = torch.arange(0, 24, 2)  # (12,)


def micro(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=C, depth=2, num_heads=3, num_classes=3).eval()


def scores_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Background noise plus hot entries concentrated in a few rows x cols of q (block 0) and fc1 (block 1)."""
    scores = Sensitivity(model_mode="eval")(model, [(torch.zeros(1, 3, 16, 16), torch.tensor([0]))])
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(v.shape, generator=g) * 1e-3 for k, v in scores.items()}
    q = scores["blocks.0.attn.qkv.weight:q"]  # (24, 24)
    q[QROWS[:, None], QCOLS[None, :]] = 1.0  # 144 entries in 12 x 12: Eq. 7 r = 1
    fc1 = scores["blocks.1.mlp.fc1.weight"]  # (96, 24)
    fc1[torch.arange(10, 58)[:, None], FCOLS[None, :]] = 1.0  # 576 entries in 48 x 12: Eq. 7 r = 2
    scores["blocks.0.attn.qkv.weight:k"][3, 4] = 1.0  # a lone entry: Eq. 7 gives r = 0
    return scores


BUDGET = 144 + 576 + 1  # tau: exactly the hot entries


def test_compact_index_and_dynamic_rank():
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[[1, 4], 2] = True
    mask[4, 0] = True
    rows, cols = compact_index(mask)
    assert rows.tolist() == [1, 4] and cols.tolist() == [0, 2]
    r11, c11 = compact_index(mask, block="11")  # sensitive rows x other cols
    assert r11.tolist() == [1, 4] and c11.tolist() == [1, 3, 4]
    r01, c01 = compact_index(mask, block="01")
    assert r01.tolist() == [0, 2, 3, 5] and c01.tolist() == [1, 3, 4]
    # Eq. 7: count >= r (d_bar + k_bar) d k / (d_bar k_bar)
    for count, db, kb, d, k in [(42, 6, 7, 24, 24), (2000, 300, 500, 768, 768), (80, 20, 4, 96, 24), (1, 1, 1, 24, 24)]:
        r = dynamic_rank(count, db, kb, d, k)
        assert count >= r * (db + kb) * d * k / (db * kb)
        assert count < (r + 1) * (db + kb) * d * k / (db * kb)
        assert r * (db + kb) <= count


def test_selection_scatter_and_rank_bound():
    model = micro()
    scores = scores_for(model)
    method = CDRASPT(tau=BUDGET, rank=None)
    state = method.select(model, scores)
    blocks = state["blocks"]
    (q,) = blocks["blocks.0.attn.qkv"]
    assert q["rows"].tolist() == QROWS.tolist() and q["cols"].tolist() == QCOLS.tolist() and q["rank"] == 1
    (f,) = blocks["blocks.1.mlp.fc1"]
    assert f["rows"].tolist() == list(range(10, 58)) and f["cols"].tolist() == FCOLS.tolist() and f["rank"] == 2
    for spec, count in [(q, 144), (f, 576)]:  # Eq. 7: trainable never exceeds the sensitive count
        assert spec["rank"] >= 1 and spec["rank"] * (len(spec["rows"]) + len(spec["cols"])) <= count
    # the lone k entry: r = 0 -> its entry alone, at row C + 3 of the fused qkv
    assert state["sparse"]["blocks.0.attn.qkv"].tolist() == [(C + 3) * C + 4]
    prepare_model(model, method, state=state)
    layer = anatomy.blocks(model)[0].linear("q")
    assert isinstance(layer, CompactLoRALinear)
    with torch.no_grad():
        for p in layer.lora_B:
            p.normal_()
        layer.sparse_delta.fill_(1.0)
    dw = layer.delta_weight()  # (72, 24)
    expect = torch.zeros(3 * C, C, dtype=torch.bool)
    expect[QROWS[:, None], QCOLS[None, :]] = True
    expect[C + 3, 4] = True
    assert ((dw != 0) == expect).all()  # exactly the selected rows x cols (and the sparse entry), zero elsewhere
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    assert trainable == state["summary"]["trainable_backbone"] <= BUDGET + C  # sensitive entries + class token


def test_identity_at_step_zero_and_merge():
    model = micro()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    prepare_model(model, CDRASPT(tau=BUDGET), state=CDRASPT(tau=BUDGET).select(model, scores_for(model)))
    model.head.load_state_dict(head)
    assert torch.equal(model(x), ref)  # B = 0, sparse delta = 0: identity
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "sparse_delta" in n:
                p.normal_(0, 0.1)
    out = model(x)
    assert not torch.allclose(out, ref)
    merge(model)
    assert torch.allclose(model(x), out, atol=1e-5)
    unmerge(model)
    assert torch.allclose(model(x), out, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 8},
        {"size_factor": 0.5},
        {"size_factor": 1.5},
        {"block": "00"},
        {"block": "01"},
        {"block": "11"},
        {"cases": [1]},
        {"cases": [2]},
        {"cases": []},
        {"rank_fallback": "none"},
    ],
)
def test_ablations_build_and_count(kwargs):
    model = micro()
    method = CDRASPT(tau=BUDGET, **kwargs)
    state = method.select(model, scores_for(model))
    prepare_model(model, method, state=state)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    assert trainable == state["summary"]["trainable_backbone"]
    model(torch.randn(1, 3, 16, 16)).sum().backward()


def test_case_ablation_uses_spt_treatment():
    model = micro()
    scores = scores_for(model)
    # with spt_rank=1, q (144 >= 1*(24+24)/10) and fc1 are Case 2; k's lone entry is Case 1
    state = CDRASPT(tau=BUDGET, spt_rank=1, cases=[1]).select(model, scores)
    (q,) = state["blocks"]["blocks.0.attn.qkv"]
    assert q["rank"] == 1 and q["rows"].tolist() == list(range(C)) and len(q["cols"]) == C  # SPT's full LoRA
    state = CDRASPT(tau=BUDGET, spt_rank=1, cases=[2]).select(model, scores)
    (q,) = state["blocks"]["blocks.0.attn.qkv"]
    assert len(q["rows"]) == 12 and len(q["cols"]) == 12  # compact
    assert state["sparse"]["blocks.0.attn.qkv"].numel() == 1  # Case 1 left to SPT: its sparse entry


def random_scores(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Skewed random scores on every candidate (a few matrices hot)."""
    g = torch.Generator().manual_seed(seed)
    shapes = Sensitivity(model_mode="eval")(model, [(torch.zeros(1, 3, 16, 16), torch.tensor([0]))])
    return {
        k: torch.rand(v.shape, generator=g) ** 3 * (1 + 4 * (i % 5 == 0)) for i, (k, v) in enumerate(shapes.items())
    }


@pytest.mark.parametrize("budget", [1500, 4000])
def test_budget_takes_spt_lora_selection_and_cdra_trains_less(budget):
    model = micro()
    scores = random_scores(model)
    spt = SPTLoRA(budget=budget, rank=8).select(model, scores)
    state = prepare_model(
        model, method := CDRASPT(budget=budget), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH]
    )
    s = method.describe(state)
    assert state["tau"] == spt["tau"] and s["budget_of"] == "spt"  # SPT's selection, reused as is
    assert s["spt_trainable"] == s["searched_trainable"] == spt["summary"]["trainable_backbone"]
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n)
    assert trainable == s["trainable_backbone"] < s["spt_trainable"]  # fewer parameters at the same selection
    assert state["cls_token"] and model.cls_token.requires_grad


def test_budget_of_cdra_searches_its_own_count():
    model = micro()
    scores = random_scores(model)
    own = CDRASPT(budget=1500, budget_of="cdra").select(model, scores)["summary"]
    at_spt_tau = CDRASPT(budget=1500).select(model, scores)["summary"]
    assert own["searched_trainable"] == own["trainable_backbone"]
    assert abs(own["trainable_backbone"] - 1500) < abs(at_spt_tau["trainable_backbone"] - 1500)
    assert own["budget_met"] == (abs(own["trainable_backbone"] - 1500) <= 30)


def test_end_to_end_run(tmp_path):
    cfg = compose_config(
        TINY
        + [
            f"paths.output_dir={tmp_path}/outputs",
            "method=cdra_spt",
            "method.budget=5K",
            *SCORED_TINY,
        ]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    sel = record["selection"]
    assert record["params"]["trainable_backbone"] == sel["trainable_backbone"] > 0
    assert sel["budget"] == 5000 and sel["tau"] == sel["selected"] > 0 and sel["spt_trainable"] > 0
