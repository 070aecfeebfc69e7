"""TINA (Marouf et al., "Tiny Adapters for Vision Transformers", ICLR 2023 submission on OpenReview; WACV 2024 as "Mini
but Mighty", arXiv:2311.03873): Houlsby adapters after MSA and MLP, iteratively shrunk by structural neuron pruning.

Every block gets a sequential bottleneck adapter after attention (wrapping ``proj``) and after the MLP (wrapping
``fc2``), of hidden width n_i = round(m_i / sigma0) (or a fixed ``n0``). Training runs in cycles inside ONE
Lightning fit; at each cycle boundary (an epoch start) the training hooks (:meth:`Tina.on_epoch_start`,
:meth:`Tina.update`, driven by :class:`peftbench.training.callbacks.MethodHooks`) score every hidden neuron, remove
the lowest-scored ones and really shrink the adapters' Linear layers (survivors keep their weights and their AdamW
state; adapters left without neurons are removed); the callback then rebuilds the optimizer and scheduler.

Score of neuron j of an adapter with input (and output) width m and hidden width n (Sec. 3.3, Table 3):
    I0_j = sum_k |W_down[j, k]| + sum_k |W_up[k, j]|     (L1 of its down row + up column)    (``score=i0``)
    I_j  = I0_j / (2 m)       the authors' code (``--scaling 1``): divided by the number of summed weights, the
                              paper's "normalized by the total number in the sums"; the default   (``score=tina``)
    I_j  = I0_j / (n + m)     Eq. 2 as printed (its up-sum runs to n_i: a typo for m_i)       (``score=tina_eq2``)
    L1_j = sum_k |W_down[j, k]|   (Table 3's "Vanilla L1": down row only)                   (``score=l1_down``)
    A_j  = mean over scoring images and tokens of |act(down(h))_j|   (Table 3's L1(a): eval mode, the run's
           scoring batches, ``scoring.n_samples`` training images)                          (``score=activation``)
The main tables' TINA is "Global, I, iterative, scaling": ``score=tina selection=global schedule=iterative``.
The scaling only changes a GLOBAL ranking when adapters differ in width: with the code's 2m, I ranks as I0 on a
plain ViT (one width) and differently on Swin (Table 3's backbone: widths 96 to 768); Eq. 2's n + m also differs
on a ViT once the hidden widths diverge. ``normalize=true`` (the authors' code's ``--weighted 1``, off in their
released scripts: ``--weighted 0``) divides each adapter's scores by their max before the global threshold, which
cancels any per-adapter factor (then ``tina``, ``tina_eq2`` and ``i0`` select the same neurons).

Cycles (Sec. 4): the fit is a sequence of cycles of ``epochs_per_cycle`` epochs (or ``fit_cycles`` equal cycles of
``trainer.max_epochs``, or by default prunes + 1 cycles); Alg. 1's prunes happen at the starts of cycles 1..P and
the remaining cycles fine-tune at the final size (the paper's ablation: "training continues for C - 1 cycles").
With ``lr_restart`` every cycle runs its own warm-up + cosine schedule, the warm-up being ``cycle_warmup`` of the
cycle (0.2: the paper's 20 warm-up + 80 cosine epochs of every 100-epoch cycle; the authors' code rebuilds its
scheduler each cycle). ``protocol=paper`` reports the best test accuracy of the LAST cycle only (the paper's "best
score for the last cycle", Sec. 4.2), with the last cycle's parameter count (:meth:`Tina.first_reportable_epoch`).

Choices where the paper is silent (all in ``conf/method/tina.yaml``):
- Compression sigma = sum_i m_i / sum_i n_i over every adapter slot (removed adapters count n_i = 0).
- A prune removes round_half_up(rho * N) of the N remaining neurons (global: N over all adapters; ties broken
  by a stable sort, so the kept count is exact; local: N per adapter, keeping at least one neuron each).
- The pruning loop runs while sigma < sigma_target (Alg. 1); the number of prunes is computed in advance by
  simulating the counts. The paper's formula C = ceil((log sigma0 - log sigma_target) / log rho - 1) is logged
  and recorded as ``cycles_formula``; for exact powers (32 -> 512, rho 0.5) it is one less than the number of
  prunes Alg. 1 performs (4), which is what runs (Table 1's "TINA (k cycles)" = k prunes).
- ``schedule=one_shot``: a single prune at the first boundary straight to the count the iterative schedule ends
  with, then training continues (Table 3's non-iterative rows).
- An emptied adapter is replaced by its base layer, dropping its ``up`` bias too.
- AdamW moments of the surviving neurons are kept across prunes (the authors' code masks neurons and keeps its
  optimizer).
- Every cycle records its parameters, neurons per adapter, last val/acc and its test accuracy (``cycle_test``;
  one evaluation of the test split when the cycle closes; under protocol=paper val/acc already is test).
- DDP: rank 0's prune is broadcast and applied on every rank (the ranks compute the same one anyway: weights are
  in sync, ties broken by a stable sort), then the DDP wrapper is rebuilt around the shrunken parameters.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.adapter import Bottleneck, SequentialAdapter
from peftbench.methods.adapter import PLACEMENTS, Adapter
from peftbench.methods.base import ParamMap, State, TrainingContext, freeze

log = logging.getLogger(__name__)

SCORES = ("tina", "tina_eq2", "i0", "l1_down", "activation")
SELECTIONS = ("global", "local")
SCHEDULES = ("iterative", "one_shot")


def paper_cycles(sigma0: float, sigma_target: float, rho: float) -> int:
    """The paper's cycle count C = ceil((log sigma0 - log sigma_target) / log rho - 1) (Sec. 3.2), literally.

    It uses log(rho) where removing the fraction rho per prune calls for log(1 - rho); both agree at rho = 0.5.
    """
    return math.ceil((math.log(sigma0) - math.log(sigma_target)) / math.log(rho) - 1 - 1e-9)


def removed_count(n: int, rho: float) -> int:
    """Neurons removed from ``n`` by one prune: round_half_up(rho * n)."""
    return int(math.floor(rho * n + 0.5))


def adapters(model: nn.Module) -> dict[str, SequentialAdapter]:
    """Slot name (the wrapped linear's path, e.g. ``blocks.3.attn.proj``) -> live TINA adapter, forward order."""
    found = {}
    for block in anatomy.blocks(model):
        for target in PLACEMENTS["both"]:
            layer = block.linear(target)
            if isinstance(layer, SequentialAdapter) and isinstance(layer.adapter, Bottleneck):
                found[block.linear_path(target)] = layer
    return found


def neuron_scores(bottleneck: Bottleneck, score: str) -> torch.Tensor:
    """Importance of each hidden neuron of one adapter, shape (n,)."""
    down, up = bottleneck.down.weight.detach(), bottleneck.up.weight.detach()  # (n, m), (m, n)
    l1_down = down.abs().sum(dim=1)  # (n,)
    if score == "l1_down":
        return l1_down
    i0 = l1_down + up.abs().sum(dim=0)  # (n,)
    if score == "i0":
        return i0
    if score == "tina":  # the authors' code: over the 2m summed weights (m in the down row, m in the up column)
        return i0 / (down.shape[1] + up.shape[0])
    if score == "tina_eq2":  # Eq. 2 as printed: over n_i + m_i
        return i0 / (bottleneck.n_in + bottleneck.n)
    raise ConfigError(f"unknown TINA score {score!r}; choose from {SCORES} (activation needs data)")


@torch.no_grad()
def activation_scores(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Mean |hidden activation| act(down(h))_j of every live adapter's neurons over ``batches`` (eval mode)."""
    live = adapters(model)
    sums = {k: torch.zeros(a.adapter.n, device=a.adapter.down.weight.device) for k, a in live.items()}
    rows = dict.fromkeys(live, 0)

    def hook(name: str):
        def accumulate(module: nn.Module, inputs, output: torch.Tensor) -> None:
            flat = output.detach().abs().reshape(-1, output.shape[-1]).float()  # (B * tokens, n)
            sums[name] += flat.sum(dim=0)
            rows[name] += flat.shape[0]

        return accumulate

    handles = [a.adapter.act.register_forward_hook(hook(k)) for k, a in live.items()]
    was_training = model.training
    model.eval()
    try:
        for images, _ in batches:
            model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / max(1, rows[k]) for k in live}


def select_global(scores: dict[str, torch.Tensor], keep_total: int, normalize: bool) -> dict[str, torch.Tensor]:
    """Keep exactly ``keep_total`` neurons over all adapters (highest scores); return sorted kept indices."""
    names = list(scores)
    parts = [scores[k] / scores[k].max().clamp_min(1e-30) if normalize else scores[k] for k in names]
    flat = torch.cat(parts)  # (N,)
    owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])  # (N,)
    local = torch.cat([torch.arange(len(p)) for p in parts])  # (N,)
    order = torch.sort(flat, descending=True, stable=True).indices[:keep_total]
    return {k: local[order[owner[order] == i]].sort().values for i, k in enumerate(names)}


