"""``python -m peftbench.tables``: specs load and compose, selection and means, renderings, and one real table end to
end (regenerated from nothing, re-run without re-running anything, resumed after losing one run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftbench.compose import compose_config, config_key
from peftbench.records.results import read_index
from peftbench.tables import cli
from peftbench.tables.launch import sweeps
from peftbench.tables.plan import Composer, Outcome, Run, common_overrides, format_value, grid_of, resolve_final, select
from peftbench.tables.render import build_cells, caption, cell_text, csv_text, latex, markdown, write_outputs
from peftbench.tables.spec import (
    ACCOUNTING_DATASET,
    SCALES,
    SpecError,
    layout,
    list_specs,
    load_spec,
    task_overrides,
)
from tests.test_cli import cli as run_cli

ROOT = Path(__file__).resolve().parent.parent
TINY_SPEC = ROOT / "tests" / "conf" / "table" / "tiny.yaml"
SPECS = list_specs()


# --- every spec loads, validates and composes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def composer() -> Composer:
    return Composer()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_loads_and_its_rows_compose_at_both_scales(path, composer):
    spec = load_spec(path)  # structure, column keys, published keys (valid columns of the benchmark)
    assert spec.rows and spec.title and spec.source
    for scale in SCALES:
        lay = layout(spec, scale)
        assert lay.shown, f"{path.name}: no column at scale={scale}"
        for row in spec.rows:
            if not row.runnable:
                continue
            tasks = list(lay.tasks)[:1]
            if scale == "paper" and spec.benchmark in ("domainnet", "multitask"):
                # not runnable at paper scale (no such datasets); the row's own overrides must still compose
                tasks = []
            column = task_overrides(spec.benchmark, tasks[0], scale) if tasks else [ACCOUNTING_DATASET[scale]]
            values = [f"{k}={format_value(v)}" for k, v in grid_of(row, scale)[0].items()]
            if scale != "paper":  # CPU scales run the embedded backbone, never one that must be downloaded
                backbones = [o for o in common_overrides(spec, row, scale, []) if o.startswith("backbone=")]
                assert backbones[-1:] == ["backbone=vit_micro"], f"{path.name}: {row.name!r} at {scale}: {backbones}"
            try:
                composer.validate([*common_overrides(spec, row, scale, []), *column, *values])
            except Exception as err:  # noqa: BLE001
                pytest.fail(f"{path.name}: row {row.name!r} does not compose at scale={scale}: {err}")


def test_spt_tables_cover_the_papers_rows():
    spt1 = load_spec("spt_1")
    assert len(spt1.rows) == 17 and sum(r.runnable for r in spt1.rows) == 16  # NOAH is published-only
    lora8 = next(r for r in spt1.rows if r.name == "LORA-8")
    assert lora8.published["retinopathy"] == 73.6 and lora8.published["mean"] == 74.9
    assert next(r for r in spt1.rows if r.name == "LoRA-16").published["clevr_distance"] == 66.9  # "6.99" in the text
    assert load_spec("spt-1").name == "spt_1"  # make targets spell it with a dash
    assert all(not r.published for r in load_spec("hifi_vtab").rows)  # a new table


def test_fast_keys_equal_full_composition(composer):
    cases = [
        (
            ["experiment=vtab_paper", "backbone=vit_b16_in21k", "method=lora", "method.rank=16"],
            ["dataset=vtab/cifar100"],
            ["dataset=vtab/dsprites_location"],
            ["seed=1", "protocol=tune", "method.scale=10"],
        ),
        (
            ["experiment=vtab_paper", "method=lora"],
            ["dataset=fewshot/food101", "dataset.shots=1"],
            ["dataset=fewshot/oxford_pets", "dataset.shots=16"],
            ["seed=2", "protocol=final"],
        ),
        (
            [
                *SCALES["smoke"].overrides,
                "method=spt_lora",
                "method.budget=0.23M",
                "+trainer.limit_train_batches=2",
                "dataset.seed=3",
            ],
            ["dataset=embedded/digits"],
            ["dataset=embedded/count"],
            ["seed=0", "protocol=paper"],
        ),
    ]
    for common, first, other, sets in cases:
        composer.key(common, first, ["seed=0", "protocol=final"])  # composes the row once, with the first task
        fast = composer.key(common, other, sets)
        assert fast == config_key(compose_config([*common, *other, *sets])), (common, other, sets)


def test_fast_keys_follow_the_vtab_aliases():
    """``vtab/cifar100`` is a one-line alias of ``vtab/cifar``: the planner reads through it, and the key it derives
    is the one Hydra's full composition gives, for every VTAB-1k spelling the tables use."""
    from peftbench.data.vtab import VTAB_ALIASES

    composer = Composer()
    common = ["experiment=vtab_paper", "backbone=vit_b16_in21k", "method=lora"]
    composer.key(common, ["dataset=vtab/dtd"], ["seed=0", "protocol=final"])
    for alias in sorted(VTAB_ALIASES)[:6]:
        column = [f"dataset=vtab/{alias}"]
        before = len(composer._cache)
        fast = composer.key(common, column, ["seed=1", "protocol=final"])
        assert len(composer._cache) == before, alias  # derived, not composed again
        assert fast == config_key(compose_config([*common, *column, "seed=1", "protocol=final"])), alias


