"""Print the parameter table of docs/methods.md: every method on ViT-B/16 (random weights, nothing downloaded).

    python scripts/param_table.py [--dataset vtab/cifar100] [--scoring-samples 8]

Columns: trainable backbone parameters, their share of the 85.8M pre-trained backbone, the head, and the
"Tuned / Total" the SPT paper reports on VTAB-1k (Table 1), where it lists the method. Methods that score first
score random weights on seeded synthetic batches (no data or weights are needed, none are downloaded): SPT-LoRA,
SPT-Adapter and CDRA-SPT land on their trainable budget whatever the scores; GPS, HiFi and Child-Tuning count by
their rule (k per row, k heads, density p), so their counts do not depend on the scores either.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peftbench.compose import compose_config
from peftbench.params import parameter_accounting

# SPT Table 1, VTAB-1k column ("Tuned / Total", head included, averaged over the 19 tasks)
SPT_TABLE1 = {
    "full": "100%", "linear": "0.04%", "partial": "8.30%", "bias": "0.13%", "mlp_head": "1.42%",
    "vpt_shallow": "0.13%", "vpt_deep": "1.14%", "adapter": "0.23% (Adapter-8)", "adaptformer": "0.36%",
    "lora": "0.23% (LoRA-8)", "spt_lora": "0.31% / 0.63%", "spt_adapter": "0.30% / 0.44%",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="vtab/cifar100")
    parser.add_argument("--scoring-samples", type=int, default=8, help="synthetic images scored (scoring methods)")
    args = parser.parse_args()
    methods = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))
    print("| `method=` | trainable backbone | % of backbone | head | SPT Table 1 \"Tuned / Total\" (VTAB-1k) |")
    print("|---|---:|---:|---:|---|")
    for method in methods:
        cfg = compose_config([f"method={method}", "backbone=vit_b16_in21k", f"dataset={args.dataset}",
                              f"scoring.n_samples={args.scoring_samples}", "scoring.batch_size=4"])
        r = parameter_accounting(cfg)
        print(f"| `{method}` | {r['trainable_backbone']:,} | {r['tuned_percent']:.3f}% | {r['trainable_head']:,} "
              f"| {SPT_TABLE1.get(method, '-')} |", flush=True)


if __name__ == "__main__":
    main()