def select_local(scores: dict[str, torch.Tensor], keep: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep the ``keep[name]`` highest-scored neurons of each adapter; return sorted kept indices."""
    out = {}
    for k, s in scores.items():
        out[k] = torch.sort(s, descending=True, stable=True).indices[: keep[k]].sort().values
    return out


def shrink(bottleneck: Bottleneck, kept: torch.Tensor) -> ParamMap:
    """Replace ``down``/``up`` by Linear layers holding only the ``kept`` hidden neurons (trained values)."""
    old_down, old_up = bottleneck.down, bottleneck.up
    w = old_down.weight
    k = len(kept)
    down = nn.Linear(bottleneck.n_in, k, device=w.device, dtype=w.dtype)
    up = nn.Linear(k, bottleneck.n_in, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        down.weight.copy_(old_down.weight[kept])  # (k, m)
        down.bias.copy_(old_down.bias[kept])  # (k,)
        up.weight.copy_(old_up.weight[:, kept])  # (m, k)
    up.bias = old_up.bias  # (m,): untouched, the same Parameter (and optimizer state)
    bottleneck.down, bottleneck.up, bottleneck.n = down, up, k
    return {
        down.weight: (old_down.weight, 0, kept),
        down.bias: (old_down.bias, 0, kept),
        up.weight: (old_up.weight, 1, kept),
    }


def prune(model: nn.Module, kept: dict[str, torch.Tensor]) -> ParamMap:
    """Shrink every adapter to its ``kept`` neurons; an adapter keeping none is replaced by its base layer."""
    mapping: ParamMap = {}
    live = adapters(model)
    for block in anatomy.blocks(model):
        for target in PLACEMENTS["both"]:
            name = block.linear_path(target)
            if name not in kept or name not in live:
                continue
            if len(kept[name]) == 0:
                block.set_linear(target, live[name].base_layer)
            else:
                mapping.update(shrink(live[name].adapter, kept[name].to(live[name].adapter.down.weight.device)))
    return mapping


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the backbone (adapters) and of the head."""
    head_ids = {id(p) for p in anatomy.head(model).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in trainable if id(p) in head_ids)
    return {"trainable_backbone": sum(p.numel() for p in trainable) - head, "trainable_head": head}


class Tina(Adapter):
    """TINA: Houlsby adapters (placement ``both``) shrunk over training cycles by neuron scores.

    Args:
        sigma0: initial compression ratio m_i / n_i (ignored when ``n0`` is set).
        n0: fixed initial hidden width of every adapter (the authors' code uses 256).
        sigma_target: the compression sum(m) / sum(n) at which pruning stops.
        rho: fraction of the remaining neurons removed per prune (compounding).
        score: ``tina`` (the authors' code: over 2m), ``tina_eq2`` (Eq. 2 as printed: over n + m), ``i0`` (no
            scaling), ``l1_down`` (vanilla L1 of the down row), ``activation`` (mean |hidden activation|).
        selection: ``global`` (one threshold over all adapters) or ``local`` (same fraction per adapter).
        schedule: ``iterative`` (Alg. 1) or ``one_shot`` (a single prune to the final count).
        normalize: divide each adapter's scores by their max before the global threshold (the authors' code's
            ``--weighted 1``; off in their released scripts and by default).
        epochs_per_cycle: epochs per cycle (takes precedence over ``fit_cycles``).
        fit_cycles: the fit is this many equal cycles of max_epochs // fit_cycles epochs, the last taking the
            rest (null, with ``epochs_per_cycle`` null: prunes + 1 cycles).
        lr_restart: restart warm-up + cosine at every cycle (paper) instead of one schedule over the fit.
        cycle_warmup: warm-up fraction of every cycle under ``lr_restart`` (0.2: the paper's 20 of 100 epochs;
            null: the scheduler's own share, ``scheduler.warmup_epochs / trainer.max_epochs``).
        cycle_test: evaluate the test split at the end of every cycle (recorded in ``selection.cycles``).
        act, dropout: as for :class:`~peftbench.methods.adapter.Adapter`.
    """

    def __init__(
        self,
        sigma0: float = 32.0,
        n0: int | None = None,
        sigma_target: float = 512.0,
        rho: float = 0.5,
        score: str = "tina",
        selection: str = "global",
        schedule: str = "iterative",
        normalize: bool = False,
        epochs_per_cycle: int | None = None,
        fit_cycles: int | None = None,
        lr_restart: bool = True,
        cycle_warmup: float | None = 0.2,
        cycle_test: bool = True,
        act: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(n=n0 or 1, sigma=None if n0 else sigma0, placement="both", act=act, dropout=dropout)
        if not 0 < rho < 1:
            raise ConfigError(f"TINA rho must be in (0, 1), got {rho}")
        for value, allowed, what in (
            (score, SCORES, "score"),
            (selection, SELECTIONS, "selection"),
            (schedule, SCHEDULES, "schedule"),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown TINA {what} {value!r}; choose from {allowed}")
        self.sigma0, self.n0, self.sigma_target, self.rho = float(sigma0), n0, float(sigma_target), float(rho)
        self.score, self.selection, self.schedule, self.normalize = score, selection, schedule, bool(normalize)
        for value, what in ((epochs_per_cycle, "epochs_per_cycle"), (fit_cycles, "fit_cycles")):
            if value is not None and int(value) < 1:
                raise ConfigError(f"TINA {what} must be >= 1 (or null), got {value}")
        if cycle_warmup is not None and not 0 <= cycle_warmup < 1:
            raise ConfigError(f"TINA cycle_warmup must be in [0, 1) (or null), got {cycle_warmup}")
        self.epochs_per_cycle = int(epochs_per_cycle) if epochs_per_cycle else None
        self.fit_cycles = int(fit_cycles) if fit_cycles else None
        self.lr_restart, self.cycle_test = bool(lr_restart), bool(cycle_test)
        self.cycle_warmup = None if cycle_warmup is None else float(cycle_warmup)
        self.restart_warmup = self.cycle_warmup if self.lr_restart else None  # read by the schedule

    @property
    def name(self) -> str:
        return "tina"

    # --- planning ----------------------------------------------------------------------------------
    def compression(self, state: State, neurons: dict[str, int] | None = None) -> float:
        """sum(m) / sum(n) over every slot (inf when no neuron is left)."""
        neurons = state["neurons"] if neurons is None else neurons
        total = sum(neurons.values())
        return math.inf if total == 0 else sum(state["width"].values()) / total

    def next_counts(self, neurons: dict[str, int]) -> dict[str, int] | int:
        """Counts after one iterative prune: per adapter (local) or the global total."""
        if self.selection == "local":
            return {k: max(1, n - removed_count(n, self.rho)) if n else 0 for k, n in neurons.items()}
        total = sum(neurons.values())
        return max(1, total - removed_count(total, self.rho))

    def plan(self, state: State) -> list[dict[str, int] | int]:
        """The prune targets of Alg. 1 from ``state``'s initial counts, computed up front (deterministic)."""
        neurons, steps = dict(state["initial"]), []
        width = sum(state["width"].values())
        while width / max(1, sum(neurons.values())) < self.sigma_target and len(steps) < 64:
            target = self.next_counts(neurons)
            if self.selection == "local":
                if target == neurons:
                    break
                neurons = target
            else:
                if target == sum(neurons.values()):
                    break
                neurons = {"total": target}
            steps.append(target)
        if self.schedule == "one_shot" and steps:
            steps = [steps[-1]]
        return steps

    def cycle_starts(self, state: State, max_epochs: int) -> list[int]:
        """The epochs at which the fit's cycles start, [0, E, 2E, ...] (below ``max_epochs``).

        E = ``epochs_per_cycle`` (cycles of E epochs until the fit ends), else max_epochs // N for N =
        ``fit_cycles`` or prunes + 1 cycles, the last cycle taking the remaining epochs.
        """
        if self.epochs_per_cycle:
            return list(range(0, max_epochs, self.epochs_per_cycle))
        cycles = self.fit_cycles or len(self.plan(state)) + 1
        every = max(1, max_epochs // cycles)
        return [k * every for k in range(cycles) if k * every < max_epochs]

    def schedule_restarts(self, state: State | None, max_epochs: int) -> list[int]:
        """With ``lr_restart``: the epochs at which a new cycle (and its warm-up + cosine) starts."""
        if not self.lr_restart or not state:
            return []
        return self.cycle_starts(state, max_epochs)[1:]

    def first_reportable_epoch(self, state: State) -> int:
        """The first epoch of the last cycle that ran: the paper reports "the best score for the last cycle"."""
        cycles = state.get("cycles") or []
        return int(cycles[-1]["start_epoch"]) if cycles else 0

    # --- Method interface --------------------------------------------------------------------------
    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        width, initial = {}, {}
        for block in anatomy.blocks(model):
            for target in PLACEMENTS["both"]:
                if target in block.targets():
                    name = block.linear_path(target)
                    width[name], initial[name] = block.dim, self.hidden(block.dim)
        state: State = {
            "width": width, "initial": initial, "neurons": dict(initial), "prunes": 0, "cycle": 0, "cycles": [],
        }
        # the formula with the realised initial compression (differs from sigma0 by rounding, or when n0 is set)
        state["cycles_formula"] = paper_cycles(self.compression(state), self.sigma_target, self.rho)
        state["prunes_planned"] = len(self.plan(state))
        log.info(
            f"TINA: {len(width)} adapters, {sum(initial.values())} neurons (sigma {self.compression(state):.1f}); "
            f"paper formula C = {state['cycles_formula']} cycles; Alg. 1 prunes {state['prunes_planned']} times "
            f"({self.schedule}, {self.selection}, score {self.score}) to reach sigma {self.sigma_target:g}"
        )
        return state

    def apply(self, model: nn.Module, state: State) -> None:
        """Insert adapters at their current (possibly already pruned, on resume) widths."""
        freeze(model)
        for block in anatomy.blocks(model):
            for target in PLACEMENTS["both"]:
                n = state["neurons"].get(block.linear_path(target), 0)
                if n > 0:
                    layer = block.linear(target)
                    w = layer.weight
                    adapter = Bottleneck(block.dim, n, self.act, self.dropout, device=w.device, dtype=w.dtype)
                    block.set_linear(target, SequentialAdapter(layer, adapter))

    def describe(self, state: State) -> dict[str, Any]:
        return {
            "score": self.score,
            "selection": self.selection,
            "schedule": self.schedule,
            "normalize": self.normalize,
            "lr_restart": self.lr_restart,
            "cycle_warmup": self.restart_warmup,
            "rho": self.rho,
            "sigma0": self.sigma0,
            "n0": self.n0,
            "sigma_target": self.sigma_target,
            "cycles_formula": state.get("cycles_formula"),
            "prunes_planned": state.get("prunes_planned"),
            "prunes_done": state.get("prunes", 0),
            "sigma_final": self.compression(state),
            "neurons": dict(state.get("neurons", {})),
            "cycles": list(state.get("cycles", [])),
        }

    # --- one prune ---------------------------------------------------------------------------------
    def choose(
        self, model: nn.Module, target: dict[str, int] | int, batches: Callable[[], Iterable] | None = None
    ) -> dict[str, torch.Tensor]:
        """Kept neuron indices per live adapter for one prune to ``target`` counts (``batches``: activation)."""
        if self.score == "activation":
            if batches is None:
                raise ConfigError("TINA score=activation needs data batches")
            scores = activation_scores(model, batches())
        else:
            scores = {k: neuron_scores(a.adapter, self.score) for k, a in adapters(model).items()}
        if self.selection == "local":
            return select_local(scores, {k: min(target[k], len(s)) for k, s in scores.items()})
        return select_global(scores, min(int(target), sum(len(s) for s in scores.values())), self.normalize)

    # --- training hooks (driven by peftbench.training.callbacks.MethodHooks) ----------------------------------------
    def on_epoch_start(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """At a cycle start: close the cycle that just ended (record, test accuracy) and, while Alg. 1 still has
        prunes to do, choose the next one. The chosen neurons travel in the new state's ``pending_prune``
        (consumed by :meth:`update`)."""
        starts = self.cycle_starts(state, ctx.max_epochs)
        if ctx.epoch == 0 or ctx.epoch not in starts or starts.index(ctx.epoch) <= state.get("cycle", state["prunes"]):
            return None  # not a cycle start, or one already begun (a resumed run)
        new = copy.deepcopy(state)
        self.record(model, new, ctx, ctx.epoch - 1, close=True)  # close the cycle that just ended
        new["cycle"] = starts.index(ctx.epoch)
        steps, done = self.plan(state), state["prunes"]
        if done < len(steps):
            kept = self.choose(model, steps[done], ctx.batches)
            new["pending_prune"] = {k: v.tolist() for k, v in kept.items()}
            left = {k: len(kept.get(k, [])) for k in state["width"]}
            ctx.info(
                f"TINA: cycle {new['cycle']}, prune {done + 1}/{len(steps)} at epoch {ctx.epoch}: "
                f"{sum(left.values())} neurons left, sigma {self.compression(state, left):.1f}"
            )
        return new

    def update(self, model: nn.Module, old: State, new: State) -> ParamMap | None:
        """Apply ``new["pending_prune"]``: shrink the adapters; the mapping carries the survivors' AdamW state."""
        pending = new.pop("pending_prune", None)
        if pending is None:
            return None
        mapping = prune(model, {k: torch.tensor(v, dtype=torch.long) for k, v in pending.items()})
        live = adapters(model)
        new["neurons"] = {k: live[k].adapter.n if k in live else 0 for k in new["width"]}
        new["prunes"] = old["prunes"] + 1
        return mapping

    def on_epoch_end(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """Update the running cycle's record (parameters, last val/acc)."""
        new = copy.deepcopy(state)
        self.record(model, new, ctx, ctx.epoch)
        return new

    def on_fit_end(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """Close the last cycle (record, test accuracy); warn when the fit was too short for every prune."""
        planned = len(self.plan(state))
        if state["prunes"] < planned:
            ctx.warn(
                f"TINA: {ctx.max_epochs} epochs fit only {state['prunes']} of {planned} prunes; "
                f"sigma_target {self.sigma_target:g} was not reached"
            )
        new = copy.deepcopy(state)
        self.record(model, new, ctx, ctx.epoch, close=True)
        return new

    def record(self, model: nn.Module, state: State, ctx: TrainingContext, end_epoch: int, close: bool = False) -> None:
        """Write (or update) the current cycle's entry of ``state["cycles"]`` (in place): its configuration,
        parameters, last val/acc and, when the cycle closes (prune or end of fit), its test accuracy."""
        acc = ctx.metrics.get("val/acc")
        cycle = state.get("cycle", state["prunes"])
        starts = self.cycle_starts(state, ctx.max_epochs)
        entry = {
            "cycle": cycle,
            "start_epoch": starts[min(cycle, len(starts) - 1)],
            "end_epoch": int(end_epoch),
            "prunes": state["prunes"],
            "neurons": dict(state["neurons"]),
            "sigma": self.compression(state),
            **trainable_counts(model),
            "val_acc": acc,
            "test_acc": None,
        }
        if close and self.cycle_test and ctx.evaluate is not None:
            entry["test_acc"] = ctx.evaluate("test")
        cycles = state["cycles"]
        if cycles and cycles[-1]["cycle"] == entry["cycle"]:
            for key in ("val_acc", "test_acc"):  # e.g. right after a resume: keep the cycle's last known numbers
                if entry[key] is None:
                    entry[key] = cycles[-1].get(key)
            cycles[-1] = entry
        else:
            cycles.append(entry)