# --- layout, selection, means ---------------------------------------------------------------------------------------
def test_layout_at_both_scales():
    spec = load_spec("spt_1")
    paper = layout(spec, "paper")
    assert len(paper.tasks) == 19 and paper.shown[-4:] == ["natural", "specialized", "structured", "mean"]
    smoke = layout(spec, "smoke")
    assert list(smoke.tasks) == ["digits", "texture", "shape", "landcover", "count", "location", "orientation"]
    assert smoke.summaries["specialized"] == ["landcover"]
    assert layout(spec, "smoke", ["digits", "count"]).summaries == {
        "natural": ["digits"],
        "structured": ["count"],
        "mean": ["digits", "count"],
    }
    cost = layout(load_spec("spt_7"), "smoke")
    assert cost.tasks == {} and cost.shown == ["latency_ms", "inference_memory_gb", "finetune_memory_gb"]
    with pytest.raises(SpecError, match="not in peftbench"):
        task_overrides("domainnet", "clipart", "paper")


def _record(key, val=None, test=None, status="ok", tuned=1.0):
    return {
        "key": key,
        "status": status,
        "run_dir": f"/runs/{key}",
        "protocol": "x",
        "error": "boom" if status == "failed" else None,
        "metrics": {"val_acc": val, "test_acc": test},
        "params": {"tuned_percent": tuned, "trainable_backbone": 1000},
    }


def _runs(task="digits", seed=0, protocol="tune", grid=(1, 10, 100)):
    return [
        Run(
            "LoRA",
            task,
            seed,
            protocol,
            {"method.scale": s},
            ["method=lora"],
            [f"dataset=embedded/{task}"],
            key=f"{task}-{seed}-{protocol}-{s}",
        )
        for s in grid
    ]


def test_selection_val_picks_best_val_then_reports_the_final_runs_test():
    runs = _runs()
    latest = {r.key: _record(r.key, val=v, test=t) for r, v, t in zip(runs, [0.5, 0.8, 0.8], [0.9, 0.1, 0.2])}
    out = select(runs, latest, "val", "test_acc", has_search=True)
    assert out.status == "missing" and out.chosen == {"method.scale": 10}  # tie 0.8 / 0.8: first in grid order
    assert out.final.protocol == "final" and out.final.values == {"method.scale": 10}
    out.final.key = "final-key"
    assert resolve_final(out, latest, "test_acc").status == "missing"  # final run not there yet
    latest["final-key"] = _record("final-key", test=0.42)
    out = resolve_final(out, latest, "test_acc")
    assert out.status == "ok" and out.value == pytest.approx(42.0)  # the final run's test, not the tune runs' tests


def test_selection_paper_reports_max_test_and_missing_or_failed_grid_points():
    runs = _runs(protocol="paper")
    latest = {r.key: _record(r.key, test=t) for r, t in zip(runs, [0.3, 0.7, 0.5])}
    out = select(runs, latest, "paper", "test_acc", has_search=True)
    assert out.status == "ok" and out.value == pytest.approx(70.0) and out.chosen == {"method.scale": 10}
    assert select(runs, {runs[0].key: latest[runs[0].key]}, "paper", "test_acc", True).status == "missing"
    failed = {r.key: _record(r.key, status="failed") for r in runs}
    out = select(runs, failed, "paper", "test_acc", True)
    assert out.status == "failed" and out.error == "boom"


