"""Figures from score files, runs and the results index: ``python -m peftbench.plots <subcommand> ...``.

Subcommands (each writes PNGs into ``--out``, default beside its input, and prints their paths):
    adapters <run_dir>: TINA Fig. 4 (neurons per adapter per cycle, ``tina_neurons.png``) and Fig. 5 (accuracy vs
        trainable parameters over the cycles, ``tina_accuracy.png``) of a ``method=tina`` run.
    sensitivity <score file> [...]: SPT Fig. 4, sensitive share per block and per matrix type, one task per file
        (``sensitivity.png``, ``sensitivity_matrices.png``).
    cdra <score file or run_dir> [...]: CDRA-SPT Fig. 5, rows and columns of the compact sub-matrices
        (``cdra_compact.png``).
    heads <score file or run_dir>: layers x heads maps of HiFi (I_h, PageRank, chosen heads) or Heart-LoRA
        (responsiveness, deactivated heads) (``hifi_heads.png`` / ``heart_heads.png``).
    ne <index>: Heart-LoRA Fig. 8, accuracy against ne per task (``heart_ne.png``).
    params <index>: SPT Fig. 3a, accuracy against trainable parameters per method (``params.png``).
    compression <index>: TINA Fig. 3, accuracy against compression sigma, TINA vs adapters (``compression.png``).

The figure code lives in :mod:`peftbench.plots` (one module per figure family, data extraction separate from
drawing). Bad input stops with one line, ``peftbench.plots: <file>: <what is wrong and what to do>``, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

#: public name -> module of :mod:`peftbench.plots` that defines it; imported on first use, so the index figures
#: (``ne``, ``params``, ``compression``) start without importing torch
LAZY = {
    "adapters": "adapters",
    "load_cycles": "adapters",
    "plot_accuracy": "adapters",
    "plot_neurons": "adapters",
    "short": "adapters",
    "sensitivity": "sensitivity",
    "cdra": "cdra",
    "heads": "heads",
    "ne": "sweeps",
    "params": "sweeps",
    "compression": "sweeps",
}
__all__ = ["main", "parser", *LAZY]


def __getattr__(name: str) -> Any:
    """Module attributes of :data:`LAZY` (``plot.short``, ``plot.heads``, ...), imported when first asked for."""
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"peftbench.plots.{LAZY[name]}")
    return getattr(module, name)


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    top = argparse.ArgumentParser(prog="python -m peftbench.plots", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, inputs: str, many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("inputs", type=Path, nargs="+" if many else 1, metavar=inputs)
        p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the input)")
        return p

    add("adapters", "TINA: neurons per adapter per cycle, accuracy vs parameters", "run_dir")
    add("sensitivity", "SPT Fig. 4: sensitive share per block and per matrix type", "score_file", many=True)
    add("cdra", "CDRA-SPT Fig. 5: rows/columns of the compact sub-matrices", "score_file_or_run_dir", many=True)
    add("heads", "HiFi / Heart-LoRA: layers x heads maps", "score_file_or_run_dir")
    for name, help_ in (
        ("ne", "Heart-LoRA Fig. 8: accuracy against ne per task"),
        ("params", "SPT Fig. 3a: accuracy against trainable parameters per method"),
        ("compression", "TINA Fig. 3: accuracy against compression sigma, TINA vs adapters"),
    ):
        p = add(name, help_, "index")
        p.add_argument("--dataset", action="append", default=None, help="keep this task (repeatable)")
        p.add_argument("--group", default=None, help="keep records whose 'group' field is this")
        p.add_argument("--metric", default="test_acc", help="metrics key to plot (default test_acc)")
        p.add_argument(
            "--mixed",
            choices=("refuse", "warn"),
            default="refuse",
            help="runs that would be averaged into one point but differ in more than seed and task: refuse "
            "(default) or warn and average",
        )
        if name == "params":
            p.add_argument(
                "--x",
                choices=("trainable_backbone", "tuned_percent"),
                default="trainable_backbone",
                help="x axis: trainable backbone parameters, or their percent of the pre-trained backbone",
            )
    return top


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = parser().parse_args(argv)
    inputs, out, draw = args.inputs, args.out, __getattr__(args.command)
    if args.command in ("sensitivity", "cdra"):
        paths = draw(inputs, out)
    elif args.command in ("adapters", "heads"):
        paths = draw(inputs[0], out)
    else:
        common = {"datasets": args.dataset, "group": args.group, "metric_name": args.metric, "mixed": args.mixed}
        if args.command == "params":
            common["x"] = args.x
        paths = draw(inputs[0], out, **common)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
