"""SPT / CDRA-SPT table rows: each budget is the trainable target that reproduces the paper's printed Tuned / Total,
as a share of the backbone (so it means the same on vit_micro at smoke scale), and one selection is shared where
the paper's ablations share one."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from peftbench.compose import compose_config
from peftbench.methods.spt_lora import parse_budget
from peftbench.tables.spec import SCALES, list_specs, load_spec

SPT_METHODS = ("method=spt_lora", "method=spt_adapter", "method=cdra_spt")
#: the head's share (%) where a table has no LINEAR row of its own: SPT Table 1's LINEAR (VTAB, ViT-B/16), CDRA's Linear
HEAD_SHARE = {"spt_6": 0.04, "spt_7": 0.04, "cdra_4": 0.05, "cdra_5": 0.05, "cdra_6": 0.05, "cdra_7": 0.05}
VIT_MICRO_BACKBONE = 2_710_080


def spt_rows() -> list[tuple[str, object]]:
    rows = []
    for path in list_specs():
        if path.stem.startswith(("spt_", "cdra_")):
            spec = load_spec(path)
            rows += [(spec.name, r) for r in spec.rows if r.runnable and any(m in r.overrides for m in SPT_METHODS)]
    return rows


def method_of(overrides: list[str]):
    cfg = compose_config([*SCALES["smoke"].overrides, *(o for o in overrides if o.startswith("method"))])
    return instantiate(cfg.method)


def head_share(table: str) -> float:
    spec = load_spec(table)
    linear = [r for r in spec.rows if r.name.lower() == "linear" and "tuned_percent" in r.published]
    return linear[0].published["tuned_percent"] if linear else HEAD_SHARE[table]


@pytest.mark.parametrize("table,row", spt_rows(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_budget_is_a_share_of_the_backbone_that_makes_sense_at_both_scales(table, row):
    method = method_of(row.overrides)
    assert method.budget_spec.endswith("%"), f"{table} {row.name}: write the budget as a share of the backbone"
    pct = float(method.budget_spec[:-1])
    assert 0 < pct < 3  # vit_micro (smoke): a fraction of its backbone, not ViT-B's 0.2M (7% of it)
    assert 0 < parse_budget(method.budget_spec, VIT_MICRO_BACKBONE) < 0.03 * VIT_MICRO_BACKBONE
    printed = row.published.get("tuned_percent")
    spt_like = "method=cdra_spt" not in row.overrides or "method.cases=[]" in row.overrides
    if printed is not None and spt_like:  # SPT's own count: budget + the head's share = the printed fraction
        assert pct + head_share(table) == pytest.approx(printed, abs=0.006), (table, row.name)


@pytest.mark.parametrize("table", ["cdra_1", "cdra_2", "cdra_4", "cdra_6", "cdra_7"])
def test_cdra_rows_reuse_spt_lora_8_selection(table):
    """CDRA-SPT rows share SPT-LoRA-8's selection (budget_of=spt at SPT-LoRA-8's budget): their Params (%) differ."""
    budget = {"cdra_2": "0.99%"}.get(table, "0.46%")  # SPT-LoRA-8's (cdra_1 / cdra_2 rows, checked above)
    for row in load_spec(table).rows:
        if row.runnable and "method=cdra_spt" in row.overrides:
            method = method_of(row.overrides)
            assert method.budget_spec == budget and method.budget_of == "spt" and method.rank == 8, row.name