def _synthetic(values):
    """Outcomes for spec tiny at smoke with tasks digits, landcover: values[row][(task, seed)] = acc | 'failed'."""
    outcomes = {}
    for row, cells in values.items():
        outcomes[row] = {}
        for (task, seed), v in cells.items():
            if v == "failed":
                outcomes[row][(task, seed)] = Outcome("failed", record=_record("k", status="failed"), error="boom")
            else:
                outcomes[row][(task, seed)] = Outcome(
                    "ok", value=v, record=_record(f"{row}{task}{seed}", test=v / 100, tuned=0.5)
                )
    return outcomes


def test_means_std_over_seeds_and_failed_cells(tmp_path):
    spec = load_spec(TINY_SPEC)
    lay = layout(spec, "smoke", ["digits", "landcover"])
    outcomes = _synthetic(
        {
            "Linear": {("digits", 0): 60.0, ("digits", 1): 70.0, ("landcover", 0): 80.0, ("landcover", 1): 90.0},
            "LoRA": {("digits", 0): 50.0, ("digits", 1): "failed", ("landcover", 0): 40.0, ("landcover", 1): 40.0},
        }
    )
    smoke = build_cells(spec, lay, "smoke", [0, 1], outcomes, {})
    assert "NOAH" not in smoke  # a CPU scale shows no published-only row ...
    assert all(c.published is None and c.diff is None for row in smoke.values() for c in row.values())  # nor numbers
    table = build_cells(spec, lay, "paper", [0, 1], outcomes, {})  # the same cells as paper-scale rendering shows them
    lin = table["Linear"]
    assert lin["digits"].mean == pytest.approx(65.0) and lin["digits"].std == pytest.approx(7.0710678)
    assert lin["natural"].mean == pytest.approx(65.0)
    assert lin["mean"].mean == pytest.approx(75.0)  # mean of the group means, per seed: (70, 80) -> 75 +- 7.07
    assert lin["mean"].std == pytest.approx(7.0710678)
    assert lin["mean"].published == 57.6 and lin["mean"].diff == pytest.approx(75.0 - 57.6)
    assert lin["tuned_percent"].mean == pytest.approx(0.5) and lin["tuned_percent"].published == 0.04
    assert [r["run_dir"] for r in lin["digits"].runs] == ["/runs/Lineardigits0", "/runs/Lineardigits1"]
    lora = table["LoRA"]
    assert lora["digits"].status == "failed" and lora["digits"].error == "boom"
    assert lora["natural"].status == "failed" and lora["mean"].status == "failed"
    assert lora["landcover"].mean == pytest.approx(40.0) and lora["landcover"].std == pytest.approx(0.0)
    assert table["NOAH"]["mean"].status == "published"
    assert cell_text("mean", lin["mean"]) == "75.0±7.1 (57.6, +17.4)"
    assert cell_text("digits", lora["digits"]) == "failed"
    assert cell_text("mean", table["NOAH"]["mean"]) == "– (75.5)"

    assert "No published number is set beside these" in " ".join(caption(spec, "smoke", "val", [0, 1], True))
    cap = caption(spec, "paper", "val", [0, 1], True)
    md, csv_, tex = markdown(spec, lay, table, cap), csv_text(spec, table, "smoke", "val"), latex(spec, lay, table, cap)
    write_outputs(tmp_path, md, csv_, tex, {"rows": []})
    assert (tmp_path / "table.md").read_text().count("failed") >= 3
    assert "| NOAH (published only) |" in md and "mean ± std over seeds 0, 1" in md
    assert "tiny,smoke,val,LoRA,digits,failed" in (tmp_path / "table.csv").read_text()
    assert r"75.0$\pm$7.1 (57.6, +17.4)" in (tmp_path / "table.tex").read_text()
    assert json.loads((tmp_path / "cells.json").read_text()) == {"rows": []}


