"""SPT-LoRA / SPT-Adapter: allocation rules (alpha, beta, budget, ablations), exact apply, merge, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.accounting import parameter_report
from peftbench.backbones import anatomy
from peftbench.layers.adapter import SequentialAdapter
from peftbench.layers.lora import LoRALinear
from peftbench.layers.sparse import SparseDeltaLinear, SparseLoRALinear
from peftbench.methods.base import prepare_model, unwrap
from peftbench.methods.spt_adapter import SPTAdapter
from peftbench.methods.spt_lora import SPTLoRA, parse_budget, top_mask
from peftbench.scorers.sensitivity import Sensitivity
from peftbench.train import compose_config, execute
from tests.helpers import SCORED_TINY, TINY

DUMMY_BATCH = (None, torch.zeros(1))  # the crafted scorers below read no data; prepare_model wants some
C = 24  # micro width: q slice 24x24, LoRA-8 on q = 8*(24+24) = 384 params -> alpha=10 threshold 38.4


def micro(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=C, depth=2, num_heads=3, num_classes=3).eval()


def crafted_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tiny background scores plus chosen hot entries: q of block 0 gets 39 (>= 38.4: LoRA), k of block 0 gets
    38 (< 38.4: sparse), fc2 of block 1 gets 5 (sparse), norm1.weight of block 0 gets 5/24 (>= 1/5: tuned whole),
    norm2.bias of block 1 gets 4/24 (< 1/5: not tuned). Budget = 39+38+5+5+4 = 91 selects exactly the hot ones."""
    scores = Sensitivity(model_mode="eval")(model, [(torch.zeros(1, 3, 16, 16), torch.tensor([0]))])
    scores = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) * 1e-3 for k, v in scores.items()}
    hot = {
        "blocks.0.attn.qkv.weight:q": 39,
        "blocks.0.attn.qkv.weight:k": 38,
        "blocks.1.mlp.fc2.weight": 5,
        "blocks.0.norm1.weight": 5,
        "blocks.1.norm2.bias": 4,
    }
    for k, n in hot.items():
        scores[k].view(-1)[torch.randperm(scores[k].numel(), generator=torch.Generator().manual_seed(1))[:n]] = 1.0
    return scores


def test_parse_budget_and_top_mask():
    assert parse_budget("0.4M") == 400_000 and parse_budget("400K") == 400_000 and parse_budget(4e5) == 400_000
    assert parse_budget(" 1.5k ") == 1500 and parse_budget(91) == 91
    with pytest.raises(ValueError):
        parse_budget("lots")
    mask = top_mask(torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0]), 3)
    assert mask.tolist() == [False, True, True, True, False]  # exactly k, ties broken by position


def test_allocation_honours_alpha_beta_and_budget():
    model = micro()
    state = SPTLoRA(budget=91, rank=8).select(model, crafted_scores(model))
    assert state["structured"] == ["blocks.0.attn.qkv.weight:q"]
    assert sorted(state["sparse"]) == ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    k_idx = state["sparse"]["blocks.0.attn.qkv"]
    assert len(k_idx) == 38 and ((k_idx // C >= C) & (k_idx // C < 2 * C)).all()  # k rows of qkv
    assert state["vectors"] == ["blocks.0.norm1.weight"]
    s = state["summary"]
    assert s["unstructured_entries"] == 43 <= s["budget"] == 91
    assert s["trainable_backbone"] == 43 + 384 + C
    ablated = SPTLoRA(budget=91, structured=False).select(model, crafted_scores(model))
    assert ablated["structured"] == [] and ablated["summary"]["unstructured_entries"] == 82
    only = SPTLoRA(budget=91, unstructured=False).select(model, crafted_scores(model))
    assert only["sparse"] == {} and only["vectors"] == [] and only["summary"]["trainable_backbone"] == 384


@pytest.mark.parametrize("cls", [SPTLoRA, SPTAdapter])
def test_apply_trainable_set_matches_summary_and_step0_is_identity(cls):
    model, x = micro(), torch.randn(2, 3, 16, 16)
    ref = model(x)
    method = cls(budget=91) if cls is SPTLoRA else cls(budget=91, alpha=10.7)  # adapter: 416/10.7 = 38.9 <= 39
    state = prepare_model(model, method, scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH])
    report = parameter_report(model, 0)
    assert report["trainable_backbone"] == method.describe(state)["trainable_backbone"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    blk = anatomy.blocks(model)
    if cls is SPTLoRA:
        assert isinstance(blk[0].linear("q"), SparseLoRALinear) and isinstance(blk[1].linear("fc2"), SparseDeltaLinear)
        assert isinstance(blk[0].linear("fc1"), torch.nn.Linear)
    else:  # q of block 0 is structured -> one adapter after block 0's attention; k sparse in the same qkv
        assert isinstance(blk[0].linear("proj"), SequentialAdapter)
        assert isinstance(blk[0].linear("q"), SparseDeltaLinear) and blk[0].linear("q").nnz == 38
        assert method.describe(state)["structured_params"] == 2 * C * 8 + 8 + C
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trainable and "blocks.1.norm2.bias" not in trainable
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_spt_lora_merges_into_plain_timm_model():
    model, x = micro(), torch.randn(2, 3, 16, 16)
    prepare_model(model, SPTLoRA(budget=91), scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "sparse_delta" in n:
                p.normal_(0, 0.1)
    out = model(x)
    unwrap(model)
    assert not any(isinstance(m, (LoRALinear, SparseDeltaLinear)) for m in model.modules())
    assert set(model.state_dict()) == set(micro().state_dict())
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
def test_end_to_end_run(tmp_path, method):
    cfg = compose_config(
        TINY
        + [
            f"paths.output_dir={tmp_path}/outputs",
            f"method={method}",
            "scorer=sensitivity",
            "method.budget=5K",
            *SCORED_TINY,
        ]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert record["params"]["trainable_backbone"] == record["selection"]["trainable_backbone"] > 0


def test_score_cli_writes_loadable_file(tmp_path, monkeypatch):
    from peftbench import score

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.pt"
    rc = score.main(
        TINY
        + [
            "scorer=sensitivity",
            "method=spt_lora",
            "method.budget=2K",
            "scoring.n_samples=16",
            "scoring.batch_size=8",
            f"out={out}",
        ]
    )
    assert rc == 0
    record = torch.load(out, weights_only=True)
    assert "blocks.0.attn.qkv.weight:q" in record["scores"]
    assert record["summary"]["selected"] == 2000 and record["state"]["budget"] == 2000


def test_score_module_runs_as_a_script(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli.pt"
    args = [sys.executable, "-m", "peftbench.score", *TINY, "scorer=sensitivity", "scoring.n_samples=8", f"out={out}"]
    subprocess.run(args, check=True, cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=120)
    record = torch.load(out, weights_only=True)
    assert record["state"] is None and "blocks.0.mlp.fc1.weight" in record["scores"]  # method=lora: no selection
