"""Pre-train the embedded backbone ``vit_micro`` on FractalDB-style fractals, and linear-probe it.

``python -m peftbench.pretrain`` renders random IFS fractal categories (:mod:`peftbench.pretrain.fractals`; fresh
instances every epoch), trains the ViT for ``--steps`` optimizer steps (default: the shipped recipe, bit-for-bit
reproducible given the seed) or, with ``--minutes M``, for as many steps as fit M minutes on this machine
(timed on the first steps), with AdamW, warm-up + cosine and label smoothing; then writes
``peftbench/assets/vit_micro.safetensors`` (float16, no head) and ``vit_micro.json`` (recipe, timings, source
accuracy, SHA-256) and runs the linear probes (also recorded in the json).

``python -m peftbench.pretrain --probe`` re-runs only the linear probe of the shipped (or ``--out``) weights
against the same architecture at random init, and records it in the json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy, vit_micro
from peftbench.errors import WeightsError
from peftbench.pretrain import fractals

NAME = vit_micro.NAME
#: the registered timm model's pretrained config: input size and normalisation (ImageNet statistics on [0, 1] RGB)
_CFG = timm.models.get_pretrained_cfg(NAME)
IMAGE_SIZE = _CFG.input_size[-1]
MEAN = torch.tensor(_CFG.mean).view(1, 3, 1, 1)
STD = torch.tensor(_CFG.std).view(1, 3, 1, 1)
ASSETS = Path(vit_micro.asset_path()).parent  # peftbench/assets: where the registered model finds its weights


def build_vit_micro(num_classes: int = 0) -> VisionTransformer:
    """The embedded backbone (timm's registered ``vit_micro``) with random weights (``num_classes=0``: no head)."""
    return timm.create_model(NAME, pretrained=False, num_classes=num_classes)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W) normalised with ImageNet mean/std."""
    return (images.float() / 255 - MEAN) / STD


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.01) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, 3, H, W)."""
    model.eval()
    correct = sum(
        int((model(normalize(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum())
        for i in range(0, len(labels), batch)
    )
    return correct / max(1, len(labels))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Render the fractal source task, train vit_micro on it, save weights + recipe; returns the recipe."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    categories = fractals.sample_categories(args.categories, seed=args.seed)
    held_x, held_y = fractals.render_dataset(categories, args.heldout_per_category, seed=args.seed + 10**6)
    held_x, held_y = torch.from_numpy(held_x), torch.from_numpy(held_y)
    model = build_vit_micro(args.categories)
    decays = {n: p.ndim > 1 and anatomy.embedding_part(n) != "position_embedding" for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = args.categories * args.per_category
    steps_per_epoch = max(1, per_epoch // args.batch_size)
    total = None if args.minutes is not None else args.steps  # None: sized after timing the first steps
    budget = (args.minutes or 0.0) * 60
    step, epoch, render_s, log = 0, 0, 0.0, []
    train_start = time.time()
    while total is None or step < total:
        t_render = time.time()
        x_np, y_np = fractals.render_dataset(categories, args.per_category, seed=args.seed * 1000 + epoch + 1)
        render_s += time.time() - t_render
        images, labels = torch.from_numpy(x_np), torch.from_numpy(y_np)
        order = torch.randperm(len(labels), generator=gen)
        model.train()
        for i in range(steps_per_epoch):
            if total is not None and step >= total:
                break
            if budget and total is not None and time.time() - t0 > budget * 1.5 + 60:  # safety net only
                print(f"stopping early at step {step}: past 1.5x the time budget")
                total = step
                break
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            warmup = args.warmup_steps if total is None else min(args.warmup_steps, max(1, total // 10))
            lr = lr_at(step, total or 10**9, warmup, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(normalize(images[idx]))  # (B, categories)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if total is None and step == args.calib_steps:
                total = _steps_for_budget(t0, train_start, budget, step, render_s, steps_per_epoch)
                print(f"{step} steps in {time.time() - train_start:.1f}s -> training for {total} steps")
            if step % 50 == 0 or step == total:
                acc, loss = float((logits.argmax(1) == labels[idx]).float().mean()), loss.item()
                log.append({"step": step, "loss": round(float(loss), 4), "batch_acc": round(acc, 4)})
                print(f"epoch {epoch} step {step}/{total} lr {lr:.2e} loss {loss:.3f} acc {acc:.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        epoch += 1
    train_s = time.time() - train_start
    source_acc = accuracy(model, held_x, held_y)
    print(f"held-out source accuracy {source_acc:.4f} after {step} steps ({time.time() - t0:.0f}s)")
    recipe = {
        "name": NAME,
        "architecture": {"class": "timm.models.vision_transformer.VisionTransformer", "timm_name": NAME,
                         **vit_micro.ARGS},
        "normalization": {"mean": MEAN.flatten().tolist(), "std": STD.flatten().tolist()},
        "source": {
            "kind": "FractalDB-style IFS fractals (peftbench.pretrain.fractals)",
            "categories": args.categories,
            "images_per_category_per_epoch": args.per_category,
            "fresh_instances_every_epoch": True,
            "heldout_images_per_category": args.heldout_per_category,
            "image_size": IMAGE_SIZE,
            "maps_per_ifs": [2, fractals.MAX_MAPS],
        },
        "training": {
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "warmup_steps": min(args.warmup_steps, max(1, step // 10)),
            "schedule": "linear warm-up, cosine to 1% of peak",
            "label_smoothing": args.label_smoothing,
            "grad_clip": 1.0,
            "steps": step,
            "epochs": round(step / steps_per_epoch, 2),
            "seed": args.seed,
            "minutes_budget": args.minutes,
            "threads": torch.get_num_threads(),
            "reproduce": f"python -m peftbench.pretrain --steps {step} --seed {args.seed} "
            f"--categories {args.categories} --per-category {args.per_category} --batch-size {args.batch_size} "
            f"--lr {args.lr} --weight-decay {args.weight_decay} --warmup-steps {args.warmup_steps} "
            f"--label-smoothing {args.label_smoothing}",
        },
        "timing_s": {"total": round(time.time() - t0, 1), "train": round(train_s, 1), "render": round(render_s, 1)},
        "source_heldout_accuracy": round(source_acc, 4),
        "loss_log": log[-20:],
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.processor() or platform.machine(),
    }
    save(model, Path(args.out), recipe)
    return recipe


def _steps_for_budget(t0: float, train_start: float, budget: float, done: int, render_s: float, per_epoch: int) -> int:
    """Total steps that fit the remaining budget, from the speed of the ``done`` steps so far."""
    per_step = (time.time() - train_start - render_s) / done
    per_step += render_s / per_epoch  # rendering cost of one epoch, spread over its steps
    left = budget - (time.time() - t0) - 20  # keep ~20 s for the held-out evaluation and saving
    return max(done + 1, done + int(left / per_step))


def save(model: VisionTransformer, out: Path, recipe: dict[str, Any]) -> Path:
    """Write ``<out>/vit_micro.safetensors`` (float16, head removed) and ``vit_micro.json`` (with its SHA-256)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{NAME}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file(state, str(weights), metadata={"format": "pt", "name": NAME})
    recipe = {**recipe, "file": weights.name, "sha256": sha256(weights), "bytes": weights.stat().st_size}
    (out / f"{NAME}.json").write_text(json.dumps(recipe, indent=2) + "\n")
    weights.chmod(0o644)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB)")
    return weights


def load_vit_micro(out: Path = ASSETS) -> VisionTransformer:
    """vit_micro with the weights in ``<out>/vit_micro.safetensors`` (no head), checked against the json."""
    from safetensors.torch import load_file

    weights, meta = Path(out) / f"{NAME}.safetensors", Path(out) / f"{NAME}.json"
    recorded = json.loads(meta.read_text()).get("sha256")
    if recorded != sha256(weights):
        raise WeightsError(f"{weights}: SHA-256 does not match {meta}; rebuild with python -m peftbench.pretrain")
    model = build_vit_micro()
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=True)
    return model


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Frozen cls-token features after the final norm: uint8 (N, 3, H, W) -> float (N, embed_dim)."""
    model.eval()
    out = [
        anatomy.pre_logits(model, normalize(images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy()


def linear_probe(model: torch.nn.Module, task_name: str, seed: int = 0) -> float:
    """Logistic regression on frozen features: C chosen on train800 -> val200, refit on train800val200, test acc."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from peftbench.data.embedded import EmbeddedTask

    task = EmbeddedTask(task_name, seed=seed)
    split = {s: task.load_split(s, IMAGE_SIZE) for s in ("train800", "val200", "train800val200", "test")}
    feats = {s: features(model, a.images) for s, a in split.items()}
    labels = {s: a.labels.numpy() for s, a in split.items()}

    def fit(train: str, c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(feats[train])
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(feats[train]), labels[train])
        return scaler, clf

    def score(fitted: tuple[StandardScaler, LogisticRegression], split_name: str) -> float:
        scaler, clf = fitted
        return float(clf.score(scaler.transform(feats[split_name]), labels[split_name]))

    with threadpool_limits(1):  # BLAS threads fighting torch's make lbfgs ~30x slower on small problems
        best_c = max((0.01, 0.1, 1.0, 10.0), key=lambda c: score(fit("train800", c), "val200"))
        return score(fit("train800val200", best_c), "test")


def probe(out: Path, tasks: list[str], seed: int = 0) -> dict[str, dict[str, float]]:
    """Linear probes of the weights in ``out`` vs random init on ``tasks``; recorded in ``vit_micro.json``."""
    from peftbench.data.embedded import VTAB_MINI

    tasks = tasks or list(VTAB_MINI)
    pretrained = load_vit_micro(out)
    torch.manual_seed(seed)
    random_init = build_vit_micro()
    results = {}
    for name in tasks:
        results[name] = {"pretrained": round(linear_probe(pretrained, name), 4),
                         "random_init": round(linear_probe(random_init, name), 4)}
        print(f"linear probe {name:12s} pretrained {results[name]['pretrained']:.4f} "
              f"random init {results[name]['random_init']:.4f}", flush=True)
    meta = Path(out) / f"{NAME}.json"
    recipe = json.loads(meta.read_text())
    recipe["linear_probe"] = {
        "protocol": "frozen cls features after final norm, standardised; sklearn LogisticRegression, C in "
        "{0.01,0.1,1,10} picked on train800->val200, refit on train800val200, test accuracy",
        "random_init_seed": seed,
        "tasks": results,
    }
    meta.write_text(json.dumps(recipe, indent=2) + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the shipped recipe)."""
    p = argparse.ArgumentParser(prog="python -m peftbench.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (the shipped recipe; ~15 min on 2 cores)")
    p.add_argument("--minutes", type=float, default=None, help="instead of --steps: size the run to this budget")
    p.add_argument("--categories", type=int, default=128, help="fractal categories (IFS)")
    p.add_argument("--per-category", type=int, default=128, help="fresh images per category per epoch")
    p.add_argument("--heldout-per-category", type=int, default=10, help="held-out images for source accuracy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up steps (at most 10%% of all)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--calib-steps", type=int, default=30, help="steps timed to size the run to --minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ASSETS, help="directory for vit_micro.safetensors / .json")
    p.add_argument("--probe", action="store_true", help="only run the linear probe of the weights in --out")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe after training")
    p.add_argument("--probe-tasks", nargs="*", default=[], help="embedded tasks to probe (default: VTAB_MINI)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m peftbench.pretrain``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.probe:
        train(args)
    if args.probe or not args.no_probe:
        probe(args.out, args.probe_tasks, seed=args.seed)


if __name__ == "__main__":
    main()
