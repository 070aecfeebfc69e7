"""Benchmark every method's cost side by side: ``python -m peftbench.bench [bench=cpu|gpu] [key=value ...]``.

For each run of the preset (a backbone and a list of methods) and each dtype, one fresh process per method (so
memory peaks do not mix) measures:

- ``step_ms``: training step time (forward, backward, AdamW step), median of ``timed_steps`` after ``warmup_steps``;
- ``peak_mb``: peak training memory (weights, gradients, optimizer state, activations). CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the model was built. CPU: the bytes of the
  model's parameters and buffers at the first training step, plus the growth of the resident set during training
  (``VmHWM`` reset through ``/proc/self/clear_refs`` at that step, after ``malloc_trim``, minus ``VmRSS`` then), so
  allocator slack left by scoring does not count;
- ``scoring_s`` for methods that score, and with ``score_targets`` the time of one training epoch over the same
  samples (sensitivity) or of one forward pass over them (HiFi);
- inference latency per image of the plain backbone, the method's model unmerged, and merged (reparameterisable
  methods, after :func:`~peftbench.methods.base.unwrap`), timed in interleaved rounds so noise hits all alike;
- trainable parameters and the stored bytes of the task file.

With ``bench.pipeline`` it also runs short trainings through ``python -m peftbench.train``'s own path (Lightning,
data module, checkpoints, task file), one fresh process per variant: training steps/s with the loader and with the
split resident (``data.resident=true``; data fetching included, the first epoch left out), and the bytes the run
writes to disk (``/proc/self/io`` ``wchar`` of the process, plus the checkpoint writes it counts).

Ratios against LoRA and full fine-tuning are the headline (absolute times on shared machines are noisy). The
driver writes ``<out_dir>/bench.json`` and ``bench.md`` and prints the Markdown. A job that fails or times out is
recorded as failed and the bench goes on.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from peftbench.accounting import backbone_size, parameter_report
from peftbench.compose import build_task, compose_config, instantiate_group
from peftbench.data.base import NORMALIZE
from peftbench.errors import PeftbenchError
from peftbench.methods.base import prepare_model, unwrap
from peftbench.records.task_file import save_task
from peftbench.training.weight_decay import parameter_groups

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: modules the fork server imports once, so every job starts with them loaded (not this module itself: under
#: ``python -m peftbench.bench`` multiprocessing runs it again as ``__mp_main__``, and runpy warns if it is loaded);
#: peftbench.train (Lightning) for the pipeline jobs
PRELOAD = ["torch", "timm", "hydra", "peftbench.export", "peftbench.backbones.build", "peftbench.scorers.sensitivity",
           "peftbench.train"]


# --- memory and time ------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of a phase above a baseline, in bytes (CUDA allocations, or the CPU resident set)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = self.at_reset = 0

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _proc_status_kib("VmRSS")
        if rss is None:  # no /proc (macOS): ru_maxrss, which cannot be reset
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return rss * 1024

    def set_baseline(self) -> None:
        """Remember the current memory (call before the model is built)."""
        self.baseline = self.current()

    def reset_peak(self) -> None:
        """Start a new peak from the current memory (freed host memory is returned to the OS first)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.at_reset = self.current()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass
        self.at_reset = self.current()

    def peak_above_baseline(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = _proc_status_kib("VmHWM")
        return (hwm * 1024 if hwm is not None else self.current()) - self.baseline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: torch.dtype | None):
    """Autocast to ``amp`` (bf16 / fp16) on ``device``, or nothing for fp32."""
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _timed(fn, device: torch.device) -> float:
    """Seconds that ``fn()`` takes, device-synchronised."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# --- one job, in its own process ------------------------------------------------------------------------------
def _data(job: dict, cfg: DictConfig, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``n`` normalised training images (n, 3, H, W) and labels (n,) on ``device``, and the class count."""
    size = int(cfg.backbone.image_size)
    if job["data"] == "synthetic":
        num_classes = int(job.get("num_classes") or 10)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, size, size, generator=g)  # already "normalised"
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return images.to(device), labels.to(device), num_classes
    task = build_task(cfg.dataset)
    split = task.load_role("train", size)
    reps = -(-n // len(split))  # cycle the split when n is larger
    images = torch.as_tensor(split.images).repeat(reps, 1, 1, 1)[:n]  # (n, 3, H, W) uint8
    labels = torch.as_tensor(split.labels).repeat(reps)[:n]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in NORMALIZE[cfg.data.normalize])
    return ((images.float() - mean) / std).to(device), labels.to(device), task.num_classes