def test_multiruns_one_per_row_then_one_per_chosen_value():
    phase1 = _runs("digits") + _runs("count") + _runs("digits", seed=1)
    ((args, members),) = sweeps(phase1, by_values=False)
    assert len(members) == 9
    assert "dataset=embedded/digits,embedded/count" in args and "seed=0,1" in args and "method.scale=1,10,100" in args
    finals = [
        Run("LoRA", t, 0, "final", {"method.scale": s}, ["method=lora"], [f"dataset=embedded/{t}"])
        for t, s in (("digits", 10), ("count", 10), ("shape", 1))
    ]
    groups = sweeps(finals, by_values=True)
    assert sorted(a[1] for a, _ in groups) == ["dataset=embedded/digits,embedded/count", "dataset=embedded/shape"]


# --- command line errors -----------------------------------------------------------------------------------------
def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftbench.tables: error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_exit_1(capsys, tmp_path):
    assert "unknown table 'nope'" in _error(capsys, "nope")
    assert "unknown scale" in _error(capsys, "spt_1", "scale=huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_SPEC.read_text().replace("published: {natural: 80.2", "published: {cifar: 80.2"))
    assert "published key 'cifar' is not a column" in _error(capsys, str(bad))
    bad.write_text(TINY_SPEC.read_text().replace("[method=lora]", "[method=lora, method.rnk=3]"))
    err = _error(capsys, str(bad), f"output_dir={tmp_path}")
    assert "rows[1] (LoRA): does not compose at scale=smoke" in err and str(bad) in err
    assert not (tmp_path / "index.jsonl").exists()  # nothing ran
    assert "not in peftbench" in _error(capsys, "tina_1", "scale=paper", f"output_dir={tmp_path}")


def test_list_names_every_spec(capsys):
    cli.main(["--list"])
    out = capsys.readouterr().out
    assert all(p.stem in out for p in SPECS) and "INVALID" not in out


def test_wandb_logs_the_rendered_table_offline(tmp_path, monkeypatch):
    from peftbench.tables.render import log_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = load_spec(TINY_SPEC)
    lay = layout(spec, "smoke", ["digits", "landcover"])
    values = {
        "Linear": {("digits", 0): 60.0, ("landcover", 0): 80.0},
        "LoRA": {("digits", 0): 50.0, ("landcover", 0): 4.0},
    }
    table = build_cells(spec, lay, "smoke", [0], _synthetic(values), {})
    run_dir = log_wandb(spec, lay, table, "smoke", tmp_path, {"table": "tiny"})
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and str(offline[0]) in run_dir
    assert list(offline[0].glob("*.wandb"))


# --- end to end: the same code path as `python -m peftbench.tables` ------------------------------------------------
def test_table_regenerates_from_nothing_then_skips_finished_runs_then_resumes(tmp_path):
    args = [str(TINY_SPEC), "scale=smoke", "tasks=digits,landcover", f"output_dir={tmp_path}"]
    out = run_cli("peftbench.tables", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table_dir = tmp_path / "tables" / "tiny" / "smoke"
    md = (table_dir / "table.md").read_text()
    assert md in out.stdout
    index = tmp_path / "index.jsonl"
    records = read_index(index)
    # Linear: 2 final runs; LoRA: 2 tasks x 2 scales tune + 2 final runs with the scale picked on val
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    assert sorted(r["protocol"] for r in records) == ["final"] * 4 + ["tune"] * 4
    assert {r["group"] for r in records} == {"tiny-smoke"}
    cells = json.loads((table_dir / "cells.json").read_text())
    lora = next(r for r in cells["rows"] if r["name"] == "LoRA")["cells"]
    (run,) = lora["digits"]["runs"]
    assert run["protocol"] == "final" and run["chosen"]["method.scale"] in (1, 10) and len(run["searched"]) == 2
    final = next(r for r in records if r["run_dir"] == run["run_dir"])
    assert final["protocol"] == "final" and lora["digits"]["mean"] == pytest.approx(100 * final["metrics"]["test_acc"])
    assert "| LoRA |" in md and "NOAH" not in md and "–" not in md.split("| LoRA |")[1].split("\n")[0]
    for name in ("table.csv", "table.tex"):
        assert (table_dir / name).stat().st_size > 0

    again = run_cli("peftbench.tables", *args, timeout=600)  # nothing re-runs, the table is identical
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run(s)" not in again.stderr + again.stdout
    assert len(read_index(index)) == 8 and (table_dir / "table.md").read_text() == md

    lines = index.read_text().splitlines()  # "interrupted": one finished run never reached the index
    lost = json.loads(lines[0])
    index.write_text("\n".join(lines[1:]) + "\n")
    resumed = run_cli("peftbench.tables", *args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 run(s)" in resumed.stdout
    records = read_index(index)
    assert len(records) == 8 and records[-1]["key"] == lost["key"] and records[-1]["status"] == "ok"
    assert (table_dir / "table.md").read_text() == md  # bit-for-bit repeatable runs: the same table


def test_command_line_options():
    opts = cli.parse(
        [
            "spt-1",
            "scale=paper",
            "seeds=0,1",
            "launcher=slurm",
            "hydra.launcher.partition=gpu",
            "tasks=cifar100,dtd",
            "trainer.max_epochs=5",
            "selection=paper",
        ]
    )
    assert opts["name"] == "spt-1" and opts["scale"] == "paper" and opts["seeds"] == [0, 1]
    assert opts["launcher"] == "slurm" and opts["hydra"] == ["hydra.launcher.partition=gpu"]  # sweeps only, not keys
    assert opts["extra"] == ["trainer.max_epochs=5"] and opts["tasks"] == ["cifar100", "dtd"]
    with pytest.raises(SpecError, match="unknown Hydra launcher"):
        cli.parse(["spt_1", "launcher=nope"])
    # the options are conf/tables.yaml composed with Hydra: its defaults, its override syntax, flags as shorthands
    assert cli.parse(["spt_1"])["scale"] == "smoke" and cli.parse(["spt_1"])["output_dir"] == "outputs"
    brackets = cli.parse(["name=spt_1", "seeds=[2,3]", "tasks=[dtd]", "dry_run=true", "paths.output_dir=/x"])
    assert brackets["name"] == "spt_1" and brackets["seeds"] == [2, 3] and brackets["tasks"] == ["dtd"]
    assert brackets["dry_run"] is True and brackets["output_dir"] == "/x" and brackets["extra"] == []
    assert cli.parse(["spt_1", "--dry-run", "--render-only"])["render_only"] is True
    for bad, match in ((["spt_1", "seeds=[0,"], r"^seeds=\[0,: .*Hydra override syntax"),
                       (["spt_1", "seeds=a,b"], "not a list of integers"),
                       (["spt_1", "dry_run=maybe"], "dry_run=maybe: not true or false"),
                       (["spt_1", "scale=huge"], "scale=huge: unknown scale"),
                       (["spt_1", "dtd"], "one table at a time"),
                       (["spt_1", "--fast"], "--fast: unknown flag")):
        with pytest.raises(SpecError, match=match):
            cli.parse(bad)


def test_a_whole_real_table_regenerates_at_smoke_scale(tmp_path):
    """CI regenerates a whole paper table (CDRA-SPT Table 4: 4 rows x 7 vtab-mini tasks = 28 runs, sensitivity
    scoring included) from nothing, through the command a user types."""
    out = run_cli("peftbench.tables", "cdra_4", "scale=smoke", f"output_dir={tmp_path}", timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((tmp_path / "tables" / "cdra_4" / "smoke" / "cells.json").read_text())
    assert [r["name"] for r in cells["rows"]] == ["(i) Dynamic rank", "(ii) Fixed Rank-8", "(iii) Fixed Rank-16",
                                                  "(iv) Fixed Rank-32"]
    for row in cells["rows"]:
        for column in ("digits", "texture", "shape", "landcover", "count", "location", "orientation", "mean"):
            assert row["cells"][column]["status"] == "ok", (row["name"], column)
    params = [row["cells"]["tuned_percent"]["mean"] for row in cells["rows"][1:]]
    assert params == sorted(params)  # fixed rank 8 < 16 < 32
    assert len(read_index(tmp_path / "index.jsonl")) == 28
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / "tables" / "cdra_4" / "smoke" / name).stat().st_size > 0
