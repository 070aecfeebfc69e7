"""``python -m peftbench.plots adapters``: TINA's neurons-per-adapter and accuracy-vs-parameters figures."""

from __future__ import annotations

import json

import pytest

from peftbench.plots import cli as plot


def tina_record(tmp_path):
    slots = [f"blocks.{i}.{t}" for i in range(3) for t in ("attn.proj", "mlp.fc2")]
    cycles = []
    for c, n in enumerate([8, 4, 2]):
        neurons = {s: (n if i % 2 == 0 or c == 0 else 0) for i, s in enumerate(slots)}
        cycles.append(
            {
                "cycle": c,
                "end_epoch": c,
                "neurons": neurons,
                "sigma": 16.0 * 2**c,
                "trainable_backbone": 1000 // (c + 1),
                "trainable_head": 10,
                "val_acc": 0.5 + 0.1 * c,
            }
        )
    record = {
        "dataset": "blobs",
        "backbone": "vit_micro",
        "metrics": {"test_acc": 0.7},
        "selection": {"cycles": cycles},
    }
    (tmp_path / "results.json").write_text(json.dumps(record))
    return tmp_path


def test_adapters_writes_both_figures(tmp_path, capsys):
    run_dir = tina_record(tmp_path)
    plot.main(["adapters", str(run_dir), "--out", str(tmp_path / "figs")])
    for name in ("tina_neurons.png", "tina_accuracy.png"):
        path = tmp_path / "figs" / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tina_neurons.png" in capsys.readouterr().out


def test_adapters_on_a_run_without_cycles_is_a_clear_error(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"selection": {}}))
    with pytest.raises(SystemExit, match="no selection.cycles"):
        plot.main(["adapters", str(tmp_path)])
    assert plot.short("blocks.11.attn.proj") == "11.msa" and plot.short("layers.2.blocks.5.mlp.fc2") == "5.mlp"
