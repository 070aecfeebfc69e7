"""SPT-LoRA / SPT-Adapter: the budget is trainable parameters (against a plain loop over every tau), allocation rules
(alpha, beta, ablations), the authors' details (adapter placement, dropout, vectors below beta, qkv bias as three
vectors, class token), exact apply, merge, end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from peftbench.accounting import backbone_size, parameter_report
from peftbench.backbones import anatomy
from peftbench.compose import compose_config
from peftbench.layers.adapter import ParallelAdapter, SliceAdapter
from peftbench.layers.lora import LoRALinear
from peftbench.layers.sparse import SparseDeltaLinear, SparseLoRALinear
from peftbench.methods.base import merge, prepare_model, unwrap
from peftbench.methods.spt_adapter import SPTAdapter
from peftbench.methods.spt_lora import BUDGET_TOLERANCE, SPTLoRA, parse_budget, ranked_top, search_tau
from peftbench.scorers.base import top_mask
from peftbench.scorers.sensitivity import Sensitivity
from peftbench.train import execute
from tests.helpers import SCORED_TINY, TINY

DUMMY_BATCH = (None, torch.zeros(1))  # the crafted scorers below read no data; prepare_model wants some
C = 24  # micro width: q slice 24x24, LoRA-8 on q = 8*(24+24) = 384 params -> alpha=10 threshold 38.4
QKV_BIAS = "blocks.0.attn.qkv.bias"


def micro(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=C, depth=2, num_heads=3, num_classes=3).eval()


def score_shapes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sensitivity scorer's keys and shapes for ``model`` (values: its real scores on one blank image)."""
    return Sensitivity(model_mode="eval")(model, [(torch.zeros(1, 3, 16, 16), torch.tensor([0]))])