def _latencies(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, amp, device) -> dict[str, float]:
    """Median ms per image of each model on batch ``x``, timed in interleaved rounds (order rotated each round)."""
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode(), _autocast(device, amp):
        for name in names:  # warm-up
            models[name](x)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_timed(lambda m=models[name]: m(x), device))
    return {k: 1000 * statistics.median(v) / len(x) for k, v in times.items()}


def wrappers(model: nn.Module) -> list[str]:
    """Names of the tuner wrapper modules (those with a ``base_layer``) left in ``model``."""
    return [name for name, m in model.named_modules() if hasattr(m, "base_layer")]


def measure(job: dict) -> dict[str, Any]:
    """Measure one (backbone, method, dtype) job; see the module docstring for the fields."""
    device = torch.device(job["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeftbenchError("bench.device=cuda but no CUDA device is available; use bench=cpu")
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    amp = DTYPES[job["dtype"]]
    method_name = job["method"]
    cfg = compose_config(job["overrides"] + [f"method={method_name}", "logger=none"])
    scorer_name = cfg._choices_.get("scorer")  # the method's own scorer, unless the overrides choose another
    scoring = job["scoring"]
    n_score = int(scoring.get(scorer_name, 0)) if scorer_name else 0
    batch = int(job["batch_size"])
    x_all, y_all, num_classes = _data(job, cfg, device, max(n_score, batch * 2, job["infer_batch"]))

    method = instantiate_group(cfg.method, "method")  # before the baseline: importing a module is not training
    scorer = instantiate_group(cfg.scorer, "scorer") if scorer_name else None
    meter = MemoryMeter(device)
    meter.set_baseline()
    torch.manual_seed(0)
    model = instantiate_group(cfg.backbone, "backbone", num_classes=num_classes).to(device)
    pretrained = backbone_size(model)
    row: dict[str, Any] = {"reparameterisable": bool(getattr(method, "reparameterisable", False))}

    scores, holder = None, {}
    if getattr(method, "needs_scores", False):
        if scorer is None:
            raise PeftbenchError(f"method {method_name!r} needs a scorer: its config brings none (conf/method/)")
        sb = int(scoring["batch_size"])
        batches = [(x_all[i : i + sb], y_all[i : i + sb]) for i in range(0, n_score, sb)]
        row.update(
            scorer=scorer_name,
            scoring_samples=n_score,
            scoring_s=_timed(lambda: holder.update(s=scorer(model, batches)), device),
        )
        scores = holder["s"]
        if job.get("score_targets") and scorer_name == "hifi":  # one forward pass over the same samples
            was = model.training
            model.eval()
            with torch.no_grad(), _autocast(device, amp):
                row["forward_s"] = _timed(lambda: [model(xb) for xb, _ in batches], device)
            model.train(was)
    state = method.select(model, scores)
    scores = holder = None  # as in training: the scores (a float per scored weight) die with the selection
    prepare_model(model, method, state=state)
    model.train()
    row["params"] = parameter_report(model, pretrained)
    optimizer = instantiate_group(cfg.optimizer, "optimizer")(params=parameter_groups(model))
    train_model = torch.compile(model) if job.get("compile") else model

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with _autocast(device, amp):
            loss = F.cross_entropy(train_model(xb), yb)  # (B, classes) logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n_batches = max(1, (len(x_all) - batch) // batch + 1)
    batch_at = lambda i: (x_all[(i % n_batches) * batch :][:batch], y_all[(i % n_batches) * batch :][:batch])  # noqa: E731
    meter.reset_peak()
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    for i in range(int(job["warmup_steps"])):
        step(*batch_at(i))
    times = [_timed(lambda i=i: step(*batch_at(i)), device) for i in range(int(job["timed_steps"]))]
    growth = meter.peak_above_baseline() - (meter.at_reset - meter.baseline)  # during training
    row["before_training_mb"] = (meter.at_reset - meter.baseline) / 2**20  # model, method (+ allocator slack)
    if device.type == "cuda":  # exact: allocated bytes above those before the model was built
        row["peak_mb"] = meter.peak_above_baseline() / 2**20
    else:  # the model's tensors counted exactly + the resident set's growth during training (no scoring slack)
        row["peak_mb"] = (sum(tensors.values()) + growth) / 2**20
    row["step_ms"] = 1000 * statistics.median(times)
    row["train_img_s"] = batch / statistics.median(times)
    if job.get("score_targets") and scorer_name == "sensitivity":  # one training epoch on the scored samples
        sb = int(scoring["batch_size"])
        row["epoch_s"] = _timed(
            lambda: [step(x_all[i : i + sb], y_all[i : i + sb]) for i in range(0, n_score, sb)], device
        )

    with tempfile.TemporaryDirectory() as tmp:
        row["task_bytes"] = save_task(model, state, cfg, Path(tmp) / "task.pt")

    model.eval()
    x = x_all[: int(job["infer_batch"])]
    torch.manual_seed(0)
    plain = instantiate_group(cfg.backbone, "backbone", num_classes=num_classes).to(device).eval()
    rounds = int(job["latency_rounds"])
    if row["reparameterisable"]:
        merged = unwrap(copy.deepcopy(model))
        left = wrappers(merged)
        if left:
            raise PeftbenchError(f"{method_name}: merged model still has wrapper layers {left[:3]}")
        lat = _latencies({"plain": plain, "unmerged": model, "merged": merged}, x, rounds, amp, device)
        row["merged_ms"] = lat["merged"]
        row["merged_vs_plain"] = lat["merged"] / lat["plain"]
    else:
        lat = _latencies({"plain": plain, "unmerged": model}, x, rounds, amp, device)
    row.update(plain_ms=lat["plain"], unmerged_ms=lat["unmerged"], eval_img_s=1000 / lat["unmerged"])
    return row


def _written_bytes() -> int | None:
    """Bytes this process has written through write calls so far (``/proc/self/io`` ``wchar``), if known."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_pipeline(job: dict) -> dict[str, Any]:
    """One short training run of ``job["overrides"]`` through :func:`peftbench.train.execute` in a temporary
    folder: steps/s (:class:`~peftbench.training.callbacks.StepTimer`), bytes written, checkpoint writes."""
    from peftbench.train import execute  # Lightning: imported in this job's process only

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    with tempfile.TemporaryDirectory() as tmp:
        timer = Path(tmp) / "steps.json"
        cfg = compose_config([
            *job["overrides"], f"paths.output_dir={tmp}/outputs",
            f"+callbacks.bench_timer={{_target_: peftbench.training.callbacks.StepTimer, path: '{timer}', "
            f"skip_epochs: {int(job['skip_epochs'])}}}",
        ])
        before = _written_bytes()
        record = execute(cfg, Path(tmp) / "run")
        after = _written_bytes()
        steps = json.loads(timer.read_text())
    storage = record["storage"]
    return {
        "steps_per_s": steps["steps_per_s"],
        "timed_steps": steps["steps"],
        "epochs": record["epochs"],
        "data_resident": record["data_resident"],
        "checkpoint_writes": storage["checkpoint_writes"],
        "checkpoint_bytes_written": storage["checkpoint_bytes_written"],
        "task_file_bytes": storage["task_file_bytes"],
        "bytes_written": None if before is None or after is None else after - before,
    }


def _worker(job: dict, out_path: str) -> None:
    """Process entry point: measure ``job`` and write its row (``ok`` or ``failed``) as JSON to ``out_path``."""
    try:
        row = {**(measure_pipeline(job) if job.get("kind") == "pipeline" else measure(job)), "status": "ok"}
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure is recorded
        error = f"{type(err).__name__}: {err}".splitlines()[0]
        row = {"status": "failed", "error": error, "traceback": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(row, default=float))


# --- the driver -----------------------------------------------------------------------------------------------
def jobs(cfg: DictConfig) -> list[dict]:
    """Every (run, dtype, method) job of the preset, in order."""
    bench = cfg.bench
    out = []
    for run in bench.runs:
        for dtype in bench.dtypes:
            if dtype not in DTYPES:
                raise PeftbenchError(f"bench.dtypes: {dtype!r} is unknown; choose from {sorted(DTYPES)}")
            for method in cfg.get("methods") or run.methods:
                extra = list(cfg.method_overrides.get(method) or [])
                out.append(
                    {
                        "backbone": run.name,
                        "method": method,
                        "dtype": dtype,
                        "device": bench.device,
                        "overrides": list(run.overrides) + extra,
                        "data": run.data,
                        "num_classes": run.get("num_classes"),
                        "batch_size": run.batch_size,
                        "infer_batch": run.infer_batch,
                        "scoring": OmegaConf.to_container(run.scoring),
                        "score_targets": bool(run.get("score_targets")),
                        "warmup_steps": run.get("warmup_steps", bench.warmup_steps),
                        "timed_steps": run.get("timed_steps", bench.timed_steps),
                        "latency_rounds": run.get("latency_rounds", bench.latency_rounds),
                        "threads": bench.get("threads"),
                        "compile": bool(bench.get("compile")),
                    }
                )
    return out


def pipeline_jobs(cfg: DictConfig) -> list[dict]:
    """One job per variant of ``bench.pipeline`` (none without it)."""
    spec = cfg.bench.get("pipeline")
    if not spec:
        return []
    return [
        {"kind": "pipeline", "variant": name, "common": list(spec.overrides), "overrides": [*spec.overrides, *extra],
         "threads": cfg.bench.get("threads"), "skip_epochs": int(spec.get("skip_epochs", 1))}
        for name, extra in spec.variants.items()
    ]


def run_job(job: dict, context: mp.context.BaseContext, timeout_s: float) -> dict:
    """Run ``job`` in a child process; return its row (``failed`` with the reason on error or timeout)."""
    fd, out_path = tempfile.mkstemp(suffix=".json", prefix="peftbench-bench-")
    os.close(fd)
    start = time.perf_counter()
    proc = context.Process(target=_worker, args=(job, out_path), daemon=True)
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()  # our own child, by handle
        proc.join()
        row = {"status": "failed", "error": f"timed out after {timeout_s:.0f}s (bench.timeout_s)"}
    else:
        text = Path(out_path).read_text()
        row = json.loads(text) if text else {"status": "failed", "error": f"process exited with {proc.exitcode}"}
    Path(out_path).unlink(missing_ok=True)
    keys = ("variant", "common", "overrides") if job.get("kind") == "pipeline" else (
        "backbone", "method", "dtype", "batch_size", "infer_batch")
    return {**{k: job[k] for k in keys}, **row, "job_s": time.perf_counter() - start}


def add_ratios(rows: list[dict], reference: dict[str, str]) -> None:
    """Per (backbone, dtype) group: step time and peak memory of each row over the LoRA and full rows (in place)."""
    for row in rows:
        for ref_name, ref_method in reference.items():
            ref = next(
                (
                    r
                    for r in rows
                    if r["method"] == ref_method
                    and r["backbone"] == row["backbone"]
                    and r["dtype"] == row["dtype"]
                    and r["status"] == "ok"
                ),
                None,
            )
            for key in ("step_ms", "peak_mb"):
                ok = ref is not None and row["status"] == "ok" and ref[key] > 0
                row[f"{key.split('_')[0]}_vs_{ref_name}"] = row[key] / ref[key] if ok else None


def check_targets(rows: list[dict], targets: DictConfig) -> list[dict]:
    """The issue's targets against the measured rows: one entry per (target, row) with figure, limit and verdict."""
    out = []

    def add(row: dict, what: str, value: float | None, limit: float) -> None:
        if value is not None:
            out.append(
                {
                    "target": what,
                    "backbone": row["backbone"],
                    "dtype": row["dtype"],
                    "method": row["method"],
                    "value": value,
                    "limit": limit,
                    "met": value <= limit,
                }
            )

    for row in (r for r in rows if r["status"] == "ok"):
        if row["reparameterisable"]:
            add(row, "merged latency / plain backbone", row["merged_vs_plain"], targets.merged_latency_vs_plain)
        if row["method"] in targets.memory_vs_lora:
            add(row, "peak training memory / LoRA", row["peak_vs_lora"], targets.memory_vs_lora[row["method"]])
        if "epoch_s" in row:
            add(
                row,
                f"sensitivity scoring ({row['scoring_samples']}) / one training epoch",
                row["scoring_s"] / row["epoch_s"],
                targets.sensitivity_vs_epoch,
            )
        if "forward_s" in row:
            add(
                row,
                f"HiFi scoring ({row['scoring_samples']}) / one forward pass",
                row["scoring_s"] / row["forward_s"],
                targets.hifi_vs_forward,
            )
        if row["method"] != "full":
            add(row, "training step / full fine-tuning", row["step_vs_full"], targets.step_vs_full)
    return out


def moonshot(rows: list[dict], spec: DictConfig | None) -> dict | None:
    """The moonshot arithmetic: predicted time of SPT Table 1's LoRA row from LoRA's measured throughputs.

    train images = tasks x epochs x train_images; time = train / train_img_s + sum(test) / eval_img_s; the needed
    training throughput is train images / (budget - evaluation time), at the measured evaluation throughput.
    """
    if not spec:
        return None
    train = int(spec.tasks) * int(spec.epochs) * int(spec.train_images)
    test = sum(int(v) for v in spec.test_images.values())
    out: dict[str, Any] = {"train_images": train, "test_images": test, "budget_s": float(spec.budget_s)}
    row = next(
        (r for r in rows if r["method"] == spec.method and r["dtype"] == spec.dtype and r["status"] == "ok"), None
    )
    if row is None:
        return {**out, "status": f"no successful {spec.method} {spec.dtype} row"}
    eval_s = test / row["eval_img_s"]
    out.update(
        status="ok",
        train_img_s=row["train_img_s"],
        eval_img_s=row["eval_img_s"],
        eval_s=eval_s,
        predicted_s=train / row["train_img_s"] + eval_s,
        needed_train_img_s=train / (out["budget_s"] - eval_s) if eval_s < out["budget_s"] else float("inf"),
    )
    out["met"] = out["predicted_s"] <= out["budget_s"]
    return out


def machine() -> str:
    """A one-line description of this machine (CPU model and cores, GPU when one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name(0)}"
    return desc


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _header(columns: list[str], left: int = 1) -> list[str]:
    """A Markdown table's header and alignment rows: the first ``left`` columns left-aligned, the rest right."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]


def _failed(name: str, error: str, columns: int) -> str:
    """A failed row: its name, the error's start, empty cells to the table's width."""
    return f"| {name} | failed: {error[:90]} |" + " |" * (columns - 2)


def markdown(report: dict) -> str:
    """The report as Markdown: one table per (backbone, dtype), then the targets and the moonshot."""
    lines = [f"`{report['command']}` on {report['machine']}, {report['date']} ({report['wall_s']:.0f} s in all)", ""]
    groups = dict.fromkeys((r["backbone"], r["dtype"]) for r in report["rows"])
    for backbone, dtype in groups:
        rows = [r for r in report["rows"] if (r["backbone"], r["dtype"]) == (backbone, dtype)]
        first = rows[0]
        lines += [
            f"**{backbone}, {dtype}**, training batch {first['batch_size']}, inference batch {first['infer_batch']}",
            "",
            *_header(["method", "trainable", "task file KB", "step ms", "step x LoRA", "step x full", "peak MB",
                      "mem x LoRA", "mem x full", "scoring s", "infer ms/img plain", "unmerged", "merged",
                      "merged / plain"]),
        ]
        for r in rows:
            if r["status"] != "ok":
                lines.append(_failed(r["method"], r["error"], 14))
                continue
            p = r["params"]
            lines.append(
                f"| {r['method']} | {p['trainable_backbone'] + p['trainable_head']:,} | {r['task_bytes'] / 1024:,.1f} "
                f"| {r['step_ms']:.1f} | {_fmt(r['step_vs_lora'])} | {_fmt(r['step_vs_full'])} | {r['peak_mb']:.1f} "
                f"| {_fmt(r['peak_vs_lora'])} | {_fmt(r['peak_vs_full'])} | {_fmt(r.get('scoring_s'))} "
                f"| {r['plain_ms']:.3f} | {r['unmerged_ms']:.3f} | {_fmt(r.get('merged_ms'), '.3f')} "
                f"| {_fmt(r.get('merged_vs_plain'), '.3f')} |"
            )
        lines.append("")
    if report["targets"]:
        lines += [
            "Targets:",
            "",
            "| target | backbone, dtype | method | measured | limit | met |",
            "|---|---|---|---:|---:|---|",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {t['target']} | {t['backbone']}, {t['dtype']} | {t['method']} | {t['value']:.3f} "
                f"| {t['limit']:.2f} | {'yes' if t['met'] else '**no**'} |"
            )
        lines.append("")
    m = report.get("moonshot")
    if m:
        if m["status"] == "ok":
            lines.append(
                f"Moonshot (LoRA row of SPT Table 1 under {m['budget_s'] / 60:.0f} min): {m['train_images']:,} "
                f"training + {m['test_images']:,} test images; measured {m['train_img_s']:.0f} img/s training, "
                f"{m['eval_img_s']:.0f} img/s evaluation -> predicted {m['predicted_s'] / 60:.1f} min; needs "
                f"{m['needed_train_img_s']:.0f} img/s training at this evaluation speed "
                f"({'met' if m['met'] else 'not met'})."
            )
        else:
            lines.append(f"Moonshot: {m['status']}.")
        lines.append("")
    pipeline = report.get("pipeline") or []
    if pipeline:
        loader = next((r for r in pipeline if r["status"] == "ok" and not r["data_resident"]), None)
        lines += [
            f"**Training pipeline** (`python -m peftbench.train`'s path: `{' '.join(pipeline[0]['common'])}`; "
            "steps/s with data fetching, first epoch left out; bytes written by the run's process)",
            "",
            *_header(["variant", "resident splits", "steps/s", "x loader", "checkpoint writes",
                      "checkpoint MB written", "task file KB", "bytes written per run MB"], left=2),
        ]
        for r in pipeline:
            if r["status"] != "ok":
                lines.append(_failed(r["variant"], r["error"], 8))
                continue
            ratio = r["steps_per_s"] / loader["steps_per_s"] if loader and r["steps_per_s"] else None
            written = r["bytes_written"]
            lines.append(
                f"| {r['variant']} | {', '.join(r['data_resident']) or '-'} | {_fmt(r['steps_per_s'])} "
                f"| {_fmt(ratio)} | {r['checkpoint_writes']} | {r['checkpoint_bytes_written'] / 2**20:.2f} "
                f"| {r['task_file_bytes'] / 1024:.1f} | {'-' if written is None else f'{written / 2**20:.2f}'} |"
            )
        lines.append("")
    lines.append(f"Peak memory: {report['memory_measure']}")
    return "\n".join(lines) + "\n"


def run_bench(cfg: DictConfig, command: str = "python -m peftbench.bench") -> dict:
    """Run every job of ``cfg.bench``, one process each; write bench.json and bench.md; return the report."""
    start = time.perf_counter()
    bench = cfg.bench
    method = bench.get("start_method", "forkserver")
    if method == "forkserver":
        mp.set_forkserver_preload(PRELOAD)
    context = mp.get_context(method)

    def run_all(todo: list[dict], label: Callable[[dict], str]) -> list[dict]:
        done = []
        for job in todo:
            print(f"peftbench.bench: {label(job)} ...", file=sys.stderr, flush=True)
            row = run_job(job, context, float(bench.timeout_s))
            if row["status"] != "ok":
                print(f"peftbench.bench:   failed: {row['error']}", file=sys.stderr, flush=True)
            done.append(row)
        return done

    rows = run_all(jobs(cfg), lambda job: f"{job['backbone']} {job['dtype']} {job['method']}")
    pipeline = run_all(pipeline_jobs(cfg), lambda job: f"pipeline {job['variant']}")
    add_ratios(rows, dict(cfg.reference))
    device = torch.device(bench.device)
    report = {
        "command": command,
        "machine": machine() + (f", {bench.threads} thread(s) per job" if bench.get("threads") else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": OmegaConf.to_container(bench, resolve=True),
        "memory_measure": (
            "CUDA max_memory_allocated during training minus memory_allocated before the model was built"
            if device.type == "cuda"
            else "bytes of the model's parameters and buffers at the first training step + the growth of the "
            "resident set during training (VmHWM, reset through /proc/self/clear_refs at that step, minus VmRSS "
            "then): weights + gradients + optimizer state + activations + allocator slack made while training"
        ),
        "rows": rows,
        "targets": check_targets(rows, cfg.targets),
        "moonshot": moonshot(rows, bench.get("moonshot")),
        "pipeline": pipeline,
    }
    report["wall_s"] = time.perf_counter() - start
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "bench.md").write_text(markdown(report))
    report["out_dir"] = str(out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: Hydra overrides of ``conf/bench.yaml``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_config(argv, config_name="bench")
        with open_dict(cfg):
            cfg.out_dir = str(Path(cfg.out_dir))
        report = run_bench(cfg, command=" ".join(["python -m peftbench.bench", *argv]))
    except PeftbenchError as err:
        print(f"peftbench: error: {err}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"written: {report['out_dir']}/bench.json, bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
