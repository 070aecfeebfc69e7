"""TINA: scores, global/local selection, cycle planning, structural pruning with optimizer-state carry-over,
removal of emptied adapters, and a short end-to-end run whose results.json shows every cycle."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch

from peftbench.backbones.build import build_backbone
from peftbench.compose import compose_config
from peftbench.layers.adapter import SequentialAdapter
from peftbench.methods.base import prepare_model
from peftbench.methods.tina import (
    Tina,
    activation_scores,
    adapters,
    neuron_scores,
    paper_cycles,
    prune,
    select_global,
    select_local,
)
from peftbench.train import build, execute
from peftbench.training.callbacks import carry_optimizer_state
from tests.helpers import TINY, full_state_overrides

ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}


class OptimizerProbe(L.Callback):
    """Records, at the end of fit, whether every trainable parameter is in the live optimizer, its AdamW step
    counts, the steps taken and the current learning rate (to check the rebuilt optimizer and scheduler)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        trainable = [p for p in pl_module.model.parameters() if p.requires_grad]
        seen = {
            "all_in_optimizer": all(id(p) in in_opt for p in trainable) and len(in_opt) == len(trainable),
            "steps": sorted({int(opt.state[p]["step"]) for p in trainable}),
            "global_step": trainer.global_step,
            "lr": opt.param_groups[0]["lr"],
            "scheduler_last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        }
        with open(self.out, "w") as f:
            json.dump(seen, f)


def tiny_model(method: Tina, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A 2-block width-48 ViT with TINA adapters whose weights are all random (non-zero ``up``)."""
    torch.manual_seed(0)
    model = build_backbone("t", num_classes=3, arch=ARCH, pretrained=False, image_size=32).to(dtype)
    prepare_model(model, method)
    with torch.no_grad():
        for a in adapters(model).values():
            for p in a.adapter.parameters():
                p.normal_()
    return model.eval()


def zeroed_reference(model: torch.nn.Module, kept: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The un-pruned model with the removed neurons' weights zeroed (and emptied adapters' up bias)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, a in adapters(ref).items():
            gone = torch.ones(a.adapter.n, dtype=torch.bool)
            gone[kept[name]] = False
            a.adapter.down.weight[gone] = 0
            a.adapter.down.bias[gone] = 0
            a.adapter.up.weight[:, gone] = 0
            if len(kept[name]) == 0:
                a.adapter.up.bias.zero_()
    return ref


def test_scores_follow_eq2_and_the_authors_scaling():
    model = tiny_model(Tina(sigma0=8))
    b = next(iter(adapters(model).values())).adapter  # m = 48, n = 6
    down, up = b.down.weight, b.up.weight  # (6, 48), (48, 6)
    j = 2
    i0 = down[j].abs().sum() + up[:, j].abs().sum()
    assert torch.allclose(neuron_scores(b, "i0")[j], i0)
    assert torch.allclose(neuron_scores(b, "tina")[j], i0 / (48 + 48))  # authors' code: over the 2m summed weights
    assert torch.allclose(neuron_scores(b, "tina_eq2")[j], i0 / (48 + 6))  # Eq. 2 as printed: over n + m
    assert torch.allclose(neuron_scores(b, "l1_down")[j], down[j].abs().sum())


def test_activation_score_is_mean_abs_hidden_activation():
    method = Tina(sigma0=8, score="activation")
    model = tiny_model(method).train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    name, a = next(iter(adapters(model).items()))  # blocks.0.attn.proj: input of the adapter = proj's output
    captured = {}
    handle = a.base_layer.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    scores = activation_scores(model, [(x, None)])
    handle.remove()
    expected = a.adapter.act(a.adapter.down(captured["h"])).abs().mean(dim=(0, 1))  # (n,)
    assert torch.allclose(scores[name].double(), expected) and model.training  # mode restored
    kept = method.choose(model, 12, lambda: [(x, None)])
    assert sum(len(v) for v in kept.values()) == 12
    with pytest.raises(ValueError, match="needs data"):
        method.choose(model, 12)


def test_global_threshold_keeps_exact_count_even_with_ties():
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 2.0]), "b": torch.tensor([1.0, 0.5]), "c": torch.tensor([5.0])}
    for keep in range(8):
        kept = select_global(scores, keep, normalize=False)
        assert sum(len(v) for v in kept.values()) == keep
    kept = select_global(scores, 3, normalize=False)
    assert kept["a"].tolist() == [0, 3] and kept["c"].tolist() == [0] and kept["b"].numel() == 0
    # normalized by each adapter's max: every adapter's best neuron scores 1.0
    kept = select_global(scores, 3, normalize=True)
    assert [len(kept[k]) for k in "abc"] == [1, 1, 1]
    local = select_local(scores, {"a": 2, "b": 1, "c": 1})
    assert local["a"].tolist() == [0, 3] and local["b"].tolist() == [0]


@pytest.mark.parametrize(("sigma0", "target", "rho"), [(32, 512, 0.5), (32, 64, 0.5), (8, 64, 0.5), (16, 96, 0.5)])
def test_number_of_prunes_matches_formula(sigma0, target, rho):
    """Alg. 1 prunes ceil(log(target/sigma0)/log(1/(1-rho))) times = the paper's formula C + 1."""
    width = {f"s{i}": 768 for i in range(24)}
    state = {"width": width, "initial": {k: round(768 / sigma0) for k in width}}
    method = Tina(sigma0=sigma0, sigma_target=target, rho=rho)
    prunes = math.ceil(math.log(target / sigma0) / math.log(1 / (1 - rho)) - 1e-9)
    assert len(method.plan(state)) == prunes == paper_cycles(sigma0, target, rho) + 1
    assert paper_cycles(32, 512, 0.5) == 3
    one_shot = Tina(sigma0=sigma0, sigma_target=target, rho=rho, schedule="one_shot").plan(state)
    assert one_shot == [method.plan(state)[-1]]


@pytest.mark.parametrize("selection", ["global", "local"])
def test_prune_equals_zeroed_neurons_and_shrinks_layers(selection):
    method = Tina(sigma0=8, selection=selection)  # n = 6 per adapter, 4 adapters
    model = tiny_model(method)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = method.next_counts({k: a.adapter.n for k, a in adapters(model).items()})
    kept = method.choose(model, target)
    ref = zeroed_reference(model, kept)
    prune(model, kept)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-10, rtol=0)
    sizes = {k: a.adapter.down.weight.shape[0] for k, a in adapters(model).items()}
    assert sum(sizes.values()) == 12 and all(
        a.adapter.up.weight.shape[1] == sizes[k] for k, a in adapters(model).items()
    )
    if selection == "local":
        assert set(sizes.values()) == {3}


def test_emptied_adapter_is_removed():
    method = Tina(sigma0=8, normalize=False)
    model = tiny_model(method)
    names = list(adapters(model))
    with torch.no_grad():
        for p in adapters(model)[names[1]].adapter.parameters():
            p.mul_(1e-3)  # far below every other adapter's neurons
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kept = method.choose(model, 12)
    assert kept[names[1]].numel() == 0
    ref = zeroed_reference(model, kept)
    prune(model, kept)
    assert names[1] not in adapters(model) and len(adapters(model)) == 3
    owner, attr = names[1].rsplit(".", 2)[-2:]
    assert not isinstance(getattr(getattr(model.blocks[0], owner), attr), SequentialAdapter)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-10, rtol=0)