def crafted_scores(model: torch.nn.Module, hot: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Tiny background scores plus chosen hot entries (score 1). Default: q of block 0 gets 39 (>= 38.4: LoRA), k of
    block 0 gets 38 (< 38.4: sparse), fc2 of block 1 gets 5 (sparse), norm1.weight of block 0 gets 5/24 (>= 1/5:
    tuned whole), norm2.bias of block 1 gets 4/24 (< 1/5: its 4 entries). tau = 91 selects exactly the hot ones."""
    scores = {
        k: torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
        for k, v in score_shapes(model).items()
    }
    hot = hot or {
        "blocks.0.attn.qkv.weight:q": 39,
        "blocks.0.attn.qkv.weight:k": 38,
        "blocks.1.mlp.fc2.weight": 5,
        "blocks.0.norm1.weight": 5,
        "blocks.1.norm2.bias": 4,
    }
    for k, n in hot.items():
        scores[k].view(-1)[torch.randperm(scores[k].numel(), generator=torch.Generator().manual_seed(1))[:n]] = 1.0
    return scores


def random_scores(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Skewed random scores on every candidate (a few matrices hot), so structured modules enter at many tau."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, v) in enumerate(score_shapes(model).items()):
        out[k] = torch.rand(v.shape, generator=g) ** 3 * (1 + 4 * (i % 5 == 0))
    return out


def trainable_backbone(model: torch.nn.Module) -> int:
    return parameter_report(model, 0)["trainable_backbone"]


# --- item 1: the budget is the trainable count ---------------------------------------------------------------------
def reference_trainable(
    model: torch.nn.Module, scores: dict, rank: int = 8, alpha: float = 10, beta: float = 5
) -> list:
    """Trainable backbone parameters of SPT-LoRA at EVERY tau, by a plain loop: walk the candidate entries best first
    (ties: flat position), keep each unit's sensitive count, and its cost: a matrix costs its LoRA (rank*(in+out))
    once it has >= that/alpha entries, else its entries; a vector (the fused qkv bias as q, k, v) its length once
    >= length/beta, else its entries; plus the class token."""
    keys = [k for k in scores if scores[k].ndim == 2] + [k for k in scores if scores[k].ndim == 1]
    unit_of, costs, thresholds = [], [], []
    for k in keys:
        n = scores[k].numel()
        if scores[k].ndim == 2:
            rows, cols = scores[k].shape
            costs.append(rank * (rows + cols))
            thresholds.append(rank * (rows + cols) / alpha)
            unit_of += [len(costs) - 1] * n
        elif k.endswith("attn.qkv.bias"):
            for _ in range(3):
                costs.append(n // 3)
                thresholds.append(n / 3 / beta)
                unit_of += [len(costs) - 1] * (n // 3)
        else:
            costs.append(n)
            thresholds.append(n / beta)
            unit_of += [len(costs) - 1] * n
    flat = torch.cat([scores[k].flatten() for k in keys]).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    counts = [0] * len(costs)
    total = model.cls_token.numel()
    out = [total]
    for i in order:
        u = unit_of[i]
        before = costs[u] if counts[u] >= thresholds[u] and counts[u] > 0 else counts[u]
        counts[u] += 1
        after = costs[u] if counts[u] >= thresholds[u] else counts[u]
        total += after - before
        out.append(total)
    return out


@pytest.mark.parametrize("budget", [300, 1000, 2500, 6000, 9000])
def test_budget_is_trainable_parameters_nearest_achievable(budget):
    model = micro()
    scores = random_scores(model)
    ref = reference_trainable(model, scores)  # ref[tau]: trainable count at every tau
    best = min(abs(t - budget) for t in ref)
    state = prepare_model(
        model, method := SPTLoRA(budget=budget), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH]
    )
    s = method.describe(state)
    assert abs(s["trainable_backbone"] - budget) == best  # nearest achievable count of all taus
    assert s["trainable_backbone"] == ref[s["tau"]] == trainable_backbone(model)  # what really trains
    assert s["budget"] == budget and s["selected"] == s["tau"] == state["tau"] and s["tau_source"] == "search"
    assert s["budget_met"] == (abs(s["trainable_backbone"] - budget) <= BUDGET_TOLERANCE * budget)
    assert s["budget_met"] or "nearest achievable" in s["budget_note"]
    if s["budget_met"]:
        assert s["budget_note"] is None


def test_an_achievable_budget_is_hit_exactly_and_tau_is_not_the_budget():
    model = micro()
    scores = random_scores(model, seed=3)
    ref = reference_trainable(model, scores)
    budget = ref[1500]  # a count some tau gives exactly
    s = SPTLoRA(budget=budget).select(model, scores)["summary"]
    assert s["trainable_backbone"] == budget and s["budget_met"] and s["budget_note"] is None
    assert s["tau"] != budget  # tau (sensitive entries) is not the trainable count


def test_budget_beyond_everything_says_so():
    model = micro()
    scores = random_scores(model)
    ref = reference_trainable(model, scores)
    with pytest.warns(UserWarning, match="exceeds what spt_lora can train"):
        state = SPTLoRA(budget=10**6).select(model, scores)
    s = state["summary"]
    assert s["tau"] == len(ref) - 1 and s["trainable_backbone"] == ref[-1] and not s["budget_met"]
    assert "exceeds" in s["budget_note"]


def test_tau_is_used_as_is_and_budget_as_percentage():
    model = micro()
    scores = random_scores(model)
    state = SPTLoRA(budget="0.4M", tau=777).select(model, scores)
    assert state["tau"] == state["summary"]["selected"] == 777 and state["summary"]["budget"] is None
    assert state["summary"]["tau_source"] == "given"
    assert parse_budget("1.5%", 1000) == 15 and parse_budget("0.4M") == 400_000 and parse_budget(" 1.5k ") == 1500
    pct = SPTLoRA(budget="10%").select(model, scores)["summary"]
    assert pct["budget"] == round(0.1 * backbone_size(micro())) and pct["budget_percent"] == 10.0
    with pytest.raises(ValueError):
        parse_budget("lots")
    with pytest.raises(ValueError, match="method.budget"):
        SPTLoRA(budget=None, tau=None)


def test_search_tau_and_ranking_helpers():
    flat = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0])
    assert top_mask(flat, 3).tolist() == [False, True, True, True, False]  # exactly k, ties broken by position
    assert ranked_top(flat, 4).tolist() == [1, 2, 3, 4]  # best first, equal scores in position order
    for k in range(6):
        assert set(ranked_top(flat, k).tolist()) == set(top_mask(flat, k).nonzero().flatten().tolist())
    counts = [0, 5, 5, 9, 30, 31, 31, 60]  # a non-decreasing count with jumps
    tau, seen = search_tau(lambda t: counts[t], len(counts) - 1, 18)
    assert counts[tau] == 9 and tau == 3  # |9 - 18| < |30 - 18|: the nearest, below the budget
    assert counts[search_tau(lambda t: counts[t], len(counts) - 1, 21)[0]] == 30  # |30 - 21| < |9 - 21|
    assert len(seen) < len(counts) + 2


# --- allocation at a given tau -------------------------------------------------------------------------------------
def test_allocation_honours_alpha_beta_at_a_given_tau():
    model = micro()
    state = SPTLoRA(tau=91, rank=8).select(model, crafted_scores(model))
    assert state["structured"] == ["blocks.0.attn.qkv.weight:q"]
    assert sorted(state["sparse"]) == ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    k_idx = state["sparse"]["blocks.0.attn.qkv"]
    assert len(k_idx) == 38 and ((k_idx // C >= C) & (k_idx // C < 2 * C)).all()  # k rows of qkv
    assert state["vectors"] == ["blocks.0.norm1.weight"]
    s = state["summary"]
    assert s["unstructured_entries"] == 43 and s["vector_entries"] == 4 and s["cls_token"] == C
    assert s["trainable_backbone"] == 43 + 384 + C + 4 + C
    masks = SPTLoRA(tau=91).sensitive_masks(model, crafted_scores(model))  # {scored key: mask}, as CDRA-SPT used it
    assert sum(int(m.sum()) for m in masks.values()) == 91 and int(masks["blocks.0.attn.qkv.weight:q"].sum()) == 39
    ablated = SPTLoRA(tau=91, structured=False).select(model, crafted_scores(model))
    assert ablated["structured"] == [] and ablated["summary"]["unstructured_entries"] == 82


# --- item 3: the authors' details ----------------------------------------------------------------------------------
def test_vector_below_beta_keeps_its_sensitive_entries():
    model, x = micro(), torch.randn(2, 3, 16, 16)
    scores = crafted_scores(model)
    hot = scores["blocks.1.norm2.bias"].topk(4).indices.sort().values
    state = prepare_model(model, SPTLoRA(tau=91), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH])
    assert state["vector_entries"]["blocks.1.norm2.bias"].tolist() == hot.tolist()  # 4/24 < 1/beta: its entries
    before = {k: v.clone() for k, v in micro().state_dict().items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "head" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    out = model(x)
    unwrap(model)  # SPT-LoRA merges: the norm's 4 deltas fold into its bias
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    changed = (model.state_dict()["blocks.1.norm2.bias"] != before["blocks.1.norm2.bias"]).nonzero().flatten()
    assert changed.tolist() == hot.tolist()  # exactly those entries trained


def test_fused_qkv_bias_is_judged_as_three_vectors():
    model = micro()
    scores = crafted_scores(model, {QKV_BIAS: 0})
    bias = scores[QKV_BIAS]  # (3C,) q | k | v
    bias[[0, 3, 7, 11, 20]] = 1.0  # q: 5/24 >= 1/5 -> q's 24 entries
    bias[[C + 1, C + 2, C + 9, C + 17]] = 1.0  # k: 4/24 < 1/5 -> those 4 entries
    state = prepare_model(model, method := SPTLoRA(tau=9), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH])
    expected = list(range(C)) + [C + 1, C + 2, C + 9, C + 17]
    assert state["vector_entries"][QKV_BIAS].tolist() == expected  # as one 72-vector (9/72 < 1/5): nothing tuned
    s = method.describe(state)
    assert s["vectors_tuned"] == 1 and s["vector_params"] == C and s["vector_entries"] == 4
    assert trainable_backbone(model) == s["trainable_backbone"] == C + 4 + C  # + class token


def test_structured_only_keeps_whole_vectors_and_cls_token_is_counted():
    model = micro()
    only = SPTLoRA(tau=91, unstructured=False).select(model, crafted_scores(model))
    assert only["sparse"] == {} and only["vector_entries"] == {}
    assert only["vectors"] == ["blocks.0.norm1.weight"]  # authors' structured-only mode: vectors stay whole
    assert only["summary"]["trainable_backbone"] == 384 + C + C
    no_cls = micro()
    prepare_model(
        no_cls, SPTLoRA(tau=91, cls_token=False), scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH]
    )
    cls = micro()
    state = prepare_model(cls, SPTLoRA(tau=91), scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH])
    assert cls.cls_token.requires_grad and not no_cls.cls_token.requires_grad
    assert trainable_backbone(cls) - trainable_backbone(no_cls) == C == state["summary"]["cls_token"]


def test_structured_branches_have_dropout_on_their_input_but_proj():
    model = micro()
    scores = crafted_scores(model, {"blocks.0.attn.qkv.weight:q": 60, "blocks.0.attn.proj.weight": 60})
    prepare_model(model, SPTLoRA(tau=120), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH])
    blk = anatomy.blocks(model)[0]
    qkv, proj = blk.linear("q"), blk.linear("proj")
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.lora_dropout, torch.nn.Dropout) and qkv.lora_dropout.p == 0.1
    assert isinstance(proj, LoRALinear) and isinstance(proj.lora_dropout, torch.nn.Identity)  # as the authors' proj
    ad = micro()
    scores = crafted_scores(ad, {"blocks.0.attn.qkv.weight:q": 60})
    prepare_model(ad, SPTAdapter(tau=60, alpha=7), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH])
    layer = anatomy.blocks(ad)[0].linear("q")
    assert isinstance(layer, SliceAdapter) and layer.dropout.p == 0.1
    for name in ("spt_lora", "spt_adapter"):
        cfg = compose_config([f"method={name}"])
        assert cfg.method.dropout == 0.1 and cfg.method.cls_token is True


# --- item 2: SPT-Adapter, one adapter on each structured matrix's own output ------------------------------------
ADAPTER_Q = 2 * C * 8 + 8 + C  # 416: threshold 41.6 at alpha 10
ADAPTER_FC1 = 2 * 4 * C * 8 + 8 + 4 * C  # 1640: threshold 164


def test_adapter_threshold_follows_the_matrix_own_adapter_size():
    model = micro()
    hot = {
        "blocks.0.attn.qkv.weight:q": 42,
        "blocks.0.attn.qkv.weight:k": 41,
        "blocks.1.mlp.fc1.weight": 164,
        "blocks.0.mlp.fc1.weight": 163,
    }
    state = SPTAdapter(tau=sum(hot.values())).select(model, crafted_scores(model, hot))
    assert state["structured"] == ["blocks.0.attn.qkv.weight:q", "blocks.1.mlp.fc1.weight"]  # 41 < 41.6, 163 < 164
    assert state["summary"]["structured_params"] == ADAPTER_Q + ADAPTER_FC1
    assert state["sparse"]["blocks.0.mlp.fc1"].numel() == 163 and state["sparse"]["blocks.0.attn.qkv"].numel() == 41


def reference_forward(model: torch.nn.Module, adapted: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model`` (the plain backbone) with hand-placed adapters taken from ``adapted``: q of block 0 gets its adapter
    on q's C outputs before attention, fc1 of block 1 on its 4C outputs before the GELU, proj of block 1 a branch
    from proj's input added to its output (the authors' block)."""
    blk0, blk1 = anatomy.blocks(adapted)[0], anatomy.blocks(adapted)[1]
    ad_q, ad_fc1 = blk0.linear("q").adapters[0], blk1.linear("fc1").adapters[0]
    ad_proj = blk1.linear("proj").adapter
    ref0, ref1 = anatomy.blocks(model)[0], anatomy.blocks(model)[1]
    qkv, fc1, proj = ref0.linear("q"), ref1.linear("fc1"), ref1.linear("proj")

    def bottleneck(ad, h):
        return F.linear(F.gelu(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)

    def qkv_forward(h):
        out = F.linear(h, qkv.weight, qkv.bias)  # (..., 3C)
        return torch.cat([out[..., :C] + bottleneck(ad_q, out[..., :C]), out[..., C:]], -1)

    ref0.module.attn.qkv = type("Q", (torch.nn.Module,), {"forward": lambda self, h: qkv_forward(h)})()
    ref1.module.mlp.fc1 = type(
        "F", (torch.nn.Module,), {"forward": lambda self, h: (o := fc1(h)) + bottleneck(ad_fc1, o)}
    )()
    ref1.module.attn.proj = type(
        "P", (torch.nn.Module,), {"forward": lambda self, h: proj(h) + bottleneck(ad_proj, h)}
    )()
    return model(x)


def test_spt_adapter_places_one_adapter_on_each_structured_matrix_output():
    model, x = micro(), torch.randn(2, 3, 16, 16)
    ref_model = copy.deepcopy(model)
    ref = model(x)
    hot = {"blocks.0.attn.qkv.weight:q": 42, "blocks.1.mlp.fc1.weight": 164, "blocks.1.attn.proj.weight": 42}
    scores = crafted_scores(model, hot)
    state = prepare_model(
        model, method := SPTAdapter(tau=248), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH]
    )
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # up projections start at zero: step 0 = backbone
    blk0, blk1 = anatomy.blocks(model)
    assert isinstance(blk0.linear("q"), SliceAdapter) and len(blk0.linear("q").adapters) == 1
    assert blk0.linear("q").adapters[0].n_in == C and blk1.linear("fc1").adapters[0].n_in == 4 * C
    assert isinstance(blk1.linear("proj"), ParallelAdapter) and isinstance(blk0.linear("proj"), torch.nn.Linear)
    assert isinstance(blk1.linear("fc2"), torch.nn.Linear) and isinstance(blk0.linear("fc1"), torch.nn.Linear)
    s = method.describe(state)
    assert s["structured_matrices"] == 3 and s["structured_params"] == 2 * ADAPTER_Q + ADAPTER_FC1
    assert trainable_backbone(model) == s["trainable_backbone"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter" in n:
                p.normal_(0, 0.3)
    model.eval()
    torch.testing.assert_close(model(x), reference_forward(ref_model, model, x), rtol=1e-5, atol=1e-6)


def test_spt_adapter_proj_sequential_option_is_on_proj_output():
    model = micro()
    scores = crafted_scores(model, {"blocks.1.attn.proj.weight": 42})
    prepare_model(
        model, SPTAdapter(tau=42, proj_adapter="sequential"), scorer=lambda m, b: scores, batches=lambda: [DUMMY_BATCH]
    )
    layer = anatomy.blocks(model)[1].linear("proj")
    assert isinstance(layer, SliceAdapter) and layer.whole and isinstance(layer.dropout, torch.nn.Identity)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(0, 0.3)
    h = torch.randn(2, 5, C)
    out = layer.base_layer(h)
    ad = layer.adapters[0]
    torch.testing.assert_close(layer(h), out + ad.up(F.gelu(ad.down(out))))


# --- exact apply, merge, end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SPTLoRA, SPTAdapter])
def test_apply_trainable_set_matches_summary_and_step0_is_identity(cls):
    model, x = micro(), torch.randn(2, 3, 16, 16)
    ref = model(x)
    method = cls(tau=91) if cls is SPTLoRA else cls(tau=91, alpha=10.7)  # adapter: 416/10.7 = 38.9 <= 39
    state = prepare_model(model, method, scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH])
    assert trainable_backbone(model) == method.describe(state)["trainable_backbone"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    blk = anatomy.blocks(model)
    if cls is SPTLoRA:
        assert isinstance(blk[0].linear("q"), SparseLoRALinear) and isinstance(blk[1].linear("fc2"), SparseDeltaLinear)
        assert isinstance(blk[0].linear("fc1"), torch.nn.Linear)
    else:  # q of block 0 is structured -> an adapter on q's output; k sparse in the same qkv, under it
        assert isinstance(blk[0].linear("q"), SliceAdapter)
        assert isinstance(blk[0].linear("q").base_layer, SparseDeltaLinear) and blk[0].linear("q").base_layer.nnz == 38
        assert method.describe(state)["structured_params"] == ADAPTER_Q
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trainable and "blocks.1.norm2.bias" not in trainable  # its 4 entries: deltas
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_spt_lora_merges_into_plain_timm_model():
    model, x = micro(), torch.randn(2, 3, 16, 16)
    prepare_model(model, SPTLoRA(tau=91), scorer=lambda m, b: crafted_scores(m), batches=lambda: [DUMMY_BATCH])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "sparse_delta" in n or "deltas" in n:
                p.normal_(0, 0.1)
    out = model(x)
    merge(model)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    unwrap(model)
    assert not any(isinstance(m, (LoRALinear, SparseDeltaLinear)) or hasattr(m, "base_layer") for m in model.modules())
    assert set(model.state_dict()) == set(micro().state_dict())
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
def test_end_to_end_run(tmp_path, method):
    cfg = compose_config(
        TINY
        + [
            f"paths.output_dir={tmp_path}/outputs",
            f"method={method}",
            "method.budget=5K",
            *SCORED_TINY,
        ]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    sel = record["selection"]
    assert record["params"]["trainable_backbone"] == sel["trainable_backbone"] > 0
    assert sel["budget"] == 5000 and sel["tau"] > 0 and "budget_met" in sel


def test_score_cli_writes_loadable_file(tmp_path, monkeypatch):
    from peftbench import score

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.pt"
    rc = score.main(
        TINY
        + [
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
    assert record["state"]["budget"] == 2000 and record["summary"]["selected"] == record["state"]["tau"]


def test_score_module_runs_as_a_script(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli.pt"
    args = [sys.executable, "-m", "peftbench.score", *TINY, "scorer=sensitivity", "scoring.n_samples=8", f"out={out}"]
    subprocess.run(args, check=True, cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=120)
    record = torch.load(out, weights_only=True)
    assert record["state"] is None and "blocks.0.mlp.fc1.weight" in record["scores"]  # method=lora: no selection
