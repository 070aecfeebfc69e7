"""``python -m peftbench.plots ne|params|compression``: figures over the results index, on synthetic records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftbench.plots import cli as plot
from peftbench.plots import sweeps
from peftbench.plots.common import index_records

PNG = b"\x89PNG\r\n\x1a\n"


def record(method: str, dataset: str, overrides: list[str], acc: float, params: int = 1000, **extra) -> dict:
    """One index line as :func:`peftbench.train.execute` writes it (the fields the figures read)."""
    run_dir = extra.pop("run_dir", f"/runs/{method}/{dataset}/{'_'.join(overrides)}/{acc}")
    return {
        "run_dir": run_dir,
        "method": method,
        "dataset": dataset,
        "backbone": extra.pop("backbone", "vit_micro"),
        "overrides": [f"method={method}", f"dataset={dataset}", *overrides],
        "status": extra.pop("status", "ok"),
        "metrics": {"test_acc": acc, "val_acc": acc},
        "params": {"trainable_backbone": params, "trainable_head": 10, "tuned_percent": params / 1e4},
        "selection": extra.pop("selection", {}),
        **extra,
    }


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken line\n")
    return path


def test_index_records_keep_the_latest_ok_record_per_run(tmp_path):
    index = write(
        tmp_path / "index.jsonl",
        [
            record("lora", "a", [], 0.5, key="k1"),
            record("lora", "a", [], 0.6, key="k1"),  # re-run of k1: the latest wins
            record("lora", "a", [], 0.9, key="k1", status="failed"),  # failures never count
            record("lora", "b", [], 0.7, run_dir="/r/1"),
            record("lora", "b", [], 0.8, run_dir="/r/1"),  # no key: the run dir names the run
            record("lora", "c", [], 0.3, group="table1"),
            record("lora", "d", ["group=table1"], 0.4),  # no group field yet: its group= override counts
        ],
    )
    kept = index_records(index)
    assert [(r["dataset"], r["metrics"]["test_acc"]) for r in kept] == [("a", 0.6), ("b", 0.8), ("c", 0.3), ("d", 0.4)]
    assert [r["dataset"] for r in index_records(index, group="table1")] == ["c", "d"]


def test_ne_curves_average_seeds_per_task(tmp_path, capsys):
    records = [
        record("heart_lora", "a", ["method.ne=1", "seed=0"], 0.8),
        record("heart_lora", "a", ["method.ne=1", "seed=1"], 0.6),
        record("heart_lora", "a", ["method.ne=5"], 0.5),
        record("heart_lora", "b", [], 0.4, selection={"ne": {"blocks.0.attn.qkv": 3, "blocks.1.attn.qkv": 3}}),
        record("lora", "a", ["method.ne=7"], 0.99),  # not Heart-LoRA
    ]
    curves = sweeps.ne_curves(records)
    assert curves == {"a": [(1, pytest.approx(0.7), 2), (5, 0.5, 1)], "b": [(3, 0.4, 1)]}
    assert list(sweeps.ne_curves(records, datasets=["b"])) == ["b"]
    index = write(tmp_path / "index.jsonl", records)
    plot.main(["ne", str(index), "--out", str(tmp_path / "figs")])
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "figs" / "heart_ne.png" and path.read_bytes()[:8] == PNG


def test_params_points_average_over_tasks_per_variant(tmp_path, capsys):
    records = [
        record("lora", "a", [], 0.8, 100),
        record("lora", "b", [], 0.6, 300),
        record("lora", "a", ["method.rank=16"], 0.9, 400),
        record("linear", "a", [], 0.5, 0),
        record("linear", "b", ["seed=1"], 0.3, 0),
        record("linear", "b", ["seed=2"], 0.1, 0),
    ]
    points = {p.label: p for p in sweeps.params_points(records)}
    assert set(points) == {"lora", "lora (rank=16)", "linear"}
    assert (points["lora"].params, points["lora"].acc, points["lora"].tasks) == (200, pytest.approx(0.7), 2)
    assert points["linear"].acc == pytest.approx((0.5 + 0.2) / 2) and points["linear"].runs == 3
    assert points["lora (rank=16)"].tasks == 1
    percent = {p.label: p.params for p in sweeps.params_points(records, x="tuned_percent")}
    assert percent["lora"] == pytest.approx(0.02)
    index = write(tmp_path / "index.jsonl", records)
    plot.main(["params", str(index)])
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "params.png"
    assert (tmp_path / "params.png").read_bytes()[:8] == PNG


def test_compression_sigma_of_tina_and_adapter_runs(tmp_path, capsys):
    assert sweeps.backbone_width("vit_micro") == 192 and sweeps.backbone_width("vit_b16_in21k") == 768
    tina = record("tina", "a", [], 0.7, 50, selection={"sigma_final": 384.0, "cycles": [{"sigma": 384.0}]})
    sized = record("adapter", "a", ["method.sigma=16"], 0.75, 500)
    hidden = record("adapter", "a", ["method.n=4"], 0.74, 300)  # vit_micro width 192 / 4
    default = record("adapter", "a", [], 0.76, 600)  # conf/method/adapter.yaml n = 8 -> 192 / 8
    assert [sweeps.sigma_of(r) for r in (tina, sized, hidden, default)] == [384.0, 16.0, 48.0, 24.0]
    points = sweeps.compression_points([tina, sized, hidden, default, record("lora", "a", [], 0.9)])
    assert points == {"a": {"adapter": [(16.0, 0.75, 500, 1), (24.0, 0.76, 600, 1), (48.0, 0.74, 300, 1)],
                            "tina": [(384.0, 0.7, 50, 1)]}}  # fmt: skip
    index = write(tmp_path / "index.jsonl", [tina, sized, hidden, default])
    plot.main(["compression", str(index), "--dataset", "a", "--out", str(tmp_path)])
    assert (tmp_path / "compression.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.strip().endswith("compression.png")


@pytest.mark.parametrize("command", ["ne", "params", "compression"])
def test_an_index_without_matching_runs_is_a_clear_error(tmp_path, command):
    index = write(tmp_path / "index.jsonl", [record("heart_lora", "a", ["method.ne=1"], 0.5, status="failed")])
    with pytest.raises(SystemExit, match=rf"^peftbench.plots: {index}: no ok") as err:
        plot.main([command, str(index), "--group", "g"])
    assert "group 'g'" in str(err.value)
    with pytest.raises(SystemExit, match="no such results index"):
        plot.main([command, str(tmp_path / "nothing.jsonl")])


def test_params_never_averages_runs_that_differ_in_more_than_seed_and_task(tmp_path, capsys):
    """The reported case: a 1-epoch and a 2-epoch LoRA run were one point. Now: refused, or warned with --mixed."""
    index = write(tmp_path / "index.jsonl", [
        record("lora", "a", ["trainer.max_epochs=1"], 0.5, key="k1", key_variant="v1", key_seedless="s1"),
        record("lora", "a", ["trainer.max_epochs=2"], 0.7, key="k2", key_variant="v2", key_seedless="s2"),
    ])
    with pytest.raises(SystemExit, match=r"the runs of \('lora', ''\) differ in trainer.max_epochs=1, "
                                         r"trainer.max_epochs=2: they are not one point"):
        sweeps.params(index, tmp_path)
    (path,) = sweeps.params(index, tmp_path, mixed="warn")
    assert path.read_bytes().startswith(PNG)
    assert "warning" in capsys.readouterr().err
    # the same with records written before the keys existed: their overrides tell them apart
    legacy = write(tmp_path / "legacy.jsonl", [
        record("lora", "a", ["trainer.max_epochs=1"], 0.5, key="k1"),
        record("lora", "a", ["trainer.max_epochs=2"], 0.7, key="k2"),
    ])
    with pytest.raises(SystemExit, match="differ in trainer.max_epochs"):
        sweeps.params(legacy, tmp_path)


def test_params_averages_seeds_and_tasks_of_one_variant_and_names_a_task_subset(tmp_path):
    runs = [
        record("lora", "a", ["seed=0"], 0.5, key="k1", key_variant="v", key_seedless="sa"),
        record("lora", "a", ["seed=1"], 0.7, key="k2", key_variant="v", key_seedless="sa"),
        record("lora", "b", ["seed=0"], 0.9, key="k3", key_variant="v", key_seedless="sb"),
        record("full", "a", [], 0.8, params=9000, key="k4", key_variant="f", key_seedless="fa"),
    ]
    points = {p.method: p for p in sweeps.params_points(runs)}
    assert points["lora"].acc == pytest.approx((0.6 + 0.9) / 2) and points["lora"].runs == 3
    assert points["full"].task_names == ["a"] and points["full"].tasks == 1  # drawn as "[only a]"
