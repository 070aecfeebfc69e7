"""Heart-LoRA: exact zero delta of deactivated heads, merge, head counts, Taylor score, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.compose import compose_config
from peftbench.layers.head_lora import HeadLoRALinear
from peftbench.layers.lora import LoRALinear
from peftbench.methods.base import merge, prepare_model, unmerge
from peftbench.methods.heart_lora import HeartLoRA, choose, deactivate_heads, head_layers, head_scores
from peftbench.train import execute
from tests.helpers import TINY

C, H, DEPTH = 24, 4, 3


def micro(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=C, depth=DEPTH, num_heads=H, num_classes=3).eval()


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def adapted(seed: int = 0, **kwargs) -> tuple[VisionTransformer, HeartLoRA, dict]:
    model, method = micro(seed), HeartLoRA(dropout=0.0, **kwargs)
    state = prepare_model(model, method)
    for layer in head_layers(model).values():  # non-zero B, as after a warm-up
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model, method, state


def test_deactivated_heads_exact_zero_delta_and_gradient():
    qkv = torch.nn.Linear(C, 3 * C)
    rows = [anatomy.qkv_rows(C, H, ("q",)), anatomy.qkv_rows(C, H, ("v",))]
    torch.manual_seed(0)
    head = HeadLoRALinear(qkv, 2, rows, H, scale=3.0)
    torch.nn.init.normal_(head.lora_B)
    ref = LoRALinear(qkv, 2, rows, scale=3.0)
    ref.lora_A.data.copy_(head.lora_A)
    ref.lora_B.data.copy_(head.lora_B)
    full_b = head.lora_B
    old, kept = head.set_heads([1, 3])
    hd = C // H
    assert old is full_b and head.lora_B.shape == (2, 2 * hd, 2)  # only heads 0 and 2 keep B rows
    assert torch.equal(head.lora_B, full_b[:, kept]) and kept.tolist() == [*range(hd), *range(2 * hd, 3 * hd)]
    for g in range(2):
        for h in (1, 3):
            ref.lora_B.data[g, h * hd : (h + 1) * hd] = 0.0
    x = torch.randn(5, 7, C)
    y = head(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(head.delta_weight(), ref.delta_weight(), rtol=0, atol=1e-6)
    base = qkv(x)
    dw = head.delta_weight()
    for part in (0, 2):  # q and v blocks of the qkv output
        for h in (1, 3):
            sl = slice(part * C + h * hd, part * C + (h + 1) * hd)
            assert torch.equal(y[..., sl], base[..., sl])  # exactly zero delta
            assert torch.count_nonzero(dw[sl]) == 0
        assert torch.count_nonzero(dw[part * C : part * C + hd]) > 0  # head 0 active
    y.square().sum().backward()
    y_ref = ref(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(head.lora_A.grad, ref.lora_A.grad, rtol=1e-5, atol=1e-5)  # A: as with zeroed rows
    assert head.deactivated() == [1, 3] and head.set_heads([1, 3]) is None  # already gone: nothing replaced
    head.set_heads([0, 2])
    assert head.lora_B.shape[1] == 0 and not head.lora_A.requires_grad  # no head left: A no longer trains


def test_merged_equals_masked_unmerged():
    model, method, state = adapted()
    state["deactivated"] = choose({k: torch.rand(H) for k in head_layers(model)}, state["ne"], "layer")
    deactivate_heads(model, state["deactivated"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        merge(model)
        merged = model(x)
        unmerge(model)
        after = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["global", "layer", "pooled"])
@pytest.mark.parametrize("score", ["taylor", "weight_norm", "grad_norm", "front", "random"])
def test_exactly_ne_heads(granularity, score):
    ne = 2
    model, method, state = adapted(ne=ne, score=score, granularity=granularity)
    method.deactivate(model, state, lambda: batches(1))
    dead = state["deactivated"]
    assert sum(len(v) for v in dead.values()) == ne * DEPTH
    assert {n: layer.deactivated() for n, layer in head_layers(model).items()} == dead
    if granularity != "pooled":
        assert all(len(v) == ne for v in dead.values())
    if granularity == "global":
        assert len({tuple(v) for v in dead.values()}) == 1  # same head indices in every layer
    if score == "front" and granularity != "pooled":
        assert all(v == [0, 1] for v in dead.values())
    summary = method.describe(state)
    json.dumps(summary)
    assert summary["num_deactivated"] == ne * DEPTH


def test_global_accumulates_layer_scores():
    s = {"a": torch.tensor([0.0, 5.0, 1.0, 9.0]), "b": torch.tensor([9.0, 0.0, 1.0, 9.0])}
    ne = {"a": 1, "b": 1}
    assert choose(s, ne, "layer") == {"a": [0], "b": [1]}
    assert choose(s, ne, "global") == {"a": [2], "b": [2]}  # accumulated: [9, 5, 2, 18]
    assert choose(s, ne, "pooled") == {"a": [0], "b": [1]}
    s2 = {"a": torch.tensor([0.0, 5.0, 1.0, 9.0]), "b": torch.tensor([0.5, 0.7, 1.0, 9.0])}
    assert choose(s2, ne, "pooled") == {"a": [0], "b": [0]}


def test_taylor_matches_manual():
    model, method, state = adapted()
    data = batches(2)
    got = head_scores(model, "taylor", data)
    # manual: mean gradient over batches via .grad, then |sum over q and v rows of head h of B * grad|
    for p in model.parameters():
        p.grad = None
    for images, labels in data:
        (torch.nn.functional.cross_entropy(model(images), labels) / len(data)).backward()
    hd = C // H
    for name, layer in head_layers(model).items():
        b, g = layer.lora_B.detach().double(), layer.lora_B.grad.double()  # (2, C, r)
        manual = torch.tensor(
            [(b[:, h * hd : (h + 1) * hd] * g[:, h * hd : (h + 1) * hd]).sum().abs() for h in range(H)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(got[name], manual, rtol=1e-6, atol=1e-12)
        assert (manual > 0).all()


def test_needs_ratio_for_mixed_heads_and_bounds():
    with pytest.raises(ValueError):
        prepare_model(micro(), HeartLoRA(ne=H))
    with pytest.raises(ValueError):
        HeartLoRA(targets=["q", "fc1"])


def test_end_to_end_and_resume(tmp_path):
    """TINY run: heads deactivated after 1 warm-up epoch in the same fit; a crash after that resumes identically."""
    common = TINY + [
        "method=heart_lora",
        "method.ne=3",
        "method.warmup_epochs=1",
        "trainer.max_epochs=3",
        "backbone.drop_path_rate=0",
        "scoring.n_samples=32",
        "scoring.batch_size=16",
    ]

    def go(name: str, *extra: str) -> dict:
        cfg = compose_config(common + [f"paths.output_dir={tmp_path}/outputs", f"run_dir={tmp_path / name}",
                                       "keep_checkpoint=true", *extra])
        return execute(cfg, tmp_path / name)

    record = go("straight")
    assert record["status"] == "ok", record.get("error")
    sel = record["selection"]
    assert sel["selected"] and sel["selected_at_epoch"] == 1
    assert len(sel["deactivated"]) > 0 and all(len(v) == 3 for v in sel["deactivated"].values())
    assert all(len(v) == 12 and max(v) > 0 for v in sel["scores"].values())  # taylor after warm-up: non-zero
    saved = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert saved["selection"]["deactivated"] == sel["deactivated"]
    state = torch.load(tmp_path / "straight" / "method_state.pt", weights_only=True)
    assert state["selected"] and state["deactivated"] == sel["deactivated"]

    crash = ["+callbacks.crash._target_=tests.helpers.CrashAfterEpoch", "+callbacks.crash.epoch=1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        go("resumed", *crash)
    assert torch.load(tmp_path / "resumed" / "method_state.pt", weights_only=True)["selected"]
    resumed = go("resumed", *crash, "resume=true")  # the same overrides; epoch 1 is past
    assert resumed["selection"] == sel
    assert resumed["metrics"] == record["metrics"]
    a, b = (
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for n in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_bit_identical_and_dead_heads_stay_zero_while_training():
    from peftbench.training.callbacks import carry_optimizer_state

    model, method, state = adapted(ne=1, granularity="layer")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    opt = torch.optim.AdamW(trainable(), lr=1e-2, weight_decay=1e-4)
    data = batches(2)
    model.train()
    for step in range(4):
        if step == 2:  # deactivate mid-training: B shrinks, the optimizer is rebuilt with the survivors' state
            mapping = method.deactivate(model, state, lambda: data)
            new = torch.optim.AdamW(trainable(), lr=1e-2, weight_decay=1e-4)
            carry_optimizer_state(opt, new, mapping)
            for b, (old, _, kept) in mapping.items():
                assert torch.equal(new.state[b]["exp_avg"], opt.state[old]["exp_avg"][:, kept])
            opt = new
        images, labels = data[step % 2]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    hd = C // H
    for name, layer in head_layers(model).items():
        assert layer.lora_B.shape[1] == (H - 1) * hd
        dw = layer.delta_weight()  # (3C, C)
        for h in state["deactivated"][name]:
            for part in (0, 2):
                assert torch.count_nonzero(dw[part * C + h * hd : part * C + (h + 1) * hd]) == 0


def test_resume_reapplies_mask():
    model, method, state = adapted(ne=2, score="weight_norm")
    method.deactivate(model, state, None)
    saved = {k: v for k, v in state.items()}
    fresh = micro(1)
    prepare_model(fresh, HeartLoRA(ne=2, score="weight_norm"), state=saved)
    assert {n: m.deactivated() for n, m in head_layers(fresh).items()} == state["deactivated"]


def test_swin_ratio_groups_by_head_count():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=3
    )
    with pytest.raises(ValueError, match="ratio"):
        prepare_model(model, HeartLoRA(ne=1))
    method = HeartLoRA(ratio=0.5, dropout=0.0)
    state = prepare_model(model, method)
    assert sorted(state["ne"].values()) == [1, 1, 2, 2]
    for layer in head_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    method.deactivate(model, state, lambda: [(x, y)])
    dead = state["deactivated"]
    stage0 = [v for k, v in dead.items() if k.startswith("layers.0.")]
    stage1 = [v for k, v in dead.items() if k.startswith("layers.1.")]
    assert len(stage0) == len(stage1) == 2
    assert all(len(v) == 1 for v in stage0) and all(len(v) == 2 for v in stage1)
    assert stage0[0] == stage0[1] and stage1[0] == stage1[1]  # accumulated within a stage


# --- issue 13 item 7: Heart-LoRA counts (and stores) what it trains; protocol=paper reports after deactivation ---
def test_vit_b16_ne3_trains_and_stores_only_the_active_heads():
    """ViT-B/16 (random weights), r = 8 on q and v: LoRA trains 294,912 parameters; after deactivating ne = 3 of
    12 heads the q and v B rows of those heads are gone: 147,456 (A) + 9/12 x 147,456 (B) = 258,048."""
    from peftbench.accounting import backbone_size, parameter_report
    from peftbench.backbones.build import build_backbone
    from peftbench.records.task_file import task_tensors

    torch.manual_seed(0)
    model = build_backbone("vit_b16", num_classes=10, timm_name="vit_base_patch16_224", pretrained=False)
    pretrained = backbone_size(model)
    method = HeartLoRA(ne=3, score="front")  # front: heads 0, 1, 2 (no data needed)
    state = prepare_model(model, method)
    assert parameter_report(model, pretrained)["trainable_backbone"] == 294_912
    mapping = method.deactivate(model, state, None)
    assert len(mapping) == 12  # one B per block replaced
    report = parameter_report(model, pretrained)
    assert report["trainable_backbone"] == 258_048 == 147_456 + 110_592
    head = sum(p.numel() for p in anatomy.head(model).parameters())
    assert sum(t.numel() for t in task_tensors(model).values()) == 258_048 + head  # what task.pt stores


class FakeEvaluations:
    """Replaces EvalHistory's record of each evaluation by a known accuracy per epoch."""

    def __init__(self, accuracies: dict[int, float]) -> None:
        self.accuracies = accuracies

    def __call__(self, history, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            history.history.append((trainer.current_epoch, self.accuracies[trainer.current_epoch]))


def test_run_counts_stores_and_reports_only_after_deactivation(tmp_path, monkeypatch):
    """TINY run (ViT micro: 6 blocks of width 192, 12 heads of 16, r = 8), ne = 3 after one warm-up epoch,
    protocol=paper: results.json counts the active parameters, task.pt and the checkpoint hold no deactivated rows
    (so they cannot drift under AdamW), and the reported maximum ignores the warm-up epoch (known accuracies 0.9,
    0.5, 0.6: 0.6, not 0.9)."""
    from peftbench.training.callbacks import EvalHistory

    fake = FakeEvaluations({0: 0.9, 1: 0.5, 2: 0.6})
    monkeypatch.setattr(EvalHistory, "on_validation_epoch_end", lambda self, t, m: fake(self, t, m))
    overrides = TINY + [
        "method=heart_lora",
        "method.ne=3",
        "method.warmup_epochs=1",
        "trainer.max_epochs=3",
        "scoring.n_samples=32",
        "scoring.batch_size=16",
        "protocol=paper",
        f"paths.output_dir={tmp_path}/o",
        "keep_checkpoint=true",
    ]
    record = execute(compose_config(overrides), tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"]["test_acc"] == 0.6 and record["metrics"]["best_epoch"] == 2
    assert record["reporting_window"] == {"first_epoch": 1, "evaluations": 2, "of": 3}
    blocks, dim, heads, rank = 6, 192, 12, 8
    active = 2 * blocks * (heads - 3) * (dim // heads) * rank  # B rows of the 9 active heads, q and v
    assert record["params"]["trainable_backbone"] == 2 * blocks * rank * dim + active  # A + active B
    task = torch.load(tmp_path / "run" / "task.pt", weights_only=True)
    b_task = {k: v for k, v in task["params"].items() if k.endswith("lora_B")}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b_ckpt = {k: v for k, v in ckpt.items() if k.endswith("lora_B")}
    assert len(b_task) == len(b_ckpt) == blocks
    assert all(v.shape == (2, (heads - 3) * (dim // heads), rank) for v in [*b_task.values(), *b_ckpt.values()])
    assert sum(v.numel() for v in b_task.values()) == active
