"""The prepared GPU check: ``bash scripts/gpu_check.sh`` (``make gpu-check``); see the header of that script.

Through peftbench's own training path (``PEFTModule`` + ``VisionDataModule`` with ``data.resident=true`` + the
Lightning Trainer of ``conf/trainer/gpu.yaml``), on ViT-B/16 at 224x224 with random weights and synthetic uint8
images (no download), bf16 autocast, batch 64, it measures:

- ``methods``: training img/s (device-synchronised wall time over the timed steps, after the warm-up steps) and
  peak training memory (CUDA ``max_memory_allocated`` over the timed steps minus the allocation before the model
  was built, minus the resident data) of full, linear, lora, spt_lora, cdra_spt, adapter, vpt_deep, heart_lora,
  hifi and tina, each against LoRA; evaluation img/s (``evaluate``: inference_mode, eval batch 256, the second of
  two passes);
- ``compile``: LoRA with ``compile=true``: seconds of the warm-up steps (the compilation) and img/s after it;
- ``concurrency``: N LoRA runs at once on the device (N processes; timing starts at a barrier after every run's
  warm-up): combined img/s = all timed images / (last end - first start), against one run;
- ``projection``: the wall time of SPT Table 1's LoRA row (19 VTAB-1k tasks x 100 epochs x 1,000 images, then
  every test set) from the measured rates (``peftbench.bench.moonshot``, the preset of ``conf/bench/gpu.yaml``).

One process measures the methods one after another (memory freed and the peak reset between them); the concurrent
runs are fresh processes. Every part runs only while the budget (``GPU_CHECK_BUDGET_S``, default 420 s) lasts; the
JSON and Markdown (``$GPU_CHECK_OUT/gpu_check.json``, ``.md``; default ``outputs/gpu_check/``) are rewritten after
every part, so a cut run keeps what it measured. Without CUDA, or with ``GPU_CHECK_SMOKE=1``, it runs the same
code on vit_micro on the CPU in fp32 with tiny sizes (``compile`` with the eager backend) in about a minute: a check
of the script, not of a machine.

Methods are measured in their first epoch: Heart-LoRA in its warm-up (LoRA on every head), TINA in its first
(widest) cycle; the scorers' data (SPT, CDRA-SPT, HiFi) is cut to ``scoring_samples`` (scoring is timed by
``make bench``, not here).
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ["full", "linear", "lora", "spt_lora", "cdra_spt", "adapter", "vpt_deep", "heart_lora", "hifi", "tina"]
SCORER = {"spt_lora": "sensitivity", "cdra_spt": "sensitivity", "hifi": "hifi"}

#: the two configurations: the real check (ViT-B/16, one GPU) and the smoke run (vit_micro, the CPU)
SETTINGS: dict[str, dict[str, Any]] = {
    "gpu": {
        "backbone": ["backbone=vit_b16_in21k", "backbone.pretrained=false"],
        "trainer": "gpu",
        "dtype": "bf16",
        "batch_size": 64,
        "eval_batch_size": 256,
        "warmup_steps": 8,
        "timed_steps": 24,
        "test_images": 2048,
        "scoring_samples": 64,
        "concurrency": [2, 4],
        "concurrent_timed_steps": 24,
        "compile_backend": "inductor",
        "threads": None,
    },
    "smoke": {
        "backbone": ["backbone=vit_micro", "backbone.pretrained=false"],
        "trainer": "cpu",
        "dtype": "fp32",
        "batch_size": 8,
        "eval_batch_size": 32,
        "warmup_steps": 2,
        "timed_steps": 4,
        "test_images": 64,
        "scoring_samples": 16,
        "concurrency": [2],
        "concurrent_timed_steps": 4,
        "compile_backend": "eager",
        "threads": 1,
    },
}


# --- synthetic data ----------------------------------------------------------------------------------------------
def synthetic_task(n_train: int, n_test: int, size: int, num_classes: int):
    """A Task of random uint8 images (n, 3, size, size) and labels: ``trainval`` for training, ``test``."""
    from peftbench.data.base import SplitArrays, Task

    class Synthetic(Task):
        cache: dict[str, SplitArrays] = {}

        def load_role(self, role: str, image_size: int) -> SplitArrays:
            n = n_test if role == "test" else n_train
            key = f"{n}-{image_size}-{num_classes}"
            if key not in self.cache:
                g = torch.Generator().manual_seed(n)
                images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
                self.cache[key] = SplitArrays(images, torch.randint(0, num_classes, (n,), generator=g))
            return self.cache[key]

    return Synthetic("synthetic", num_classes)


# --- one training run, measured ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_callback(warmup: int, timed: int, barrier=None):
    """A callback timing training steps ``warmup`` .. ``warmup + timed - 1`` (device-synchronised at both ends),
    resetting the CUDA peak there; with ``barrier``, every process starts timing together."""
    import lightning as L

    class Throughput(L.Callback):
        def __init__(self) -> None:
            self.start = self.end = None
            self.warmup_s = None
            self.t0 = None
            self.images = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            step = trainer.global_step
            if self.t0 is None:
                self.t0 = time.perf_counter()
            if step == warmup:
                _sync(pl_module.device)
                if barrier is not None:
                    barrier.wait(timeout=600)
                if pl_module.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(pl_module.device)
                self.start = time.perf_counter()
                self.warmup_s = self.start - self.t0
            if warmup <= step < warmup + timed:
                self.images += len(batch[1])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup + timed:  # global_step counts the step just taken
                _sync(pl_module.device)
                self.end = time.perf_counter()

    return Throughput()


def train_once(method: str, settings: dict, extra: list[str] = (), barrier=None, evaluate: bool = True) -> dict:
    """Train ``method`` for warm-up + timed steps in this process; return its rates, memory and timings."""
    from peftbench.compose import compose_config, instantiate_group
    from peftbench.data.datamodule import VisionDataModule
    from peftbench.data.resident import split_bytes
    from peftbench.train import build
    from peftbench.training.callbacks import MethodHooks

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device("cuda" if settings["trainer"] == "gpu" else "cpu")
    bs, warmup, timed = settings["batch_size"], settings["warmup_steps"], settings["timed_steps"]
    overrides = [
        *settings["backbone"], f"method={method}", f"trainer={settings['trainer']}", "logger=none",
        "protocol=final", f"data.batch_size={bs}", f"data.eval_batch_size={settings['eval_batch_size']}",
        "data.resident=true", f"scoring.n_samples={settings['scoring_samples']}", "scoring.batch_size=16",
        "backbone.drop_path_rate=0.0",
    ]
    if method in SCORER:
        overrides.append(f"scorer={SCORER[method]}")
    cfg = compose_config([*overrides, *extra])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
    built, _, module, _ = build(cfg)  # the head has the configured task's classes (embedded/digits: 10)
    size = int(cfg.backbone.image_size)
    task = synthetic_task(bs * (warmup + timed), settings["test_images"], size, built.num_classes)
    datamodule = VisionDataModule(task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
    timer = throughput_callback(warmup, timed, barrier)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = instantiate_group(
            cfg.trainer, "trainer", logger=False, callbacks=[MethodHooks(Path(tmp) / "method_state.pt"), timer],
            default_root_dir=tmp, enable_checkpointing=False, enable_progress_bar=False, max_epochs=1,
            max_steps=warmup + timed, limit_val_batches=0,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_s = time.perf_counter() - start
    row: dict[str, Any] = {
        "method": method,
        "train_img_s": timer.images / (timer.end - timer.start),
        "step_ms": 1000 * (timer.end - timer.start) / timed,
        "warmup_s": timer.warmup_s,
        "fit_s": fit_s,
        "window": [timer.start, timer.end],
        "images": timer.images,
        "trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
    }
    data_bytes = sum(split_bytes(s) for s in datamodule.on_device.values())
    if device.type == "cuda":
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - baseline - data_bytes) / 2**20
    if evaluate:
        module.evaluate("test")  # first pass: the test split goes to the device, kernels warm up
        _sync(device)
        start = time.perf_counter()
        module.evaluate("test")
        _sync(device)
        row["eval_img_s"] = settings["test_images"] / (time.perf_counter() - start)
    row["resident"] = sorted(datamodule.on_device)  # the splits held on the device (not loaded)
    del trainer, module, datamodule
    gc.collect()
    return row


def _concurrent_worker(settings: dict, barrier, queue) -> None:
    """Process entry point: one LoRA run timed from the barrier on; puts its row (or its error) on ``queue``."""
    try:
        row = train_once("lora", {**settings, "timed_steps": settings["concurrent_timed_steps"]}, barrier=barrier,
                         evaluate=False)
        queue.put({"status": "ok", **row})
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        queue.put({"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})


def concurrent(settings: dict, n: int, timeout_s: float) -> dict:
    """``n`` LoRA runs at once, one process each: their combined training img/s over the common window."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(settings, barrier, queue), daemon=True) for _ in range(n)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    rows = []
    with contextlib.suppress(Exception):
        for _ in range(n):
            rows.append(queue.get(timeout=max(1.0, timeout_s - (time.perf_counter() - start))))
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()  # our own child, by handle
    failed = [r for r in rows if r["status"] != "ok"]
    if len(rows) < n or failed:
        error = failed[0]["error"] if failed else f"{n - len(rows)} of {n} runs did not report within {timeout_s:.0f}s"
        return {"n": n, "status": "failed", "error": error}
    first, last = min(r["window"][0] for r in rows), max(r["window"][1] for r in rows)
    images = sum(r["images"] for r in rows)
    return {"n": n, "status": "ok", "combined_img_s": images / (last - first),
            "per_run_img_s": [r["train_img_s"] for r in rows], "wall_s": time.perf_counter() - start}


