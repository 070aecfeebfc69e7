"""``python -m peftbench.plots sensitivity|cdra|heads``: figures from real score files and run dirs.

Score files come from :func:`peftbench.score.score` in-process on the tiny random-weight micro ViT (tests/helpers.py
TINY) with 16 scoring images; the numbers each figure plots are checked against the saved selection, counted
independently here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftbench.plots import cdra as cdra_plot
from peftbench.plots import cli as plot
from peftbench.plots import heads as heads_plot
from peftbench.plots import sensitivity as sens_plot
from peftbench.plots.common import TYPES, split_matrix_key
from tests.helpers import TINY

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["scoring.n_samples=8", "scoring.batch_size=8", "++backbone.depth=3"]  # 3 blocks: fast


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, Path]:
    """Three score files: SPT-LoRA w/o structured (every sensitive entry is in the state), CDRA-SPT, HiFi."""
    from peftbench import score

    folder = tmp_path_factory.mktemp("scores")
    runs = {
        "spt": ["method=spt_lora", "method.budget=2K", "method.structured=false"],
        "cdra": ["method=cdra_spt", "method.budget=20K"],
        "hifi": ["method=hifi"],
    }
    files = {}
    for name, extra in runs.items():
        files[name] = folder / f"{name}.pt"
        torch.save(score.score(TINY + extra + FAST), files[name])
    return files


def counts_from_sparse(state: dict) -> dict[tuple[str, str], int]:
    """Sensitive entries per (block, type), counted from the state's flat sparse indices of the holding weights."""
    counts: dict[tuple[str, str], int] = {}
    for path, idx in state["sparse"].items():
        block, local = path.split(".attn.") if ".attn." in path else path.split(".mlp.")
        if local == "qkv":
            width = 192  # vit_micro: qkv weight (3 * 192, 192)
            parts = (idx // width) // width  # holding row // C -> 0 q, 1 k, 2 v
            for p, kind in enumerate("qkv"):
                counts[(block, kind)] = int((parts == p).sum())
        else:
            counts[(block, {"proj": "o"}.get(local, local))] = int(idx.numel())
    return counts


def test_sensitivity_share_equals_the_selection(scored, tmp_path, capsys):
    record = torch.load(scored["spt"], weights_only=True)
    task = sens_plot.load(scored["spt"])
    assert task.label == "blobs" and task.blocks == [f"blocks.{i}" for i in range(3)]
    expected = counts_from_sparse(record["state"])  # structured=false: every sensitive matrix entry is sparse
    sizes = {split_matrix_key(k): v.numel() for k, v in record["scores"].items() if split_matrix_key(k)}
    for b, block in enumerate(task.blocks):
        for t, kind in enumerate(TYPES):
            assert task.counts[b, t] == expected.get((block, kind), 0)
            assert task.sizes[b, t] == sizes[(block, kind)]
            assert task.per_matrix()[b, t] == pytest.approx(expected.get((block, kind), 0) / sizes[(block, kind)])
    n_matrix = sum(expected.values())
    vector_entries = record["summary"]["selected"] - n_matrix
    assert task.counts.sum() == n_matrix and vector_entries >= 0 and task.selected == record["state"]["tau"]
    by_type = [
        sum(expected.get((b, k), 0) for b in task.blocks) / sum(sizes[(b, k)] for b in task.blocks) for k in TYPES
    ]
    assert np.allclose(task.per_type(), by_type)
    assert task.depth_distribution().sum() == pytest.approx(1.0)

    plot.main(["sensitivity", str(scored["spt"]), str(scored["cdra"]), "--out", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["sensitivity.png", "sensitivity_matrices.png"]
    assert all(is_png(Path(p)) for p in printed)


def test_sensitivity_refuses_a_selection_it_cannot_reproduce(scored, tmp_path):
    record = torch.load(scored["spt"], weights_only=True)
    path = tmp_path / "tampered.pt"
    key = next(iter(record["state"]["sparse"]))
    record["state"]["sparse"][key] = record["state"]["sparse"][key][1:]  # one sensitive entry lost
    torch.save(record, path)
    with pytest.raises(SystemExit, match=r"tampered.pt: the sensitive entries recomputed .* differ"):
        sens_plot.load(path)
    # a matrix moved to "structured" leaves the sparse entries: still consistent
    record = torch.load(scored["spt"], weights_only=True)
    holding = "blocks.0.mlp.fc2"
    record["state"]["sparse"].pop(holding)
    record["state"]["structured"] = [f"{holding}.weight"]
    torch.save(record, path)
    assert sens_plot.load(path).counts.sum() > 0


def test_cdra_rows_and_columns_equal_the_compact_blocks(scored, tmp_path, capsys):
    record = torch.load(scored["cdra"], weights_only=True)
    blocks = {s["key"]: s for specs in record["state"]["blocks"].values() for s in specs}
    assert blocks, "the fixture should give some compact LoRA"
    label, found = cdra_plot.load(scored["cdra"])
    assert label == "blobs"
    by_key = {c.key: c for c in found}
    for key, spec in blocks.items():
        assert (by_key[key].rows, by_key[key].cols, by_key[key].rank) == (
            len(spec["rows"]),
            len(spec["cols"]),
            int(spec["rank"]),
        )
    s = record["summary"]
    assert sum(c.rank > 0 for c in found) == s["compact_matrices"]
    assert sum(c.rank == 0 for c in found) == s["fallback_matrices"]  # rank 0 -> sparse, shown hollow
    assert sum(c.rank * (c.rows + c.cols) for c in found) == s["compact_params"]
    kinds = [(int(c.key.split(".")[1]), TYPES.index(split_matrix_key(c.key)[1])) for c in found]
    assert kinds == sorted(kinds)  # model order: block, then q k v o fc1 fc2

    # a run dir: only method_state.pt's compact blocks
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "cdra_spt", "dataset": "blobs", "selection": s}))
    torch.save(record["state"], run / "method_state.pt")
    _, from_run = cdra_plot.load(run)
    assert {c.key: (c.rows, c.cols, c.rank) for c in from_run} == {
        k: (len(v["rows"]), len(v["cols"]), int(v["rank"])) for k, v in blocks.items()
    }
    plot.main(["cdra", str(scored["cdra"]), str(run)])
    assert [Path(p) for p in capsys.readouterr().out.split()] == [scored["cdra"].parent / "cdra_compact.png"]
    assert is_png(scored["cdra"].parent / "cdra_compact.png")


