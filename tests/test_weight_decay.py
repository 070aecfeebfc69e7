"""Weight decay by role: weight-matrix entries decay (also as 1-D sparse deltas), biases, norms and tokens do not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from peftbench.bench import run as bench
from peftbench.compose import compose_config
from peftbench.errors import PeftbenchError
from peftbench.layers.base import BaseLayerWrapper
from peftbench.methods.base import prepare_model
from peftbench.training import weight_decay
from peftbench.training.module import PEFTModule

METHODS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))
#: parameter-name parts that are factors or sparse entries of a weight matrix (the reference, by name)
MATRIX_PARTS = {"sparse_delta", "lora_A", "lora_B", "phm_rule", "phm_B", "phm_s", "phm_t"}
#: methods whose trainable weight entries live in 1-D sparse deltas (all in the no-decay group before)
SPARSE = {"child_tuning", "cdra_spt", "gps", "hifi", "spt_adapter", "spt_lora"}


def composed(method: str) -> tuple[nn.Module, PEFTModule]:
    """vit_micro (random weights, 5 classes) with ``method`` from its config applied, inside a PEFTModule."""
    cfg = compose_config([f"method={method}", "backbone.pretrained=false", "logger=none"])
    m = instantiate(cfg.method)
    scorer = instantiate(cfg.scorer) if cfg.get("scorer") else None  # the method's config brings its scorer
    torch.manual_seed(0)
    model = instantiate(cfg.backbone, num_classes=5)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 5)]
    prepare_model(model, m, scorer, lambda: batches)
    module = PEFTModule(model, m, optimizer=torch.optim.AdamW, scheduler=None, num_classes=5)
    return model, module


def reference_decays(model: nn.Module, name: str) -> bool:
    """By name and owner type: factors / sparse entries of weights, and Linear / Conv weights, decay; else not."""
    parts = name.split(".")
    if MATRIX_PARTS & set(parts):
        return True
    if "deltas" in parts:  # Child-Tuning's SparseParams: entries of norms and biases only (its apply)
        return False
    owner = model.get_submodule(".".join(parts[:-1]))
    return parts[-1] == "weight" and isinstance(owner, (nn.Linear, nn.Conv2d))


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_groups_follow_roles_for_every_method(method):
    model, module = composed(method)
    groups = module.parameter_groups()
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    decayed = {id(p) for p in groups[0]["params"]}
    not_decayed = {id(p) for p in groups[1]["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == {id(p) for p in trainable.values()} and not decayed & not_decayed
    for name, p in trainable.items():
        assert (id(p) in decayed) == reference_decays(model, name), name
    if method in SPARSE:  # weight entries stored as 1-D deltas are decayed like their matrix
        assert any(p.ndim == 1 for p in groups[0]["params"]), method
    for name, p in trainable.items():  # tokens and prompts (>= 2-D) are never decayed
        if name.split(".")[-1] in ("cls_token", "pos_embed", "vpt_prompts"):
            assert id(p) in not_decayed, name


def test_bench_uses_the_same_groups():
    """bench.py builds its optimizer from the one function (its own rank-based copy is gone)."""
    assert bench.parameter_groups is weight_decay.parameter_groups
    assert not hasattr(bench, "_parameter_groups")


def test_full_fine_tuning_tokens_and_norms_not_decayed_weights_decayed():
    model, module = composed("full")
    roles = weight_decay.parameter_roles(model)
    assert roles["cls_token"] == roles["pos_embed"] == "token"
    assert roles["blocks.0.norm1.weight"] == roles["blocks.0.attn.qkv.bias"] == "vector"
    assert roles["blocks.0.attn.qkv.weight"] == roles["patch_embed.proj.weight"] == roles["head.weight"] == "matrix"


def test_decay_shrinks_sparse_matrix_entries_but_not_bias_entries():
    """Under AdamW with zero gradients, decayed deltas shrink and vector deltas keep their value."""
    model, module = composed("child_tuning")
    opt = torch.optim.AdamW(module.parameter_groups(), lr=0.1, weight_decay=0.5)
    deltas = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    with torch.no_grad():
        for p in deltas.values():
            p.fill_(1.0)
    for p in deltas.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    roles = weight_decay.parameter_roles(model)
    assert {roles[n] for n in deltas} == {"matrix", "vector"}
    for name, p in deltas.items():
        expected = 1.0 - 0.1 * 0.5 if roles[name] == "matrix" else 1.0
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected), msg=name)


def test_a_layer_must_declare_what_it_adds():
    class Scaled(BaseLayerWrapper):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base_layer = base
            self.gain = nn.Parameter(torch.ones(base.out_features))

    model = nn.Sequential(Scaled(nn.Linear(3, 4)))
    with pytest.raises(PeftbenchError, match="0.gain"):
        weight_decay.parameter_groups(model)
    Scaled.param_roles = {"gain": "vector"}
    groups = weight_decay.parameter_groups(model)
    assert [p.shape for p in groups[0]["params"]] == [(4, 3)] and len(groups[1]["params"]) == 2