# --- the check ---------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    desc = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        desc += f", {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return desc


def projection(report: dict) -> dict:
    """SPT Table 1's LoRA row from the measured LoRA rates: one run at a time, N at once (the best N), compiled."""
    from peftbench.bench.run import moonshot
    from peftbench.compose import compose_config

    spec = compose_config(["bench=gpu"], config_name="bench").bench.moonshot
    dtype = str(spec.dtype)
    lora = next((r for r in report["methods"] if r["method"] == "lora" and r["status"] == "ok"), None)
    if lora is None:
        return {"status": "no LoRA row"}
    rates = {"one run at a time": lora["train_img_s"]}
    ok = [c for c in report.get("concurrency", []) if c["status"] == "ok"]
    if ok:
        best = max(ok, key=lambda c: c["combined_img_s"])
        rates[f"{best['n']} runs at once"] = best["combined_img_s"]
    if report.get("compile", {}).get("status") == "ok":
        rates["compiled, one run"] = report["compile"]["train_img_s"]
    out = {}
    for name, rate in rates.items():
        row = {"method": str(spec.method), "dtype": dtype, "status": "ok", "train_img_s": rate,
               "eval_img_s": lora["eval_img_s"]}
        out[name] = moonshot([row], spec)
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"GPU check ({report['mode']}): {report['backbone']}, {s['dtype']}, batch {s['batch_size']}, resident data, "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps; {report['machine']}; {report['date']}; "
        f"{report['wall_s']:.0f} s",
        "",
        "| method | trainable | train img/s | x LoRA | step ms | peak MB | mem x LoRA | eval img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lora = next((r for r in report["methods"] if r["method"] == "lora" and r["status"] == "ok"), None)
    for r in report["methods"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r.get('error', '')[:80]} | | | | | | |")
            continue
        speed = f"{r['train_img_s'] / lora['train_img_s']:.2f}" if lora else "-"
        peak = r.get("peak_mb")
        mem = f"{peak / lora['peak_mb']:.2f}" if lora and peak is not None and lora.get("peak_mb") else "-"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['train_img_s']:.0f} | {speed} | {r['step_ms']:.1f} "
            f"| {'-' if peak is None else f'{peak:.0f}'} | {mem} | {r.get('eval_img_s', 0):.0f} |"
        )
    c = report.get("compile")
    if c:
        if c["status"] == "ok":
            gain = f" ({c['train_img_s'] / lora['train_img_s']:.2f}x eager)" if lora else ""
            lines += ["", f"LoRA compile=true ({c['backend']}): {c['train_img_s']:.0f} img/s{gain}; warm-up steps "
                      f"incl. compilation {c['warmup_s']:.1f} s"]
        else:
            lines += ["", f"LoRA compile=true: {c['status']} ({c.get('error', '')[:120]})"]
    lines.append("")
    for conc in report.get("concurrency", []):
        if conc["status"] == "ok":
            gain = f" = {conc['combined_img_s'] / lora['train_img_s']:.2f}x one run" if lora else ""
            lines.append(f"{conc['n']} LoRA runs at once: {conc['combined_img_s']:.0f} img/s combined{gain} "
                         f"(each {', '.join(f'{x:.0f}' for x in conc['per_run_img_s'])})")
        else:
            lines.append(f"{conc['n']} LoRA runs at once: {conc['status']} ({conc.get('error', '')[:120]})")
    lines.append("")
    if isinstance((report.get("projection") or {}).get("status"), str):
        lines.append(f"SPT Table 1 LoRA row: projection {report['projection']['status']}")
    for name, m in (report.get("projection") or {}).items():
        if isinstance(m, dict) and m.get("status") == "ok":
            lines.append(
                f"SPT Table 1 LoRA row, {name}: {m['train_images']:,} training images at {m['train_img_s']:.0f} img/s "
                f"+ {m['test_images']:,} test images at {m['eval_img_s']:.0f} img/s = {m['predicted_s'] / 60:.1f} min"
            )
    if report["skipped"]:
        lines += ["", f"Skipped (budget): {', '.join(report['skipped'])}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    smoke = os.environ.get("GPU_CHECK_SMOKE", "0") not in ("", "0", "false")
    cuda = torch.cuda.is_available()
    mode = "gpu" if cuda and not smoke else "smoke"
    if not cuda and not smoke:
        print("gpu_check: no CUDA device here: running the smoke configuration on the CPU", file=sys.stderr)
    settings = SETTINGS[mode]
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
    out_dir = Path(os.environ.get("GPU_CHECK_OUT", "outputs/gpu_check"))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    start = time.perf_counter()
    report: dict[str, Any] = {
        "mode": mode, "backbone": settings["backbone"][0].split("=", 1)[1], "machine": machine(device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": settings, "budget_s": budget,
        "methods": [], "concurrency": [], "skipped": [],
    }

    def left() -> float:
        return budget - (time.perf_counter() - start)

    def save() -> None:
        report["wall_s"] = time.perf_counter() - start
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=float))
        (out_dir / "gpu_check.md").write_text(markdown(report))

    def attempt(what: str, fn) -> dict:
        print(f"gpu_check: {what} ...", file=sys.stderr, flush=True)
        try:
            return {"status": "ok", **fn()}
        except Exception as err:  # noqa: BLE001 - recorded, the check goes on
            return {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0],
                    "traceback": traceback.format_exc()}

    per_method = 45.0 if mode == "gpu" else 5.0
    for method in METHODS:
        if left() < per_method:
            report["skipped"].append(method)
            continue
        report["methods"].append({"method": method, **attempt(method, lambda m=method: train_once(m, settings))})
        save()
    for n in settings["concurrency"]:
        need = 60.0 if mode == "gpu" else 15.0
        if left() < need:
            report["skipped"].append(f"{n} at once")
            continue
        print(f"gpu_check: {n} LoRA runs at once ...", file=sys.stderr, flush=True)
        report["concurrency"].append(concurrent(settings, n, timeout_s=max(need, left() - 5)))
        save()
    if left() < (120.0 if mode == "gpu" else 5.0):
        report["skipped"].append("compile")
    else:
        backend = settings["compile_backend"]
        report["compile"] = {"backend": backend, **attempt(
            f"lora compile=true ({backend})",
            lambda: train_once("lora", settings, ["compile=true", f"compile_backend={backend}"], evaluate=False))}
    try:
        report["projection"] = projection(report)
    except Exception as err:  # noqa: BLE001 - the measured rows are kept; the failure is reported, not hidden
        report["projection"] = {"status": f"failed: {type(err).__name__}: {err}"}
    save()
    text = (out_dir / "gpu_check.md").read_text()
    print(text)
    print(f"gpu_check: wrote {out_dir}/gpu_check.json and gpu_check.md")
    return 0 if all(r["status"] == "ok" for r in report["methods"]) else 1


if __name__ == "__main__":
    sys.exit(main())