def test_hifi_heads_map_equals_scores_and_selection(scored, tmp_path):
    record = torch.load(scored["hifi"], weights_only=True)
    maps = heads_plot.load(scored["hifi"])
    assert maps.method == "hifi" and maps.layers == [f"blocks.{i}" for i in range(3)]
    rank = maps.maps["PageRank p*_h"]
    for i, layer in enumerate(maps.layers):
        assert np.allclose(rank[i], record["scores"][f"{layer}.attn:pagerank"].numpy())
        assert np.allclose(maps.maps["information richness I_h"][i], record["scores"][f"{layer}.attn:info"].numpy())
        assert sorted(np.nonzero(maps.marked[i])[0].tolist()) == record["state"]["heads"][layer]
        assert set(np.argsort(-rank[i], kind="stable")[:3].tolist()) == set(record["state"]["heads"][layer])
    assert is_png(plot.heads(scored["hifi"], tmp_path)[0])

    run = tmp_path / "hifi_run"  # a run dir: chosen heads only
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "hifi", "selection": {"heads": record["state"]["heads"]}}))
    from_run = heads_plot.load(run)
    assert (from_run.marked == maps.marked[:, : from_run.marked.shape[1]]).all() and not from_run.maps
    assert is_png(plot.heads(run)[0]) and (run / "hifi_heads.png").exists()

    # should HiFi's describe() save the head count and the PageRank, a run dir shows them too
    pagerank = {layer: record["scores"][f"{layer}.attn:pagerank"].tolist() for layer in maps.layers}
    selection = {"heads": record["state"]["heads"], "num_heads": 12, "pagerank": pagerank}
    (run / "results.json").write_text(json.dumps({"method": "hifi", "selection": selection}))
    richer = heads_plot.load(run)
    assert (richer.marked == maps.marked).all() and np.allclose(richer.maps["PageRank p*_h"], rank)


def test_heart_lora_heads_from_a_run_dir(tmp_path):
    layers = [f"blocks.{i}.attn.qkv" for i in range(3)]
    scores = {name: [float((i + 1) * (h % 5 + 1)) for h in range(6)] for i, name in enumerate(layers)}
    selection = {
        "score": "taylor",
        "granularity": "global",
        "ne": {name: 2 for name in layers},
        "deactivated": {name: [0, 5] for name in layers},
        "scores": scores,
    }
    (tmp_path / "results.json").write_text(
        json.dumps({"method": "heart_lora", "dataset": "blobs", "selection": selection})
    )
    maps = heads_plot.load(tmp_path)
    assert maps.method == "heart_lora" and maps.marked.sum() == 6
    assert maps.marked[:, [0, 5]].all() and not maps.marked[:, 1:5].any()
    assert np.allclose(maps.maps["responsiveness"], [scores[n] for n in layers])
    assert np.allclose(maps.extra["accumulated"], np.sum([scores[n] for n in layers], axis=0))
    out = plot.heads(tmp_path, tmp_path / "figs")
    assert [p.name for p in out] == ["heart_heads.png"] and is_png(out[0])


@pytest.mark.parametrize(
    ("command", "make", "message"),
    [
        ("sensitivity", lambda d: d / "missing.pt", "missing.pt: no such file"),
        ("sensitivity", lambda d: (d / "junk.pt").write_text("hello") and d / "junk.pt", "cannot read it"),
        ("cdra", lambda d: d, "results.json: does not exist"),
        ("heads", lambda d: d / "missing.pt", "no such file"),
    ],
)
def test_bad_inputs_are_one_clear_line(tmp_path, command, make, message):
    with pytest.raises(SystemExit, match=message) as err:
        plot.main([command, str(make(tmp_path))])
    assert str(err.value).startswith("peftbench.plots: ") and "\n" not in str(err.value)


def test_wrong_kind_of_score_file(scored, tmp_path):
    with pytest.raises(SystemExit, match="has no CDRA-SPT selection"):
        plot.main(["cdra", str(scored["spt"])])
    with pytest.raises(SystemExit, match="pagerank"):
        plot.main(["heads", str(scored["spt"])])
    no_state = tmp_path / "lora.pt"
    torch.save({"scores": {"blocks.0.mlp.fc1.weight": torch.ones(2, 2)}, "state": None, "overrides": []}, no_state)
    with pytest.raises(SystemExit, match="lora.pt: has no SPT selection"):
        plot.main(["sensitivity", str(no_state)])
    (tmp_path / "results.json").write_text(json.dumps({"method": "lora", "selection": {}}))
    with pytest.raises(SystemExit, match="is a lora run"):
        plot.main(["heads", str(tmp_path)])


def test_command_line_exit_status_and_message(tmp_path):
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "peftbench.plots", "ne", str(tmp_path / "index.jsonl")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip() == f"peftbench.plots: {tmp_path / 'index.jsonl'}: no such results index; " + (
        "runs append to <paths.output_dir>/index.jsonl"
    )