def test_survivors_keep_weights_and_adamw_state():
    method = Tina(sigma0=8)
    model = tiny_model(method, torch.float32).train()
    params = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    opt = torch.optim.AdamW(params(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
    before = {
        k: (
            a.adapter.down.weight.detach().clone(),
            opt.state[a.adapter.down.weight],
            a.adapter.up.weight.detach().clone(),
            opt.state[a.adapter.up.weight],
            a.adapter.up.bias,
            opt.state[a.adapter.up.bias],
        )
        for k, a in adapters(model).items()
    }
    kept = method.choose(model, 12)
    mapping = prune(model, kept)
    new = torch.optim.AdamW(params(), lr=1e-3)
    carry_optimizer_state(opt, new, mapping)
    for k, a in adapters(model).items():
        dw, ds, uw, us, ub, ubs = before[k]
        idx = kept[k]
        assert torch.equal(a.adapter.down.weight, dw[idx]) and torch.equal(a.adapter.up.weight, uw[:, idx])
        st = new.state[a.adapter.down.weight]
        assert torch.equal(st["exp_avg"], ds["exp_avg"][idx]) and torch.equal(st["exp_avg_sq"], ds["exp_avg_sq"][idx])
        assert float(st["step"]) == 2.0
        assert torch.equal(new.state[a.adapter.up.weight]["exp_avg_sq"], us["exp_avg_sq"][:, idx])
        assert a.adapter.up.bias is ub and torch.equal(new.state[ub]["exp_avg"], ubs["exp_avg"])
    new.step()  # shapes agree: the optimizer runs


def test_activation_score_runs_end_to_end(tmp_path):
    overrides = TINY + [
        "method=tina",
        "method.score=activation",
        "method.sigma0=8",
        "method.sigma_target=16",
        "method.rho=0.5",
        "method.epochs_per_cycle=1",
        "trainer.max_epochs=2",
        "scoring.n_samples=32",
        f"paths.output_dir={tmp_path}/o",
    ]
    record = execute(compose_config(overrides), tmp_path / "run")
    assert record["status"] == "ok" and record["selection"]["prunes_done"] == 1
    assert [sum(c["neurons"].values()) for c in record["selection"]["cycles"]] == [288, 144]


def test_local_one_shot_prunes_once_to_the_final_counts(tmp_path):
    overrides = TINY + [
        "method=tina",
        "method.selection=local",
        "method.schedule=one_shot",
        "method.sigma0=8",
        "method.sigma_target=32",
        "method.epochs_per_cycle=1",
        "trainer.max_epochs=2",
        f"paths.output_dir={tmp_path}/o",
    ]
    record = execute(compose_config(overrides), tmp_path / "run")
    assert record["status"] == "ok" and record["selection"]["prunes_done"] == 1
    first, last = record["selection"]["cycles"]
    assert set(first["neurons"].values()) == {24} and set(last["neurons"].values()) == {6}  # 24 -> 6 at once


def test_end_to_end_cycles_shrink_and_frozen_weights_identical(tmp_path):
    overrides = TINY + [
        "method=tina",
        "method.sigma0=8",
        "method.sigma_target=64",
        "method.epochs_per_cycle=1",
        "trainer.max_epochs=4",
        f"paths.output_dir={tmp_path}/outputs",
    ]
    probe = ["+callbacks.probe._target_=tests.test_tina.OptimizerProbe", f"+callbacks.probe.out={tmp_path}/probe.json"]
    record = execute(compose_config(overrides + probe + full_state_overrides(tmp_path / "full.pt")), tmp_path / "run")
    assert record["status"] == "ok"
    seen = json.loads((tmp_path / "probe.json").read_text())  # survivors kept AdamW step counts over 3 rebuilds
    assert seen["all_in_optimizer"] and seen["steps"] == [seen["global_step"]] == [16]
    assert seen["scheduler_last_epoch"] == 16  # the schedule continued, not restarted
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    sel = saved["selection"]
    assert sel["prunes_planned"] == sel["prunes_done"] == 3 and sel["cycles_formula"] == 2
    cycles = sel["cycles"]
    assert [c["cycle"] for c in cycles] == [0, 1, 2, 3] and [c["end_epoch"] for c in cycles] == [0, 1, 2, 3]
    neurons = [sum(c["neurons"].values()) for c in cycles]
    assert neurons == [288, 144, 72, 36]  # 12 adapters x 24, halved each cycle
    counts = [c["trainable_backbone"] for c in cycles]
    assert all(a > b for a, b in zip(counts, counts[1:])) and counts[-1] == saved["params"]["trainable_backbone"]
    assert all(c["val_acc"] is not None for c in cycles)
    _, _, module, _ = build(compose_config(overrides))
    module.configure_model()  # same seed -> same pre-trained weights as the run
    trained = torch.load(tmp_path / "full.pt", weights_only=True)
    fresh = {n.replace("base_layer.", ""): p for n, p in module.named_parameters() if not p.requires_grad}
    checked = 0
    for name, tensor in trained.items():
        key = name.replace("base_layer.", "")
        if ".adapter." not in key and key in fresh:
            assert torch.equal(tensor, fresh[key].detach()), f"frozen {name} changed"
            checked += 1
    assert checked == len(fresh)


def test_resume_mid_cycles_matches_uninterrupted(tmp_path):
    """A crash after the first prune resumes from method_state.pt at the pruned widths and ends identically."""
    common = TINY + [
        "method=tina",
        "method.sigma0=8",
        "method.sigma_target=32",
        "method.epochs_per_cycle=1",
        "trainer.max_epochs=3",
        "backbone.drop_path_rate=0",
    ]

    def go(name: str, *extra: str) -> dict:
        cfg = compose_config(common + [f"paths.output_dir={tmp_path}/outputs", f"run_dir={tmp_path / name}",
                                       "keep_checkpoint=true", *extra])
        return execute(cfg, tmp_path / name)

    straight = go("straight")
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAfterEpoch", "+callbacks.crash.epoch=1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        go("resumed", *crash)
    assert torch.load(tmp_path / "resumed" / "method_state.pt", weights_only=True)["prunes"] == 1
    resumed = go("resumed", *crash, "resume=true")  # the same overrides; epoch 1 is past
    assert resumed["selection"] == straight["selection"]
    assert resumed["metrics"] == straight["metrics"]
    a, b = (
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for n in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class LRProbe(L.Callback):
    """Records the learning rate at the first step of every epoch."""

    def __init__(self, out: str) -> None:
        self.out, self.lrs = out, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.out, "w") as f:
            json.dump(self.lrs, f)


@pytest.mark.parametrize("restart", [True, False])
def test_lr_restarts_every_cycle_and_cycles_record_test_accuracy(tmp_path, restart):
    overrides = TINY + [
        "method=tina",
        "method.sigma0=8",
        "method.sigma_target=32",
        "method.epochs_per_cycle=2",
        f"method.lr_restart={str(restart).lower()}",
        "trainer.max_epochs=6",
        "data.batch_size=32",
        "optimizer.lr=1e-3",
        f"paths.output_dir={tmp_path}/o",
        "+callbacks.lr._target_=tests.test_tina.LRProbe",
        f"+callbacks.lr.out={tmp_path}/lr.json",
    ]
    record = execute(compose_config(overrides), tmp_path / "run")
    lrs = {int(k): v for k, v in json.loads((tmp_path / "lr.json").read_text()).items()}
    if restart:  # 3 cycles of 2 epochs: each starts with the same warm-up lr
        assert lrs[0] == pytest.approx(lrs[2]) == pytest.approx(lrs[4])
        assert lrs[1] != pytest.approx(lrs[0])
    else:  # one schedule: after the warm-up epoch the lr only decays
        assert lrs[2] > lrs[4] > 0 and lrs[2] != pytest.approx(lrs[0])
    cycles = record["selection"]["cycles"]
    assert [c["cycle"] for c in cycles] == [0, 1, 2]
    assert all(c["test_acc"] is not None and 0 <= c["test_acc"] <= 1 for c in cycles)
    assert cycles[-1]["test_acc"] == pytest.approx(record["metrics"]["test_acc"], abs=1e-6)  # same model, same data


def test_schedule_with_restarts_repeats_the_scaled_schedule():
    from peftbench.training.schedulers import cosine_with_warmup

    def factors(**kw) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cosine_with_warmup(opt, steps_per_epoch=10, warmup_epochs=2, **kw)
        return [sched.lr_lambdas[0](t) for t in range(kw["total_steps"])]

    whole = factors(total_steps=100)
    cycled = factors(total_steps=100, restarts=[50])
    assert cycled[:50] == cycled[50:]  # both segments identical
    assert cycled[0] == pytest.approx(1 / 10)  # warm-up keeps its 20% share: 10 of the 50 steps
    assert whole[0] == pytest.approx(1 / 20) and whole == factors(total_steps=100, restarts=[])


# --- issue 13 item 6: score variants, per-cycle schedule, 100-epoch cycles in the tables, last-cycle reporting ---
def set_neurons(bottleneck, down_rows: list[float]) -> None:
    """Give neuron j of ``bottleneck`` a down row of constant value ``down_rows[j]`` and a zero up column, so its
    I0 score is m * down_rows[j] (m = the adapter's width)."""
    with torch.no_grad():
        bottleneck.down.weight.copy_(torch.tensor(down_rows)[:, None].expand_as(bottleneck.down.weight))
        bottleneck.up.weight.zero_()


def test_default_score_ranks_unlike_i0_across_adapter_widths():
    """Table 3's I (scaled) and I0 select different neurons where adapters differ in width (Swin: one width per
    stage). With the defaults (score=tina, no per-adapter max normalisation: the authors' released scripts) the
    scaling is 1/(2m): a 16-wide adapter's neuron of I0 = 8 (I = 0.25) beats a 32-wide one's of I0 = 9.6 (I = 0.15)."""
    from timm.models.swin_transformer import SwinTransformer

    def choose(**kwargs) -> dict[str, list[int]]:
        torch.manual_seed(0)
        model = SwinTransformer(
            img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=3
        )
        method = Tina(n0=2, **kwargs)
        prepare_model(model, method)
        live = adapters(model)
        assert sorted({a.adapter.n_in for a in live.values()}) == [16, 32]
        for a in live.values():  # I0: 16-wide adapters [16, 8]; 32-wide adapters [9.6, 0.32]
            set_neurons(a.adapter, [1.0, 0.5] if a.adapter.n_in == 16 else [0.3, 0.01])
        kept = method.choose(model, 2 * len(live) // 2)  # keep half: 4 of 8 neurons
        return {k: v.tolist() for k, v in kept.items()}

    default, i0 = choose(), choose(score="i0")
    narrow = [k for k in default if k.startswith("layers.0.")]
    wide = [k for k in default if k.startswith("layers.1.")]
    assert all(default[k] == [0, 1] for k in narrow) and all(default[k] == [] for k in wide)  # I: 0.25 > 0.15
    assert all(i0[k] == [0] for k in narrow + wide)  # I0: 9.6 > 8
    assert choose(score="tina", normalize=True) == choose(score="i0", normalize=True)  # max-normalised: the same


def test_eq2_as_printed_ranks_unlike_i0_across_hidden_widths():
    """Eq. 2's 1/(n + m) also separates adapters of one width once their hidden widths differ (after a prune)."""
    from peftbench.layers.adapter import Bottleneck

    narrow, wide = Bottleneck(48, 2), Bottleneck(48, 6)  # n + m = 50 and 54
    set_neurons(narrow, [10 / 48, 0.0])  # I0 = 10   -> Eq. 2: 0.2
    set_neurons(wide, [10.5 / 48] + [0.0] * 5)  # I0 = 10.5 -> Eq. 2: 0.194
    for score, winner in (("i0", "wide"), ("tina_eq2", "narrow"), ("tina", "wide")):
        scores = {"narrow": neuron_scores(narrow, score), "wide": neuron_scores(wide, score)}
        kept = select_global(scores, 1, normalize=False)
        assert kept[winner].tolist() == [0], score


def test_every_cycle_warms_up_for_its_first_fifth_at_paper_scale():
    """The README's command (500 epochs, 100-epoch cycles, VTAB recipe warm-up 10 epochs): every cycle is 20
    warm-up + 80 cosine epochs as in the paper, not the fit's share 10 / 500 (2 + 98)."""
    from peftbench.training.schedulers import cosine_with_warmup

    width = {f"s{i}": 768 for i in range(24)}
    state = {"width": width, "initial": dict.fromkeys(width, 24), "neurons": dict.fromkeys(width, 24), "cycles": []}
    method = Tina(sigma0=32, sigma_target=512, epochs_per_cycle=100)
    restarts = method.schedule_restarts(state, 500)
    assert restarts == [100, 200, 300, 400] and len(method.plan(state)) == 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(
        opt, total_steps=500, steps_per_epoch=1, warmup_epochs=10, restarts=restarts,
        restart_warmup=method.restart_warmup,
    )
    f = [sched.lr_lambdas[0](t) for t in range(500)]
    for start in (0, 100, 200, 300, 400):
        cycle = f[start : start + 100]
        assert cycle.index(max(cycle)) == 19 and cycle[0] == pytest.approx(1 / 20)  # 20 warm-up epochs
        assert all(a >= b for a, b in zip(cycle[19:], cycle[20:]))  # then 80 epochs of cosine decay
    assert Tina(lr_restart=False).restart_warmup is None


class StepLRProbe(L.Callback):
    """Records the learning rate of every optimisation step."""

    def __init__(self, out: str) -> None:
        self.out, self.lrs = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.out, "w") as f:
            json.dump(self.lrs, f)


def test_cycle_warmup_reaches_the_optimizer_in_a_run(tmp_path):
    """In a real fit (4 steps per epoch, 2 cycles of 5 epochs, scheduler.warmup_epochs=1 = 10% of the fit) every
    cycle warms up for 20% of its 20 steps: the lr first peaks at the cycle's 4th step (not its 2nd)."""
    overrides = TINY + [
        "method=tina",
        "method.sigma0=8",
        "method.sigma_target=16",
        "method.epochs_per_cycle=5",
        "trainer.max_epochs=10",
        "scheduler.warmup_epochs=1",
        f"paths.output_dir={tmp_path}/o",
        "+callbacks.lr._target_=tests.test_tina.StepLRProbe",
        f"+callbacks.lr.out={tmp_path}/lr.json",
    ]
    record = execute(compose_config(overrides), tmp_path / "run")
    assert record["selection"]["prunes_done"] == 1
    lrs = json.loads((tmp_path / "lr.json").read_text())
    assert len(lrs) == 40
    for cycle in (lrs[:20], lrs[20:]):
        assert cycle.index(max(cycle)) == 3


@pytest.mark.parametrize(("table", "rows", "paper", "smoke"), [
    ("tina_1", 4, list(range(0, 500, 100)), [0, 1, 2, 3, 4]),
    ("tina_2", 4, list(range(0, 500, 100)), [0, 1, 2, 3, 4]),
    ("tina_4", 2, [0, 100, 200], [0, 1, 2]),
])
def test_table_rows_prune_once_every_100_epochs(table, rows, paper, smoke):
    """TINA (k cycles): k prunes, at epochs 100, ..., k x 100 (paper scale; smoke: 1-epoch cycles), each cycle
    100 epochs, not max_epochs / (k + 1)."""
    from hydra.utils import instantiate

    from peftbench.tables.plan import common_overrides
    from peftbench.tables.spec import ACCOUNTING_DATASET, load_spec

    spec = load_spec(table)
    tina_rows = [r for r in spec.rows if r.overrides and "method=tina" in r.overrides]
    assert len(tina_rows) == rows
    width = {f"s{i}": 768 for i in range(24)}  # ViT-B/16: 24 adapters of width 768, sigma0 = 32
    state = {"width": width, "initial": dict.fromkeys(width, 24), "neurons": dict.fromkeys(width, 24), "cycles": []}
    for scale, starts in (("paper", paper), ("smoke", smoke)):
        for row in tina_rows:
            cfg = compose_config([*common_overrides(spec, row, scale, []), ACCOUNTING_DATASET[scale]])
            method, max_epochs = instantiate(cfg.method), int(cfg.trainer.max_epochs)
            prunes = len(method.plan(state))
            assert method.schedule_restarts(state, max_epochs) == starts[1:], (scale, row.name)
            assert method.cycle_starts(state, max_epochs) == starts
            assert 1 <= prunes < len(starts), row.name  # every prune happens, at the starts of cycles 1..k
            assert max_epochs == (starts[1] - starts[0]) * len(starts)


def test_protocol_paper_reports_the_last_cycle_only(tmp_path, monkeypatch):
    """protocol=paper takes the maximum over the last cycle (epochs 2-3 here), never an earlier, larger cycle:
    evaluations are replaced by a known sequence whose overall maximum lies in the first cycle."""
    from peftbench.training.callbacks import EvalHistory

    fake = {0: 0.9, 1: 0.8, 2: 0.5, 3: 0.6}

    def record(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.history.append((trainer.current_epoch, fake[trainer.current_epoch]))

    monkeypatch.setattr(EvalHistory, "on_validation_epoch_end", record)
    overrides = TINY + [
        "method=tina",
        "method.sigma0=8",
        "method.sigma_target=16",
        "method.epochs_per_cycle=2",
        "trainer.max_epochs=4",
        "protocol=paper",
        f"paths.output_dir={tmp_path}/o",
    ]
    record_ = execute(compose_config(overrides), tmp_path / "run")
    assert record_["metrics"]["test_acc"] == 0.6 and record_["metrics"]["best_epoch"] == 3
    assert record_["reporting_window"] == {"first_epoch": 2, "evaluations": 2, "of": 4}
    last = record_["selection"]["cycles"][-1]
    assert last["start_epoch"] == 2 and last["trainable_backbone"] == record_["params"]["trainable_backbone"]
    assert record_["selection"]["cycles"][0]["trainable_backbone"] > last["trainable_backbone"]
